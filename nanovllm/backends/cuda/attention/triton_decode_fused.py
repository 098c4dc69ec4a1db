"""Decode attention with this step's q/k/v transform and KV store inside it: one launch where there were two.

A pure decode step ran `rotary.qk_store` (q/k RMSNorm + rotary of the q/k/v product's output, K and V into the
paged cache) and then the paged decode kernel, which read q and this token's K/V back. Here each decode program
(KV head, sequence, split) transforms its own group's q rows from the product's output, and the program whose
token range ends at the sequence's last position (this step's token) also transforms the KV head's k and v,
stores them in the cache for later steps, and attends to them from registers after the cached range: no other
program reads that position, so nothing waits on the store. With the cuda backend's folded norms
(norm_folding.py) q, k and v are first scaled by the 1/RMS of the residual row, as `rotary_qk_store` scales them.

Values are rounded where the two kernels round them (q, k and v to the model dtype; K/V quantised for an FP8
cache exactly as `kv_store` does; q widened to the dots' dtype), so the step matches the unfused kernels up to
the order of float32 sums. Shapes the split kernel does not serve (the plan's balanced schedule, a head dim that
is not a power of two) take the two kernels: `fused_decode` decides, the caller does not.
"""
import torch
import triton
import triton.language as tl

from nanovllm.backends.cuda.attention.triton_common import LOG2_E, dot_precision, fp8_dot_dtype, padded_head_dim
from nanovllm.backends.cuda.attention.triton_decode import (MAX_SPLITS, DecodePlan, combine_splits, decode_plan,
                                                            paged_decode)
from nanovllm.backends.cuda.attention.triton_decode_tiles import attend_range, normalise
from nanovllm.backends.cuda.elementwise import norm_rope, row_rms_scale
from nanovllm.backends.cuda.kv_store import encode_for_cache
from nanovllm.backends.cuda.rotary_store import rotary_qk_store
from nanovllm.core.kv_quant import fp8_max, is_fp8
from nanovllm.core.step_metadata import DecodeMetadata


# sm_90 registers a thread: the FP8 kernel needs ~120 (4 programs a SM where the unfused one, at 96, runs 5);
# None leaves it to the compiler. A cap of 96 spills ~48 bytes a thread (benchmarks/fused_decode.py times both)
FP8_MAX_REGISTERS: int | None = None


