"""Reference twins of the elementwise ops a decoder layer runs between its matrix products.

Plain torch, device-agnostic; the cuda backend fuses each into one Triton kernel (backends/cuda/elementwise.py).
"""
import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32 and rounded to x's dtype before the weight, as RMSNorm does."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x.to(dtype) * weight


def rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, neox style: the two halves of each head rotate together."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rotary_qk(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
              q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float):
    """The `rotary.qk` op: per-head RMSNorm of q and k (where the weights are given, as Qwen3) then rotary.

    positions [T]; q [T, H, D], k [T, KV, D] (views are fine); cos_sin_cache [max_pos, D] float32 (cos | sin).
    Returns new tensors (q [T, H, D], k [T, KV, D]); the inputs are not modified.
    """
    if q_weight is not None:
        q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    return rotate_neox(q, cos, sin), rotate_neox(k, cos, sin)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """The `act.silu_mul` op: x [..., 2 * d] (gate then up) -> silu(gate) * up, [..., d]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
