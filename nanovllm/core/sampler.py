"""The reference sampler: temperature, top-k, top-p and min-p over a batch's logits in one pass.

It runs on any device (it is the `sampler` op's reference kernel, registered by cpu_ref's plugin) and
makes no host sync: sampling uses the exponential-race trick (argmax of p / Exp(1) draws a token with
probability p). A seeded request's noise comes only from its own generator, drawn with the shape [vocab]
whatever the batch, so the same seed gives the same tokens whatever else is in the batch.
"""
from dataclasses import dataclass

import torch


@dataclass
class SamplingTensors:
    """Per-row sampling settings of one step, on the logits' device."""
    temperatures: torch.Tensor  # [B] float32, 0 = greedy
    top_k: torch.Tensor | None = None  # [B] int64, 0 = off; None when every row is off
    top_p: torch.Tensor | None = None  # [B] float32, 1 = off
    min_p: torch.Tensor | None = None  # [B] float32, 0 = off
    generators: list | None = None  # [B] torch.Generator or None, for seeded requests; None when none is seeded
    all_greedy: bool = False
    # the step's largest top_k when every sampling row has top-k on, else None (host-side: a backend may then
    # sample from that many candidates, `core/sampling/topk_candidates.py`, instead of sorting the vocabulary)
    top_k_bound: int | None = None
    # [1] int64 on the device: a sampler that draws its own noise may take its seed here and advance it in place
    # (a captured graph then draws fresh tokens on every replay without a host step); None: it draws a seed
    seed: torch.Tensor | None = None


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask (to -inf) what top-k, then top-p over the top-k survivors, exclude; one sort serves both.

    top-k keeps every token tied with the k-th; top-p keeps a token when the mass of the tokens ranked before it
    is below top_p (the smallest prefix reaching top_p).
    """
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        kth = sorted_logits.gather(-1, (top_k.clamp(1, logits.shape[-1]) - 1).unsqueeze(-1))
        drop = (sorted_logits < kth) & (top_k > 0).unsqueeze(-1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop = (mass_before >= top_p.unsqueeze(-1)) & (top_p < 1).unsqueeze(-1)  # rounding must not cut top_p=1 rows
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor | None) -> torch.Tensor:
    """Mask the tokens whose probability is below min_p times the most likely token's."""
    if min_p is None:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p.unsqueeze(-1) * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p_min_p(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """Mask (to -inf) the tokens the filters exclude; `logits` are already temperature-scaled."""
    return apply_min_p(apply_top_k_top_p(logits, params.top_k, params.top_p), params.min_p)


def exponential_noise(probs: torch.Tensor, generators: list | None) -> torch.Tensor:
    """Exp(1) noise like `probs`; a seeded row's comes from its own generator only."""
    noise = torch.empty_like(probs).exponential_()
    if generators:
        for row, gen in enumerate(generators):
            if gen is not None:
                noise[row].exponential_(generator=gen)
    # an exact 0 would turn a masked token's 0/0 into NaN, which argmax would pick
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def sample(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """logits: [B, V] -> sampled token ids [B] int64 (greedy rows take the argmax). `logits` are not modified."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    if params.all_greedy:
        return greedy
    temperatures = params.temperatures.clamp_min(1e-6).unsqueeze(-1)
    logits = apply_top_k_top_p_min_p(logits / temperatures, params)
    probs = logits.softmax(dim=-1)
    sampled = (probs / exponential_noise(probs, params.generators)).argmax(dim=-1)
    return torch.where(params.temperatures == 0, greedy, sampled)


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """weights [B, N] >= 0, u [B] in [0, 1) -> per row the first index whose cumulative weight exceeds u * total:
    one with weight, since the target is kept below the total (rounding could otherwise put u * total on it, past
    the last weighted entry). A row of NaN weights (e.g. logits of a warm-up step over uninitialised cache blocks)
    gets the last index, as argmax would give some index: never one past the row."""
    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(u.unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max_(weights.shape[-1] - 1)


def suppress_tokens(logits: torch.Tensor, rows: list[int], token_ids: list[int]) -> None:
    """Set logits[rows[i], token_ids[i]] to -inf in place (EOS and stop tokens of requests below min_tokens)."""
    index = torch.tensor([rows, token_ids], dtype=torch.int64).to(logits.device, non_blocking=True)
    logits.index_put_((index[0], index[1]), torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))