@triton.jit
def _fused_decode_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, cos_sin_ptr, q_w_ptr, k_w_ptr, eps, x_ptr, stride_x, x_eps,
    k_cache_ptr, v_cache_ptr, slot_mapping_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr, qk_scale, k_scale_ptr, v_scale_ptr, seq_order_ptr,
    stride_q_seq, stride_q_head, stride_k_seq, stride_k_head, stride_v_seq, stride_v_head, stride_cos_sin,
    stride_cache_block, stride_cache_row, stride_cache_head, stride_bt_seq, stride_o_seq, stride_o_head,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ASM: tl.constexpr, ORDERED: tl.constexpr, HAS_NORM: tl.constexpr,
    FP8_MAX: tl.constexpr, ROW_SCALE: tl.constexpr, X_SIZE: tl.constexpr, X_PAD: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    kv_head = tl.program_id(0)
    if ORDERED:
        seq = tl.load(seq_order_ptr + tl.program_id(1)).to(tl.int64)
    else:
        seq = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    context_len = tl.load(context_lens_ptr + seq)
    tiles_per_split = tl.cdiv(tl.cdiv(context_len, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, context_len)
    has_new = (start < end) & (end == context_len)  # this program's range holds the step's own token

    position = tl.load(positions_ptr + seq).to(tl.int64)
    cols = tl.arange(0, HALF)
    cos = tl.load(cos_sin_ptr + position * stride_cos_sin + cols)
    sin = tl.load(cos_sin_ptr + position * stride_cos_sin + HALF + cols)
    if ROW_SCALE:
        row_scale = row_rms_scale(x_ptr + seq * stride_x, x_eps, X_SIZE, X_PAD)
    else:
        row_scale = 1.0
    dtype = out_ptr.dtype.element_ty

    # the group's q rows (padding rows 0), halves as rotary leaves them, then side by side for the dots
    rows = tl.arange(0, GROUP_PAD)
    q1, q2 = norm_rope(q_ptr + seq * stride_q_seq + kv_head * GROUP * stride_q_head, stride_q_head, q_w_ptr, cos, sin,
                       rows, cols, eps, out_ptr, row_scale, GROUP, HALF, HAS_NORM, ROW_SCALE)
    q = tl.reshape(tl.permute(tl.join(q1.to(dtype), q2.to(dtype)), (0, 2, 1)), (GROUP_PAD, HEAD_DIM))
    if KV_FP8:  # as load_query: dims 2i and 2i+1 apart, widened to the dots' dtype
        q_even, q_odd = tl.split(tl.reshape(q, (GROUP_PAD, HALF, 2)))
        q, q_even, q_odd = q.to(DOT_DTYPE), q_even.to(DOT_DTYPE), q_odd.to(DOT_DTYPE)
    else:
        q_even = q
        q_odd = q

    if KV_FP8:  # stored = value / scale: K's scale goes into the scores, V's into the output (normalise)
        qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head)
        v_scale = tl.load(v_scale_ptr + kv_head)
    else:
        v_scale = 1.0
    acc, l_i, m_i = attend_range(
        q, q_even, q_odd, qk_scale, k_cache_ptr + kv_head * stride_cache_head,
        v_cache_ptr + kv_head * stride_cache_head, block_tables_ptr + seq * stride_bt_seq, start,
        end - has_new.to(tl.int32), stride_cache_block, stride_cache_row,
        GROUP_PAD, HEAD_DIM, HEAD_DIM, PAGE_SIZE, BLOCK_N, DOT_PRECISION, KV_FP8, DOT_DTYPE, ASM)
    # this token's k and v for the KV head, as a two-row tile of one row twice (tiles need a power of two rows),
    # as the cache stores them (FP8: quantised by the KV head's scale), then one float32 row each. After the loop:
    # before it, they would stay in registers through it (sm_90: 152 registers against 150 for bf16, 129 against
    # 120 for FP8)
    twice = tl.zeros([2], tl.int32)
    k1, k2 = norm_rope(k_ptr + seq * stride_k_seq + kv_head * stride_k_head, 0, k_w_ptr, cos, sin, twice, cols, eps,
                       out_ptr, row_scale, 1, HALF, HAS_NORM, ROW_SCALE)
    dims = tl.arange(0, HEAD_DIM)
    v = tl.load(v_ptr + seq * stride_v_seq + kv_head * stride_v_head + twice[:, None] + dims[None, :]).to(tl.float32)
    if ROW_SCALE:
        v = (v * row_scale).to(dtype).to(tl.float32)
    cache_dtype = k_cache_ptr.dtype.element_ty
    k_row1 = tl.max(encode_for_cache(k1, k_scale_ptr + kv_head, twice, 1, KV_FP8, FP8_MAX).to(cache_dtype)
                    .to(tl.float32), 0)
    k_row2 = tl.max(encode_for_cache(k2, k_scale_ptr + kv_head, twice, 1, KV_FP8, FP8_MAX).to(cache_dtype)
                    .to(tl.float32), 0)
    v_row = tl.max(encode_for_cache(v, v_scale_ptr + kv_head, twice, 1, KV_FP8, FP8_MAX).to(cache_dtype)
                   .to(tl.float32), 0)
    slot = tl.load(slot_mapping_ptr + seq)
    if has_new & (slot >= 0):  # graph padding (slot < 0) stores nothing
        head_base = ((slot // PAGE_SIZE) * stride_cache_block + (slot % PAGE_SIZE) * stride_cache_row
                     + kv_head * stride_cache_head)
        tl.store(k_cache_ptr + head_base + cols, k_row1.to(cache_dtype))
        tl.store(k_cache_ptr + head_base + HALF + cols, k_row2.to(cache_dtype))
        tl.store(v_cache_ptr + head_base + dims, v_row.to(cache_dtype))

    # the token's score per group row, as the dots compute it (q in the dots' dtype, K as stored)
    if KV_FP8:
        q1 = q1.to(dtype).to(DOT_DTYPE).to(tl.float32)
        q2 = q2.to(dtype).to(DOT_DTYPE).to(tl.float32)
    score = (tl.sum(q1 * k_row1[None, :], 1) + tl.sum(q2 * k_row2[None, :], 1)) * qk_scale

    # fold the token in as one more online-softmax step (nothing when this range does not hold it)
    score = tl.where(has_new, score, float("-inf"))
    m_new = tl.maximum(m_i, score)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(score - m_safe)
    acc = acc * alpha[:, None] + p[:, None] * v_row[None, :]
    part, lse = normalise(acc, l_i * alpha + p, m_new, v_scale)

    heads = kv_head * GROUP + rows
    head_mask = rows < GROUP
    if not SPLIT:
        tl.store(out_ptr + seq * stride_o_seq + heads[:, None] * stride_o_head + dims[None, :], part.to(dtype),
                 mask=head_mask[:, None])
    else:
        slot_id = (seq * tl.num_programs(0) * GROUP + heads) * num_splits + split
        tl.store(part_lse_ptr + slot_id, lse, mask=head_mask)
        tl.store(part_out_ptr + slot_id[:, None] * HEAD_DIM + dims[None, :], part, mask=head_mask[:, None])


def fused_plan(q: torch.Tensor, k_cache: torch.Tensor) -> DecodePlan | None:
    """The split kernel's plan for this launch shape when the fused kernel serves it, else None (the balanced
    schedule's shapes, head dims that are not a power of two, an empty batch: the two kernels serve those)."""
    num_seqs, _, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    plan = decode_plan(num_seqs, num_kv_heads, head_dim, block_size, q.dtype, k_cache.dtype, q.device)
    if plan.num_programs is not None or head_dim != padded_head_dim(head_dim) or num_seqs == 0:
        return None
    return plan


def fused_decode(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 cos_sin_cache: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, meta: DecodeMetadata,
                 scale: float, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                 row_scale_of: torch.Tensor | None = None, row_eps: float = 0.0) -> torch.Tensor:
    """`rotary_qk_store` then the paged decode kernel, in one launch where the split kernel serves the shape:
    q [S, H, D], k and v [S, KV, D] (one token a sequence, unit stride on D), arguments as the two take them;
    -> the attention output [S, H, D]. Issues no host sync (CUDA-graph safe)."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    kv_fp8 = is_fp8(k_cache.dtype)
    plan = fused_plan(q, k_cache)
    if plan is None:
        q, _ = rotary_qk_store(positions, q, k, v, cos_sin_cache, q_weight, k_weight, eps, k_cache, v_cache,
                               slot_mapping, False, k_scale, v_scale, row_scale_of, row_eps)
        return paged_decode(q, k_cache, v_cache, meta.context_lens, meta.block_tables, scale, k_scale=k_scale,
                            v_scale=v_scale, seq_order=meta.seq_order)
    if k.shape != v.shape or k.shape != (num_seqs, num_kv_heads, head_dim) or num_heads % num_kv_heads:
        raise ValueError(f"fused decode: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
                         f"caches {tuple(k_cache.shape)}")
    if any(t.stride(-1) != 1 for t in (q, k, v, k_cache)) or v_cache.stride() != k_cache.stride():
        raise ValueError("fused decode: q, k, v and the caches need a unit stride on head_dim, the caches one layout")
    if kv_fp8 and (k_scale is None or v_scale is None):
        raise ValueError(f"fused decode: a {k_cache.dtype} cache needs k_scale and v_scale")
    scaled = row_scale_of is not None
    if scaled and (row_scale_of.dim() != 2 or row_scale_of.shape[0] != num_seqs or row_scale_of.stride(-1) != 1):
        raise ValueError(f"fused decode: row_scale_of {tuple(row_scale_of.shape)} needs one row [n] with unit stride "
                         f"for each of the {num_seqs} sequences")
    splits, config = plan.num_splits, plan.config
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if splits > 1:
        part_out = torch.empty(num_seqs, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, num_heads, splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out
    has_norm = q_weight is not None
    x = row_scale_of if scaled else q
    group = num_heads // num_kv_heads
    _fused_decode_kernel[(num_kv_heads, num_seqs, splits)](
        q, k, v, positions, cos_sin_cache, q_weight if has_norm else q, k_weight if has_norm else k, eps,
        x, x.stride(0), row_eps, k_cache, v_cache, slot_mapping, meta.block_tables, meta.context_lens,
        out, part_out, part_lse, scale * LOG2_E, k_scale if kv_fp8 else cos_sin_cache,
        v_scale if kv_fp8 else cos_sin_cache, meta.seq_order if meta.seq_order is not None else meta.context_lens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, PAGE_SIZE=block_size,
        BLOCK_N=config.block_n, SPLIT=splits > 1, DOT_PRECISION=dot_precision(q.dtype), KV_FP8=kv_fp8,
        DOT_DTYPE=fp8_dot_dtype(q.dtype), ASM=q.device.type == "cuda", ORDERED=meta.seq_order is not None,
        HAS_NORM=has_norm, FP8_MAX=fp8_max(k_cache.dtype) if kv_fp8 else 0.0, ROW_SCALE=scaled,
        X_SIZE=x.shape[1] if scaled else 1, X_PAD=triton.next_power_of_2(x.shape[1]) if scaled else 1,
        num_warps=config.num_warps, num_stages=config.num_stages,
        **({"maxnreg": FP8_MAX_REGISTERS} if kv_fp8 and FP8_MAX_REGISTERS else {}),
    )
    if splits > 1:
        assert splits <= MAX_SPLITS
        combine_splits(part_out, part_lse, out, splits, head_dim, head_dim)
    return out
