"""A decode step's q/k/v product with everything up to attention in its epilogue: one launch instead of two.

With the layer's RMSNorm folded into the q/k/v weight (norm_folding.py), a decode layer runs the product on
cuBLAS, then `rotary.qk_store` (rotary_store.py) reads its output back to scale each row by 1/RMS of the
product's input, normalise and rotate q and k, and store K and V in the paged cache. Here one Triton program
computes one head (q, k or v) of a block of tokens: the head's two halves as two products (so the rotary pairs,
dims d and d + head_dim/2, meet in registers), the input rows' sums of squares on the way through K (the 1/RMS
needs no second read), then the same epilogue math as `rotary.qk_store` (elementwise.norm_rope_values, rounded
where it rounds): q heads to `q_out`, K and V straight into the cache (an FP8 cache quantised as kv_store does).
So the product's output never goes to memory, and a layer's decode step takes six launches, not seven.

With `split_k` > 1, that many programs share a head's K: each writes its float32 partial products and sums of
squares, and the last of them to arrive (a counter per token block and head, linear.split_counters) adds every
split's partials in split order and runs the epilogue. One program walking a head's whole K is a chain of
dependent tile loads (~7.9 us at Qwen3-0.6B's shape whatever the batch, round fifteen); a split walks 1/split_k
of it.

Decode only (no prefill reads this step's K from a tensor), head dims a power of two >= 32 and products whose K
a tile divides (float32 runs take three-pass TF32 dots, for the tests; the table is bfloat16's). `pick` says which
configuration runs at which batch size, measured against cuBLAS + `rotary.qk_store` on the device
(`benchmarks/fused_products.py`); other batch sizes keep the two kernels.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nanovllm.backends.cuda import linear
from nanovllm.backends.cuda.attention.triton_common import dot_precision
from nanovllm.backends.cuda.elementwise import norm_rope_values
from nanovllm.backends.cuda.kv_store import encode_for_cache
from nanovllm.core.kv_quant import fp8_max, is_fp8


class Config(NamedTuple):
    block_m: int  # tokens a program
    block_k: int
    warps: int
    stages: int
    swap: bool  # head rows on the MMA's M side (out.T = w @ x.T), the tokens on its N side
    split_k: int = 1  # programs sharing a head's K: each writes float32 partials, the last to end runs the epilogue


@triton.jit
def _add_splits(acc_lo, acc_hi, squares, partial_ptr, squares_ptr, lock_ptr, tokens, m_ok, dims, M, pid_m, head,
                pid_k, N: tl.constexpr, HEADS: tl.constexpr, HALF: tl.constexpr, SPLIT: tl.constexpr):
    """Split K: write this program's partial products [BM, HALF] x 2 and sums of squares [BM]; the program of
    (token block, head) that arrives last reads every split's partials back and adds them in split order (the
    same bits whichever split ends last), resets the counter, and returns last = True with the sums."""
    cols = head * 2 * HALF + dims
    lo_ptrs = partial_ptr + tokens[:, None].to(tl.int64) * N + cols[None, :]
    sq_ptrs = squares_ptr + head * M + tokens
    plane = M.to(tl.int64) * N  # partials: [SPLIT, M, N]; squares: [SPLIT, HEADS, M]
    sq_plane = HEADS * M
    mask = m_ok[:, None]
    tl.store(lo_ptrs + pid_k * plane, acc_lo, mask=mask)
    tl.store(lo_ptrs + pid_k * plane + HALF, acc_hi, mask=mask)
    tl.store(sq_ptrs + pid_k * sq_plane, squares, mask=m_ok)
    tl.debug_barrier()  # every thread's partial is written before the counter says so
    lock = lock_ptr + pid_m * HEADS + head
    last = tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu") == SPLIT - 1
    if last:
        acc_lo = tl.zeros_like(acc_lo)
        acc_hi = tl.zeros_like(acc_hi)
        squares = tl.zeros_like(squares)
        for s in tl.static_range(SPLIT):
            acc_lo += tl.load(lo_ptrs + s * plane, mask=mask, other=0.0, cache_modifier=".cg")
            acc_hi += tl.load(lo_ptrs + s * plane + HALF, mask=mask, other=0.0, cache_modifier=".cg")
            squares += tl.load(sq_ptrs + s * sq_plane, mask=m_ok, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(lock, 0)  # ready for the next launch (a CUDA graph replays it with the same counters)
    return acc_lo, acc_hi, squares, last


@triton.jit(do_not_specialize=["M"])  # one compiled variant serves every batch size
def _qkv_rotary_store_kernel(
    x_ptr, w_ptr, q_out_ptr, positions_ptr, cos_sin_ptr, q_w_ptr, k_w_ptr, eps, x_eps,
    k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr, partial_ptr, squares_ptr, lock_ptr,
    M, stride_xm, stride_cos_sin, stride_k_block, stride_k_row, stride_k_head,
    stride_v_block, stride_v_row, stride_v_head,
    K: tl.constexpr, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    FP8: tl.constexpr, FP8_MAX: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr = 1,
):
    pid_m, head, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tokens = pid_m * BM + tl.arange(0, BM)
    m_ok = tokens < M
    dims = tl.arange(0, HALF)
    ks = pid_k * (K // SPLIT) + tl.arange(0, BK)  # this program's share of K starts there
    rows = (head * 2 * HALF + dims).to(tl.int64) * K  # the head's first half of weight rows; the second is HALF on
    if SWAP:
        x_ptrs = x_ptr + tokens[None, :].to(tl.int64) * stride_xm + ks[:, None]  # [BK, BM]
        w_ptrs = w_ptr + rows[:, None] + ks[None, :]  # [HALF, BK]
        acc_lo = tl.zeros((HALF, BM), dtype=tl.float32)
        acc_hi = tl.zeros((HALF, BM), dtype=tl.float32)
    else:
        x_ptrs = x_ptr + tokens[:, None].to(tl.int64) * stride_xm + ks[None, :]  # [BM, BK]
        w_ptrs = w_ptr + rows[None, :] + ks[:, None]  # [BK, HALF]
        acc_lo = tl.zeros((BM, HALF), dtype=tl.float32)
        acc_hi = tl.zeros((BM, HALF), dtype=tl.float32)
    squares = tl.zeros((BM,), dtype=tl.float32)
    for _ in range(0, K // SPLIT, BK):
        if SWAP:
            x = tl.load(x_ptrs, mask=m_ok[None, :], other=0.0)
            acc_lo = tl.dot(tl.load(w_ptrs), x, acc_lo, input_precision=PRECISION)
            acc_hi = tl.dot(tl.load(w_ptrs + HALF * K), x, acc_hi, input_precision=PRECISION)
            xf = x.to(tl.float32)
            squares += tl.sum(xf * xf, 0)
        else:
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            acc_lo = tl.dot(x, tl.load(w_ptrs), acc_lo, input_precision=PRECISION)
            acc_hi = tl.dot(x, tl.load(w_ptrs + HALF * K), acc_hi, input_precision=PRECISION)
            xf = x.to(tl.float32)
            squares += tl.sum(xf * xf, 1)
        x_ptrs += BK
        w_ptrs += BK
    if SWAP:
        acc_lo = tl.trans(acc_lo)
        acc_hi = tl.trans(acc_hi)
    if SPLIT > 1:
        acc_lo, acc_hi, squares, last = _add_splits(
            acc_lo, acc_hi, squares, partial_ptr, squares_ptr, lock_ptr, tokens, m_ok, dims, M, pid_m, head, pid_k,
            (NUM_HEADS + 2 * NUM_KV_HEADS) * 2 * HALF, NUM_HEADS + 2 * NUM_KV_HEADS, HALF, SPLIT)
    else:
        last = True
    if last:
        _epilogue(acc_lo, acc_hi, squares, q_out_ptr, positions_ptr, cos_sin_ptr, q_w_ptr, k_w_ptr, eps, x_eps,
                  k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr, tokens, m_ok, dims, head,
                  stride_cos_sin, stride_k_block, stride_k_row, stride_k_head, stride_v_block, stride_v_row,
                  stride_v_head, K, NUM_HEADS, NUM_KV_HEADS, HALF, BM, HAS_NORM, BLOCK_SIZE, FP8, FP8_MAX)


@triton.jit
def _epilogue(acc_lo, acc_hi, squares, q_out_ptr, positions_ptr, cos_sin_ptr, q_w_ptr, k_w_ptr, eps, x_eps,
              k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr, tokens, m_ok, dims, head,
              stride_cos_sin, stride_k_block, stride_k_row, stride_k_head, stride_v_block, stride_v_row,
              stride_v_head, K: tl.constexpr, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
              HALF: tl.constexpr, BM: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
              FP8: tl.constexpr, FP8_MAX: tl.constexpr):
    """rotary.qk_store's math on one head of a token block's product (two halves [BM, HALF], float32) and the
    input rows' sums of squares: q out, or K/V into the cache."""
    dtype = q_out_ptr.dtype.element_ty
    x1 = acc_lo.to(dtype).to(tl.float32)  # the product's output, rounded as the two-kernel path stores it
    x2 = acc_hi.to(dtype).to(tl.float32)
    row_scale = tl.rsqrt(squares / K + x_eps)[:, None]  # 1/RMS of each input row: the folded RMSNorm
    position = tl.load(positions_ptr + tokens, mask=m_ok, other=0).to(tl.int64)
    cos_sin = cos_sin_ptr + position[:, None] * stride_cos_sin + dims[None, :]
    if head < NUM_HEADS:
        cos = tl.load(cos_sin, mask=m_ok[:, None], other=0.0)
        sin = tl.load(cos_sin + HALF, mask=m_ok[:, None], other=0.0)
        y1, y2 = norm_rope_values(x1, x2, q_w_ptr, cos, sin, dims, eps, dtype, row_scale, HALF, HAS_NORM, True)
        out = q_out_ptr + tokens[:, None].to(tl.int64) * (NUM_HEADS * 2 * HALF) + head * 2 * HALF + dims[None, :]
        tl.store(out, y1.to(dtype), mask=m_ok[:, None])
        tl.store(out + HALF, y2.to(dtype), mask=m_ok[:, None])
    else:
        slot = tl.load(slot_mapping_ptr + tokens, mask=m_ok, other=-1).to(tl.int64)
        stored = (m_ok & (slot >= 0))[:, None]  # padding tokens (slot < 0) store nothing
        block, row = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        if head < NUM_HEADS + NUM_KV_HEADS:  # K: normalised and rotated
            cos = tl.load(cos_sin, mask=m_ok[:, None], other=0.0)
            sin = tl.load(cos_sin + HALF, mask=m_ok[:, None], other=0.0)
            y1, y2 = norm_rope_values(x1, x2, k_w_ptr, cos, sin, dims, eps, dtype, row_scale, HALF, HAS_NORM, True)
            _store_in_cache(y1, y2, k_cache_ptr, k_scale_ptr, head - NUM_HEADS, block, row, stored, dims,
                            stride_k_block, stride_k_row, stride_k_head, NUM_KV_HEADS, HALF, BM, FP8, FP8_MAX)
        else:  # V: row-scaled only
            y1 = (x1 * row_scale).to(dtype).to(tl.float32)
            y2 = (x2 * row_scale).to(dtype).to(tl.float32)
            _store_in_cache(y1, y2, v_cache_ptr, v_scale_ptr, head - NUM_HEADS - NUM_KV_HEADS, block, row, stored,
                            dims, stride_v_block, stride_v_row, stride_v_head, NUM_KV_HEADS, HALF, BM, FP8, FP8_MAX)


