"""The reference sampler: temperature, top-k, top-p and min-p over a batch's logits in one pass.

It runs on any device (it is the `sampler` op's reference kernel) and makes no host sync: sampling uses
the exponential-race trick (argmax of p / Exp(1) draws a token with probability p).
"""
from dataclasses import dataclass

import torch


@dataclass
class SamplingTensors:
    """Per-row sampling settings of one step, on the logits' device."""
    temperatures: torch.Tensor  # [B] float32, 0 = greedy
    top_k: torch.Tensor | None = None  # [B] int64, 0 = off
    top_p: torch.Tensor | None = None  # [B] float32, 1 = off
    min_p: torch.Tensor | None = None  # [B] float32, 0 = off
    generators: list | None = None  # [B] torch.Generator or None, for seeded requests
    all_greedy: bool = False


def apply_top_k_top_p_min_p(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """Mask (to -inf) the tokens the filters exclude; `logits` are already temperature-scaled."""
    if params.top_k is not None:
        sorted_logits = logits.sort(dim=-1, descending=True).values
        k = params.top_k.clamp(min=1, max=logits.shape[-1]) - 1
        kth = sorted_logits.gather(-1, k.unsqueeze(-1))
        keep_all = (params.top_k <= 0).unsqueeze(-1)
        logits = logits.masked_fill(~keep_all & (logits < kth), float("-inf"))
    if params.top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
        drop_sorted = before >= params.top_p.unsqueeze(-1)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p is not None:
        probs = logits.softmax(-1)
        threshold = params.min_p.unsqueeze(-1) * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def exponential_noise(probs: torch.Tensor, generators: list | None) -> torch.Tensor:
    noise = torch.empty_like(probs).exponential_()
    if generators:
        for row, gen in enumerate(generators):
            if gen is not None:
                noise[row].exponential_(generator=gen)
    return noise


def sample(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """logits: [B, V] -> sampled token ids [B] int64 (greedy rows take the argmax)."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    if params.all_greedy:
        return greedy
    temperatures = params.temperatures.clamp_min(1e-6).unsqueeze(-1)
    logits = apply_top_k_top_p_min_p(logits / temperatures, params)
    probs = logits.softmax(dim=-1)
    sampled = (probs / exponential_noise(probs, params.generators)).argmax(dim=-1)
    return torch.where(params.temperatures == 0, greedy, sampled)
