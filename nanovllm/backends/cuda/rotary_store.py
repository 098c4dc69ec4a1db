"""Triton `rotary.qk_store`: q/k RMSNorm + rotary and the KV store of a layer in one launch.

A program takes a token's q and k heads, or a share of them (`launch_shape`): it normalises and rotates them
(`elementwise.norm_rope`), writes the rotated q, writes the rotated K and the token's V straight into the paged
cache through the slot mapping (slot < 0: padding, nothing stored; an FP8 cache quantised as `kv_store` does,
bit-exact), and writes the rotated k as a tensor only when asked (a prefill reads this step's K from it; decode
reads the cache). Against `rotary.qk` then `kv_cache.store` this saves a launch and a read of the rotated K per
layer.
"""
import torch
import triton
import triton.language as tl

from nanovllm.backends.cuda.elementwise import norm_rope, row_rms_scale
from nanovllm.backends.cuda.kv_store import encode_for_cache
from nanovllm.core.kv_quant import fp8_max, is_fp8


@triton.jit
def _qk_norm_rope_store_kernel(
    q_ptr, k_ptr, v_ptr, q_out_ptr, k_out_ptr, positions_ptr, cos_sin_ptr, q_w_ptr, k_w_ptr, eps,
    k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr, x_ptr, stride_x, x_eps,
    stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_v_token, stride_v_head, stride_cos_sin,
    stride_k_block, stride_k_row, stride_k_head_c, stride_v_block, stride_v_row, stride_v_head_c,
    NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, NUM_KV_HEADS: tl.constexpr, KV_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HAS_NORM: tl.constexpr,
    RETURN_K: tl.constexpr, BLOCK_SIZE: tl.constexpr, FP8: tl.constexpr, FP8_MAX: tl.constexpr,
    ROW_SCALE: tl.constexpr, X_SIZE: tl.constexpr, X_PAD: tl.constexpr, GROUPS: tl.constexpr = 1,
):
    # Program (token, g) takes the g-th of GROUPS equal shares of the token's q heads and KV heads (NUM_HEADS and
    # NUM_KV_HEADS are a share's counts here, HEADS_PAD and KV_PAD their padding); each share's program reads the
    # position, cos/sin and the row scale itself.
    token = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1).to(tl.int64)
    q_ptr += group * NUM_HEADS * stride_q_head
    q_out_ptr += group * NUM_HEADS * 2 * HALF
    k_ptr += group * NUM_KV_HEADS * stride_k_head
    k_out_ptr += group * NUM_KV_HEADS * 2 * HALF
    v_ptr += group * NUM_KV_HEADS * stride_v_head
    k_cache_ptr += group * NUM_KV_HEADS * stride_k_head_c
    v_cache_ptr += group * NUM_KV_HEADS * stride_v_head_c
    k_scale_ptr += group * NUM_KV_HEADS
    v_scale_ptr += group * NUM_KV_HEADS
    position = tl.load(positions_ptr + token).to(tl.int64)
    cols = tl.arange(0, HALF_PAD)
    cos = tl.load(cos_sin_ptr + position * stride_cos_sin + cols, mask=cols < HALF, other=0.0)
    sin = tl.load(cos_sin_ptr + position * stride_cos_sin + HALF + cols, mask=cols < HALF, other=0.0)
    dtype = q_out_ptr.dtype.element_ty
    if ROW_SCALE:  # q, k, v of a product whose RMSNorm was folded into it: scaled by 1/RMS of its input row x
        row_scale = row_rms_scale(x_ptr + token * stride_x, x_eps, X_SIZE, X_PAD)
    else:
        row_scale = 1.0

    heads = tl.arange(0, HEADS_PAD)
    q1, q2 = norm_rope(q_ptr + token * stride_q_token, stride_q_head, q_w_ptr, cos, sin, heads, cols, eps, q_out_ptr,
                       row_scale, NUM_HEADS, HALF, HAS_NORM, ROW_SCALE)
    mask = (heads < NUM_HEADS)[:, None] & (cols < HALF)[None, :]
    out = q_out_ptr + token * (GROUPS * NUM_HEADS * 2 * HALF) + heads[:, None] * (2 * HALF) + cols[None, :]
    tl.store(out, q1.to(dtype), mask=mask)
    tl.store(out + HALF, q2.to(dtype), mask=mask)

    kv_heads = tl.arange(0, KV_PAD)
    k1, k2 = norm_rope(k_ptr + token * stride_k_token, stride_k_head, k_w_ptr, cos, sin, kv_heads, cols, eps,
                       q_out_ptr, row_scale, NUM_KV_HEADS, HALF, HAS_NORM, ROW_SCALE)
    mask = (kv_heads < NUM_KV_HEADS)[:, None] & (cols < HALF)[None, :]
    if RETURN_K:
        out = k_out_ptr + token * (GROUPS * NUM_KV_HEADS * 2 * HALF) + kv_heads[:, None] * (2 * HALF) + cols[None, :]
        tl.store(out, k1.to(dtype), mask=mask)
        tl.store(out + HALF, k2.to(dtype), mask=mask)

    dims = tl.arange(0, HEAD_DIM_PAD)
    row_mask = (kv_heads < NUM_KV_HEADS)[:, None] & (dims < 2 * HALF)[None, :]
    v_row = v_ptr + token * stride_v_token + kv_heads[:, None] * stride_v_head + dims[None, :]
    value = tl.load(v_row, mask=row_mask)
    if ROW_SCALE:
        value = (value.to(tl.float32) * row_scale).to(dtype)
        if RETURN_K:  # a prefill reads this step's V from the projection's output: scaled there, in place
            tl.store(v_row, value, mask=row_mask)

    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:  # padding tokens store nothing
        block = slot // BLOCK_SIZE
        row = slot % BLOCK_SIZE
        cache_dtype = k_cache_ptr.dtype.element_ty
        dst = (k_cache_ptr + block * stride_k_block + row * stride_k_row + kv_heads[:, None] * stride_k_head_c
               + cols[None, :])
        tl.store(dst, encode_for_cache(k1, k_scale_ptr, kv_heads, NUM_KV_HEADS, FP8, FP8_MAX).to(cache_dtype),
                 mask=mask)
        tl.store(dst + HALF, encode_for_cache(k2, k_scale_ptr, kv_heads, NUM_KV_HEADS, FP8, FP8_MAX).to(cache_dtype),
                 mask=mask)
        dst = (v_cache_ptr + block * stride_v_block + row * stride_v_row + kv_heads[:, None] * stride_v_head_c
               + dims[None, :])
        tl.store(dst, encode_for_cache(value, v_scale_ptr, kv_heads, NUM_KV_HEADS, FP8, FP8_MAX).to(cache_dtype),
                 mask=row_mask)


