"""Top-k sampling (then top-p and min-p among the survivors) from each row's k largest logits: no sort of the
vocabulary and no host sync, so a GPU backend can serve filtered steps without the reference's full sort.

For a step where every sampling row has top-k on (1 <= top_k <= K, K = the step's largest top_k, known on the host
from the requests), the reference (`core/sampler.py`) keeps every token whose scaled logit is at least the row's
k-th largest (ties with the k-th included), then top-p over those survivors in descending order, then min-p. Here
one `topk(K)` gives the candidates in that order. The survivors outside them can only be tokens tied with the
k-th value (anything else outside is smaller): their number comes from one comparison over the row, and they
form a "tie block" of equal weight after the candidates. Top-p keeps the first of them while the mass before
each is below top_p, as the reference's sort would keep some of them (which ones, among equal values, the
reference leaves to its sort; here the lowest token ids). One uniform number per row then draws a token by
inverse CDF over candidates and tie block; a draw in the tie block finds its token by a cumulative count of
the row's tied ids. Each row's draw depends only on its own logits, settings and uniform.

Costs a `topk` of K plus a few passes over the logits (casting and scaling, the tie mask, its count and its
cumulative count), against the reference's sort of every row.
"""
from typing import NamedTuple

import torch

from nanovllm.core.sampler import SamplingTensors, inverse_cdf


class Candidates(NamedTuple):
    ids: torch.Tensor  # [B, K] int64: the K largest scaled logits' token ids, largest first
    weights: torch.Tensor  # [B, K] float32: exp(logit - row max) for the kept candidates, 0 for the dropped
    tie_value: torch.Tensor  # [B, 1] float32: the k-th largest scaled logit (the tie block's value)
    tie_count: torch.Tensor  # [B] int64: tied tokens kept outside the candidates
    tie_weight: torch.Tensor  # [B] float32: exp(tie_value - row max), each
    tied: torch.Tensor  # [B, V] bool: the row's tokens tied with the k-th value, outside the candidates


def top_k_bound(top_k: list[int], greedy: list[bool]) -> int | None:
    """The largest top_k when every sampling (non-greedy) row has top-k on, else None: the step's K."""
    ks = [k for k, g in zip(top_k, greedy) if not g]
    if not ks or min(ks) <= 0:
        return None
    return max(ks)


def filter_candidates(scaled: torch.Tensor, params: SamplingTensors, num_candidates: int) -> Candidates:
    """scaled: [B, V] float32 temperature-scaled logits; every row's top_k in [1, num_candidates] (greedy rows
    may have 0: they take 1 here, and the caller replaces their token)."""
    vocab_size = scaled.shape[-1]
    num_candidates = min(num_candidates, vocab_size)
    values, ids = scaled.topk(num_candidates, dim=-1)  # sorted, largest first
    k = params.top_k.clamp(1, num_candidates).unsqueeze(-1)
    kth = values.gather(-1, k - 1)
    kept = values >= kth
    # survivors outside the candidates: tokens tied with the k-th value (one pass over the row)
    tied = (scaled == kth).scatter_(-1, ids, False)
    tie_count = tied.sum(-1)
    top = values[:, :1]
    weights = (values - top).exp().masked_fill_(~kept, 0.0)
    tie_weight = (kth - top).exp().squeeze(-1)
    if params.top_p is not None:  # over the top-k survivors, in descending order: candidates, then the tie block
        total = weights.sum(-1) + tie_count * tie_weight
        probs = weights / total.unsqueeze(-1)
        mass_before = probs.cumsum(-1) - probs
        on = (params.top_p < 1).unsqueeze(-1)
        weights = weights.masked_fill_(on & (mass_before >= params.top_p.unsqueeze(-1)), 0.0)
        # tie block: its i-th token is kept while the mass before it, candidates' + i x its share, is below top_p
        left = params.top_p - probs.sum(-1)
        share = tie_weight / total
        fits = torch.ceil(left / share.clamp_min(torch.finfo(share.dtype).tiny)).clamp(0, vocab_size)
        tie_count = torch.where(params.top_p < 1, torch.minimum(tie_count, fits.long()), tie_count)
    if params.min_p is not None:  # p < min_p * p_max  <=>  logit < max logit + log(min_p)
        floor = top + torch.log(params.min_p.clamp_min(1e-30)).unsqueeze(-1)
        on = params.min_p > 0
        weights = weights.masked_fill_(on.unsqueeze(-1) & (values < floor), 0.0)
        tie_count = torch.where(on & (kth < floor).squeeze(-1), 0, tie_count)
    return Candidates(ids, weights, kth, tie_count, tie_weight, tied)


def draw(c: Candidates, u: torch.Tensor) -> torch.Tensor:
    """One token per row by inverse CDF over the kept candidates and then the tie block, u [B] in [0, 1)."""
    block = c.tie_count * c.tie_weight
    slot = inverse_cdf(torch.cat([c.weights, block.unsqueeze(-1)], dim=-1), u)
    num_candidates = c.ids.shape[-1]
    from_candidates = c.ids.gather(-1, slot.clamp_max(num_candidates - 1).unsqueeze(-1)).squeeze(-1)
    # in the tie block (it has weight, so tie_count >= 1): its j-th tied token by token id, j from u's place in it
    in_candidates = c.weights.sum(-1)
    j = ((u * (in_candidates + block) - in_candidates) / c.tie_weight.clamp_min(torch.finfo(block.dtype).tiny))
    j = torch.minimum(j.long().clamp_min(0), (c.tie_count - 1).clamp_min(0))
    count = c.tied.cumsum(-1, dtype=torch.int32)
    from_ties = torch.searchsorted(count, (j + 1).to(torch.int32).unsqueeze(-1)).squeeze(-1)
    return torch.where(slot == num_candidates, from_ties.clamp_max_(count.shape[-1] - 1), from_candidates)


def sample(logits: torch.Tensor, params: SamplingTensors, num_candidates: int) -> torch.Tensor:
    """logits [B, V] -> token ids [B] int64 for a step whose sampling rows all have 1 <= top_k <= num_candidates
    and no seeded generator (those need the reference: a seeded row's noise comes from its own generator)."""
    if params.generators:
        raise ValueError("topk_candidates.sample: seeded rows take the reference sampler (core/sampler.py)")
    raw = logits.float()
    greedy = raw.argmax(dim=-1)
    if params.all_greedy:
        return greedy
    scaled = raw / params.temperatures.clamp_min(1e-6).unsqueeze(-1)
    u = torch.rand(len(scaled), device=scaled.device)
    sampled = draw(filter_candidates(scaled, params, num_candidates), u)
    return torch.where(params.temperatures == 0, greedy, sampled)
