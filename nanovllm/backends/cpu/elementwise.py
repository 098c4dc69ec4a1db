"""The elementwise ops between a layer's matrix products, for the cpu backend: q and k rotated in one pass.

Eager CPU ops cost about as much to dispatch as to compute at decode sizes, so the rotary works on q and k
concatenated (one set of ops instead of two), with its cos/sin tables built once per step rather than per layer;
the math is the reference's, in float32.
"""
import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in float32, rounded to x's dtype before the weight (as the reference)."""
    dtype = x.dtype
    x = x.float()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype) * weight


_last_tables: list = [None]  # (positions, cos_sin_cache, tables) of the last call: every layer of a step shares them


def rotation_tables(positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, 1, D] float32 (cos | cos) and (-sin | sin) for these positions, computed once per step: every layer
    calls with the same positions tensor, so the last result is reused while it matches."""
    last = _last_tables[0]
    if last is not None and last[0] is positions and last[1] is cos_sin_cache:
        return last[2]
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    tables = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)
    _last_tables[0] = (positions, cos_sin_cache, tables)
    return tables


def rotary_qk(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
              q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float):
    """Per-head RMSNorm of q and k (where the weights are given, as Qwen3) then neox rotary.

    positions [T]; q [T, H, D], k [T, KV, D]; cos_sin_cache [max_pos, D] float32 (cos | sin) -> new q, k.
    The halves (x1, x2) become (x1 cos - x2 sin, x2 cos + x1 sin) as x * (cos | cos) + (x2 | x1) * (-sin | sin):
    the same float32 products and sums as the reference, in fewer ops.
    """
    if q_weight is not None:
        q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    num_heads, half = q.shape[1], q.shape[-1] // 2
    cos2, sin2 = rotation_tables(positions, cos_sin_cache)
    qk = torch.cat([q, k], dim=1).float()  # [T, H + KV, D]
    rotated = (qk * cos2).add_(qk.roll(half, dims=-1).mul_(sin2)).to(q.dtype)  # no FMA: as the reference rounds
    return rotated[:, :num_heads], rotated[:, num_heads:]


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * d] (gate then up) -> silu(gate) * up, [..., d]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)
