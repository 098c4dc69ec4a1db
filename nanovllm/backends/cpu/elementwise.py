"""The elementwise ops between a layer's matrix products, for the cpu backend: q and k rotated in one pass.

Eager CPU ops cost about as much to dispatch as to compute at decode sizes, so the rotary works on q and k
concatenated (one set of ops instead of two); the math is the reference's, in float32.
"""
import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in float32, rounded to x's dtype before the weight (as the reference)."""
    dtype = x.dtype
    x = x.float()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype) * weight


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """The residual add and RMSNorm between sub-layers: (rms_norm(x + residual) * weight, x + residual)."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def rotary_qk(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
              q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float):
    """Per-head RMSNorm of q and k (where the weights are given, as Qwen3) then neox rotary.

    positions [T]; q [T, H, D], k [T, KV, D]; cos_sin_cache [max_pos, D] float32 (cos | sin) -> new q, k.
    """
    if q_weight is not None:
        q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    num_heads = q.shape[1]
    qk = torch.cat([q, k], dim=1).float()  # [T, H + KV, D]
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    x1, x2 = qk.chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(q.dtype)
    return rotated[:, :num_heads], rotated[:, num_heads:]


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * d] (gate then up) -> silu(gate) * up, [..., d]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)