def rotary_qk_store(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cos_sin_cache: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                    eps: float, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    return_k: bool, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                    row_scale_of: torch.Tensor | None = None, row_eps: float = 0.0, head_groups: int | None = None,
                    warps: int | None = None):
    """The `rotary.qk_store` op (reference: backends/cpu_ref/elementwise.py): q [T, H, D], k and v [T, KV, D] with
    unit stride on D; caches [num_blocks, block_size, KV, D]; k_scale, v_scale [KV] float32 for an FP8 cache.

    `row_scale_of` [T, n] (unit stride on n; not part of the op): q, k and v of token t are first multiplied by
    rsqrt(mean(row_t^2) + row_eps), the RMSNorm folded into the q/k/v product (backends/cuda/norm_folding.py);
    with `return_k` the scaled V is also written back into `v`, where a prefill reads it. `head_groups`: programs a
    token (each a share of its q and KV heads; a divisor of both counts) and `warps` a program, by default
    `launch_shape`'s."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if head_dim % 2 or cos_sin_cache.shape[-1] != head_dim or any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError(f"rotary.qk_store: q {tuple(q.shape)} / k {tuple(k.shape)} need an even head_dim with unit "
                         f"stride matching the cos/sin cache's last dim {cos_sin_cache.shape[-1]}")
    if v.shape != k.shape or k_cache.shape[2:] != k.shape[1:] or v_cache.shape != k_cache.shape:
        raise ValueError(f"rotary.qk_store: k {tuple(k.shape)}, v {tuple(v.shape)}, caches {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)} do not match")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("rotary.qk_store: the caches need a unit stride on head_dim")
    fp8 = is_fp8(k_cache.dtype)
    if fp8 and (k_scale is None or v_scale is None):
        raise ValueError(f"rotary.qk_store: a {k_cache.dtype} cache needs k_scale and v_scale")
    scaled = row_scale_of is not None
    if scaled and (row_scale_of.dim() != 2 or row_scale_of.shape[0] != num_tokens or row_scale_of.stride(-1) != 1):
        raise ValueError(f"rotary.qk_store: row_scale_of {tuple(row_scale_of.shape)} needs one row [n] with unit "
                         f"stride for each of the {num_tokens} tokens")
    q_out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    k_out = torch.empty(num_tokens, num_kv_heads, head_dim, dtype=k.dtype, device=k.device) if return_k else None
    if num_tokens == 0:
        return q_out, k_out
    x = row_scale_of if scaled else q
    has_norm = q_weight is not None
    half = head_dim // 2
    default_groups, default_warps = launch_shape(num_tokens, num_heads, num_kv_heads, fp8)
    groups = default_groups if head_groups is None else head_groups
    warps = default_warps if warps is None else warps
    if num_heads % groups or num_kv_heads % groups:
        raise ValueError(f"rotary.qk_store: head_groups={groups} must divide the {num_heads} q heads and the "
                         f"{num_kv_heads} KV heads")
    num_heads, num_kv_heads = num_heads // groups, num_kv_heads // groups
    _qk_norm_rope_store_kernel[(num_tokens, groups)](
        q, k, v, q_out, k_out if return_k else q_out, positions, cos_sin_cache,
        q_weight if has_norm else q, k_weight if has_norm else k, eps,
        k_cache, v_cache, slot_mapping, k_scale if fp8 else cos_sin_cache, v_scale if fp8 else cos_sin_cache,
        x, x.stride(0), row_eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=num_heads, HEADS_PAD=triton.next_power_of_2(num_heads), NUM_KV_HEADS=num_kv_heads,
        KV_PAD=triton.next_power_of_2(num_kv_heads), HALF=half, HALF_PAD=triton.next_power_of_2(half),
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim), HAS_NORM=has_norm, RETURN_K=bool(return_k),
        BLOCK_SIZE=k_cache.shape[1], FP8=fp8, FP8_MAX=fp8_max(k_cache.dtype) if fp8 else 0.0,
        ROW_SCALE=scaled, X_SIZE=x.shape[1] if scaled else 1,
        X_PAD=triton.next_power_of_2(x.shape[1]) if scaled else 1, GROUPS=groups, num_warps=warps)
    return q_out, k_out


def launch_shape(num_tokens: int, num_heads: int, num_kv_heads: int, fp8: bool) -> tuple[int, int]:
    """(programs a token, warps a program): two shapes by size, so start-up's small steps compile what decode steps
    and short prefills use and its full-size prefill what long ones use. Measured on an H200 at Qwen3-0.6B's 16/8
    heads of 128 with the folded norm's row scale (benchmarks/elementwise_shapes.py, us a layer in CUDA graphs,
    round twenty-one): at 96-256 tokens one 4-warp program a token took 3.61-3.77 us (bf16 cache) and 4.31-4.43
    (FP8); four 1-warp programs 3.27-3.60 (bf16), two 4-warp ones 3.60-3.80 (FP8, whose quantising division wants
    more threads a head); at 16,384 tokens one 2-warp program 4-11% under one 4-warp one. Heads are shared out as
    far as both counts divide."""
    if num_tokens > 512:
        groups, warps = 1, 2
    else:
        groups, warps = (2, 4) if fp8 else (4, 1)
    while num_heads % groups or num_kv_heads % groups:
        groups //= 2
    return groups, warps