@triton.jit
def _store_in_cache(y1, y2, cache_ptr, scale_ptr, kv_head, block, row, stored, dims, stride_block, stride_row,
                    stride_head, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, BM: tl.constexpr,
                    FP8: tl.constexpr, FP8_MAX: tl.constexpr):
    """A KV head's two halves [BM, HALF] into the paged cache at each token's (block, row), encoded for it as
    kv_store does (an FP8 cache: divided by the head's scale, saturated)."""
    heads = kv_head + tl.zeros((BM,), tl.int32)  # each token row's KV head, as kv_store's encoder takes it
    cache_dtype = cache_ptr.dtype.element_ty
    dst = cache_ptr + block[:, None] * stride_block + row[:, None] * stride_row + kv_head * stride_head + dims[None, :]
    tl.store(dst, encode_for_cache(y1, scale_ptr, heads, NUM_KV_HEADS, FP8, FP8_MAX).to(cache_dtype), mask=stored)
    tl.store(dst + HALF, encode_for_cache(y2, scale_ptr, heads, NUM_KV_HEADS, FP8, FP8_MAX).to(cache_dtype),
             mask=stored)


def why_not(x: torch.Tensor, weight: torch.Tensor, num_heads: int, num_kv_heads: int, config: Config) -> str:
    """Why this product cannot run fused with `config` ("" when it can)."""
    head_dim = weight.shape[0] // (num_heads + 2 * num_kv_heads)
    if weight.shape[0] != (num_heads + 2 * num_kv_heads) * head_dim or head_dim < 32 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim}: the fused q/k/v product needs a power of two >= 32"
    if x.dim() != 2 or x.shape[1] != weight.shape[1] or x.stride(1) != 1 or not weight.is_contiguous():
        return f"x {tuple(x.shape)} and weight {tuple(weight.shape)} are not a row-major [M, K] by [N, K] product"
    if x.dtype != weight.dtype or not x.dtype.is_floating_point:
        return f"x {x.dtype} and weight {weight.dtype} differ"
    if config.split_k < 1 or weight.shape[1] % (config.block_k * config.split_k):
        return (f"K = {weight.shape[1]} is not a multiple of the tile's {config.block_k} times its {config.split_k} "
                f"split(s)")
    heads = num_heads + 2 * num_kv_heads
    if config.split_k > 1 and triton.cdiv(x.shape[0], config.block_m) * heads > linear.LOCKS:
        return f"{x.shape[0]} rows in blocks of {config.block_m} x {heads} heads need more than {linear.LOCKS} counters"
    return ""


