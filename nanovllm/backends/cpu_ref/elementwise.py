"""Reference twins of the elementwise ops a decoder layer runs between its matrix products.

Plain torch, device-agnostic; the cuda backend fuses each into one Triton kernel (backends/cuda/elementwise.py).
"""
import torch
import torch.nn.functional as F

from nanovllm.core.kv_store import store_kvcache


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32 and rounded to x's dtype before the weight, as RMSNorm does."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x.to(dtype) * weight


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """The `norm.add_rms` op: x and residual [..., n], weight [n] -> (rms_norm(x + residual), x + residual), the
    sum rounded to x's dtype first, as RMSNorm(x, residual) computes them."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


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


def rotary_qk_store(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cos_sin_cache: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                    eps: float, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    return_k: bool, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None):
    """The `rotary.qk_store` op: `rotary_qk`, then the rotated K and V stored as `kv_cache.store` stores them.

    v [T, KV, D]; the caches, slot mapping and FP8 scales as `core/kv_store.store_kvcache` takes them. Returns
    (q, k) rotated, or (q, None) when `return_k` is False (the caller reads K back from the cache).
    """
    q, k = rotary_qk(positions, q, k, cos_sin_cache, q_weight, k_weight, eps)
    store_kvcache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q, k if return_k else None


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """The `act.silu_mul` op: x [..., 2 * d] (gate then up) -> silu(gate) * up, [..., d]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
