"""The cpu backend's sampler: the reference sampler's filters, without a sort of the vocabulary.

The reference (`core/sampler.py`) sorts every row for top-k/top-p and draws one Exp(1) number per
vocabulary entry; on a CPU those cost more than the rest of the step's sampling (16 rows of SmolLM2's
49k entries: a 25 ms sort, against 1 ms for a `topk` of 256). Here:

- Rows with top-k or top-p take the row's 256 largest logits (`CANDIDATES`, then 4,096 for rows those do not
  resolve) with one `topk` (a valid prefix of
  the descending order the reference sorts into), apply top-k, top-p and min-p there, and draw among the
  survivors. The result is the reference's whenever the survivors lie inside the candidates: top-k when
  no token outside ties with the k-th value, top-p when the cut falls inside (the last candidate's mass
  before it reaches top_p). Other rows — no filter but min-p or temperature, or a rare flat row whose top-p
  mass lies past the candidates — take the full-vocabulary path (the reference's filters, one cumsum).
- Each row draws one uniform number and finds it in its cumulative probabilities (a binary search): the
  same distribution as the reference's noise race; a seeded request's token depends only on its own
  generator, and which path a row takes depends only on its own logits and settings, never on the batch.
  Greedy rows take the argmax.
"""
import torch

from nanovllm.core.sampler import SamplingTensors, apply_min_p, apply_top_k_top_p, inverse_cdf

# How many of its largest logits a filtered row considers, tier by tier, before the whole vocabulary: 256 hold the
# kept set of a trained model's usual rows (one topk of 16 x 49k: 1 ms); 4,096 the flat rows of random-token
# prompts (4 ms, against a 26 ms sort).
CANDIDATES = (256, 4096)


def uniform(num_rows: int, generators: list | None) -> torch.Tensor:
    """[num_rows] uniform numbers in [0, 1); a seeded row's comes from its own generator only."""
    u = torch.rand(num_rows)
    for row, gen in enumerate(generators or ()):
        if gen is not None:
            u[row] = torch.rand(1, generator=gen)[0]
    return u


def filter_candidates(scaled: torch.Tensor, params: SamplingTensors, num_candidates: int):
    """(values, ids, kept, resolved) for each row's top candidates: which the filters keep, and whether that is
    the whole kept set (else the row needs the full vocabulary)."""
    vocab_size = scaled.shape[-1]
    values, ids = scaled.topk(num_candidates, dim=-1)  # sorted, largest first
    kept = values > float("-inf")
    everything = num_candidates == vocab_size
    k_on = torch.zeros(len(scaled), dtype=torch.bool)
    k_inside = torch.ones(len(scaled), dtype=torch.bool)  # top-k keeps nothing outside the candidates
    if params.top_k is not None:
        k = params.top_k.clamp(0, vocab_size)
        k_on = k > 0
        kth = values.gather(-1, (k.clamp(1, num_candidates) - 1).unsqueeze(-1))
        kept &= ~((values < kth) & k_on.unsqueeze(-1))
        # nothing outside ties with the k-th (top-k past the candidates always takes the full path)
        k_inside = ~k_on | ((k <= num_candidates) & (values[:, -1] < kth.squeeze(-1))) | everything
    p_on = params.top_p < 1 if params.top_p is not None else torch.zeros(len(scaled), dtype=torch.bool)
    # A row with neither filter takes the full path even when the candidates hold the whole vocabulary: alone (in
    # a batch without filters) it draws there, in vocabulary order, and its token must not depend on the batch.
    resolved = (k_on & k_inside) | (everything & (k_on | p_on))
    if params.top_p is not None:
        candidates = values.masked_fill(~kept, float("-inf"))
        # top-p's mass is over the top-k survivors (all among the candidates) or, without top-k, the vocabulary
        normaliser = torch.where(k_on, candidates.logsumexp(dim=-1), scaled.logsumexp(dim=-1)).unsqueeze(-1)
        probs = (candidates - normaliser).exp()
        mass_before = probs.cumsum(dim=-1) - probs
        kept &= ~((mass_before >= params.top_p.unsqueeze(-1)) & p_on.unsqueeze(-1))
        resolved |= p_on & k_inside & (mass_before[:, -1] >= params.top_p)  # the cut falls inside the candidates
    if params.min_p is not None:  # p < min_p * p_max  <=>  logit < max logit + log(min_p)
        floor = values[:, :1] + torch.log(params.min_p.clamp_min(1e-30)).unsqueeze(-1)
        kept &= ~((values < floor) & (params.min_p > 0).unsqueeze(-1))
    return values, ids, kept, resolved


def sample_full(scaled: torch.Tensor, params: SamplingTensors, u: torch.Tensor) -> torch.Tensor:
    """The reference's filters over the whole vocabulary, drawn by inverse CDF."""
    masked = apply_min_p(apply_top_k_top_p(scaled, params.top_k, params.top_p), params.min_p)
    return inverse_cdf(masked.softmax(dim=-1), u)


def rows(params: SamplingTensors, index: torch.Tensor) -> SamplingTensors:
    pick = lambda t: None if t is None else t[index]  # noqa: E731
    return SamplingTensors(params.temperatures[index], pick(params.top_k), pick(params.top_p), pick(params.min_p))


def sample_filtered(scaled: torch.Tensor, params: SamplingTensors, u: torch.Tensor) -> torch.Tensor:
    """Rows with top-k or top-p: each tier of candidates serves the rows it resolves, the full vocabulary the rest."""
    sampled = torch.empty(len(scaled), dtype=torch.int64)
    pending = torch.arange(len(scaled))
    for size in CANDIDATES:
        if not len(pending):
            return sampled
        some = len(pending) < len(scaled)
        sub, sub_params = (scaled[pending], rows(params, pending)) if some else (scaled, params)
        values, ids, kept, resolved = filter_candidates(sub, sub_params, min(size, scaled.shape[-1]))
        weights = (values - values[:, :1]).exp().masked_fill(~kept, 0.0)
        picks = ids.gather(-1, inverse_cdf(weights, u[pending]).unsqueeze(-1)).squeeze(-1)
        sampled[pending[resolved]] = picks[resolved]
        pending = pending[~resolved]
    if len(pending):
        sampled[pending] = sample_full(scaled[pending], rows(params, pending), u[pending])
    return sampled


def sample(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """logits: [B, V] -> sampled token ids [B] int64 (greedy rows take the argmax). `logits` are not modified."""
    raw = logits.float()
    if params.all_greedy:
        return raw.argmax(dim=-1)
    scaled = raw / params.temperatures.clamp_min(1e-6).unsqueeze(-1)
    u = uniform(len(scaled), params.generators)
    if params.top_k is None and params.top_p is None:
        sampled = sample_full(scaled, params, u)
    else:
        sampled = sample_filtered(scaled, params, u)
    is_greedy = params.temperatures == 0
    return torch.where(is_greedy, raw.argmax(dim=-1), sampled) if bool(is_greedy.any()) else sampled