def qkv_rotary_store(x: torch.Tensor, weight: torch.Tensor, num_heads: int, num_kv_heads: int,
                     positions: torch.Tensor, cos_sin_cache: torch.Tensor, q_weight: torch.Tensor | None,
                     k_weight: torch.Tensor | None, eps: float, x_eps: float, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: torch.Tensor | None,
                     v_scale: torch.Tensor | None, config: Config) -> torch.Tensor:
    """q [M, num_heads, D] of a decode step, and K and V stored in the cache, from x [M, K] (the residual stream)
    and the folded q/k/v weight [(num_heads + 2 num_kv_heads) D, K]: what `qkv_proj(x)` then `rotary.qk_store`
    with `row_scale_of=x` compute (norm_folding.attention_block), in one launch."""
    why = why_not(x, weight, num_heads, num_kv_heads, config)
    if why:
        raise ValueError(f"qkv_rotary_store: {why}")
    m, k = x.shape
    head_dim = weight.shape[0] // (num_heads + 2 * num_kv_heads)
    fp8 = is_fp8(k_cache.dtype)
    if fp8 and (k_scale is None or v_scale is None):
        raise ValueError(f"qkv_rotary_store: a {k_cache.dtype} cache needs k_scale and v_scale")
    q_out = torch.empty(m, num_heads, head_dim, dtype=x.dtype, device=x.device)
    if m == 0:
        return q_out
    has_norm = q_weight is not None
    heads, split = num_heads + 2 * num_kv_heads, config.split_k
    if split > 1:  # float32 partials [split, M, N] and sums of squares [split, heads, M]; the shared counters
        partial = torch.empty(split, m, weight.shape[0], dtype=torch.float32, device=x.device)
        squares = torch.empty(split, heads, m, dtype=torch.float32, device=x.device)
        locks = linear.split_counters(x.device)
    else:
        partial = squares = locks = q_out  # not read
    grid = (triton.cdiv(m, config.block_m), heads, split)
    _qkv_rotary_store_kernel[grid](
        x, weight, q_out, positions, cos_sin_cache, q_weight if has_norm else x, k_weight if has_norm else x, eps,
        x_eps, k_cache, v_cache, slot_mapping, k_scale if fp8 else cos_sin_cache, v_scale if fp8 else cos_sin_cache,
        partial, squares, locks, m, x.stride(0), cos_sin_cache.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        K=k, NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=head_dim // 2, BM=config.block_m,
        BK=config.block_k, SWAP=config.swap, HAS_NORM=has_norm, BLOCK_SIZE=k_cache.shape[1], FP8=fp8,
        FP8_MAX=fp8_max(k_cache.dtype) if fp8 else 0.0,
        PRECISION=dot_precision(x.dtype), SPLIT=split, num_warps=config.warps, num_stages=config.stages)
    return q_out


