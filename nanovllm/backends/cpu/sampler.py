"""The cpu backend's sampler: the reference sampler's filters, drawn by inverse CDF instead of a noise race.

The reference draws one Exp(1) number per vocabulary entry and row; on a CPU that generation costs more
than the rest of the step's sampling (12 ms for 16 rows of SmolLM2's 49k entries). Here each row draws
one uniform number and finds it in the cumulative probabilities (a cumsum and a binary search): the same
distribution, and a seeded request's token still depends only on its own generator. Top-k without top-p
takes one `topk` rather than a sort of the vocabulary. Greedy rows take the argmax.
"""
import torch

from nanovllm.core.sampler import SamplingTensors, apply_min_p, apply_top_k_top_p


def mask_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Mask what top-k excludes (ties with the k-th value kept, k = 0 off), with one topk for the largest k."""
    k = top_k.clamp(0, logits.shape[-1])
    largest = int(k.max())
    if largest == 0:
        return logits
    kth = logits.topk(largest, dim=-1).values.gather(-1, (k.clamp_min(1) - 1).unsqueeze(-1))
    return logits.masked_fill((logits < kth) & (k > 0).unsqueeze(-1), float("-inf"))


def uniform(num_rows: int, generators: list | None) -> torch.Tensor:
    """[num_rows] uniform numbers in [0, 1); a seeded row's comes from its own generator only."""
    u = torch.rand(num_rows)
    for row, gen in enumerate(generators or ()):
        if gen is not None:
            u[row] = torch.rand(1, generator=gen)[0]
    return u


def sample(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """logits: [B, V] -> sampled token ids [B] int64 (greedy rows take the argmax). `logits` are not modified."""
    raw = logits.float()
    if params.all_greedy:
        return raw.argmax(dim=-1)
    logits = raw / params.temperatures.clamp_min(1e-6).unsqueeze(-1)
    if params.top_p is None and params.top_k is not None:
        logits = mask_top_k(logits, params.top_k)
    else:
        logits = apply_top_k_top_p(logits, params.top_k, params.top_p)
    cdf = apply_min_p(logits, params.min_p).softmax(dim=-1).cumsum_(dim=-1)
    # The first entry whose cumulative mass exceeds u * total: a masked token (zero mass) never is.
    target = uniform(len(cdf), params.generators).unsqueeze(-1) * cdf[:, -1:]
    sampled = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    is_greedy = params.temperatures == 0
    if bool(is_greedy.any()) or bool((sampled >= cdf.shape[-1]).any()):  # rounding can put u * total past the end
        sampled = torch.where(is_greedy | (sampled >= cdf.shape[-1]), raw.argmax(dim=-1), sampled)
    return sampled