# (N, K) of the q/k/v weight -> [(largest M, configuration or None)] in increasing M, measured on an H200 in
# bfloat16 against cuBLAS + rotary.qk_store (`benchmarks/fused_products.py`, us a layer in graphs over 28 weight
# copies); other M, shapes and dtypes keep the two kernels. Qwen3-0.6B, round seventeen (split K included): M 1-16
# 6.72-7.24 us against 7.16-8.05 with K in 4 splits, M 32 7.57 against 8.12 in 2, M 48-64 7.90-7.94 against
# 8.18-8.19 in one; from M 96 the two kernels win (9.61 against 12.30 at 256). Without split K each program walks
# a whole head's 256 KB of weight through K, a latency chain of ~7.9 us whatever the number of programs.
TABLE: dict[tuple[int, int], list[tuple[int, Config | None]]] = {
    (4096, 1024): [(16, Config(16, 128, 4, 3, True, 4)), (32, Config(16, 128, 4, 3, True, 2)),
                   (64, Config(16, 128, 4, 3, True))],
}


def pick(m: int, n: int, k: int) -> Config | None:
    """The table's configuration for M rows of an [N, K] q/k/v weight, or None (cuBLAS + rotary.qk_store)."""
    for largest, config in TABLE.get((n, k), ()):
        if m <= largest:
            return config
    return None
