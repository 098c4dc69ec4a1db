"""Paged decode attention in Triton, flash-decoding style.

Grid (num_kv_heads, num_seqs, num_splits). A program serves every query head of one KV head's group at
once (the group padded to >= 16 rows so the scores are one `tl.dot`), so each K/V tile is read from
memory once per KV head. Splits divide each sequence's context so that small batches still fill the
GPU; every program derives its token range from its own context length, so the launch depends only on
the batch and head counts and one captured CUDA graph serves every replay. With more than one split,
partial outputs and their log-sum-exp go to scratch and a small second kernel combines them.
An FP8 cache is read as FP8 and widened in registers to float16 (exact for both FP8 formats, and one
native conversion on sm_89+, where widening to bfloat16 goes through float32), with the dots in float16;
its per-KV-head scales are folded into the score scale (K) and the output (V), so dequantising costs two
multiplies per program, not one per element. FP8 K and V are read as 16-bit words of two dims
(`widen_fp8_pairs`), even and odd dims in two dots each: P x V reads V transposed, which Triton 3.6 does a byte
at a time for an 8-bit tile; as words it is `ldmatrix.trans`. For q x K^T, a K tile widened from bytes takes a
q operand that Triton reloads from shared memory and re-packs every tile (16 loads + ~57 moves a warp on
sm_90); split into even and odd dims, q's two halves load with `ldmatrix` like any 16-bit operand.
"""
from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

from nanovllm.backends.cuda.attention.triton_common import (LOG2_E, aligned_paged_row_offsets, dot_precision,
                                                           fp8_dot_dtype, head_dim_mask, padded_head_dim,
                                                           paged_row_offsets, widen_fp8_pairs)
from nanovllm.core.kv_quant import is_fp8
from nanovllm.core.step_metadata import DecodeMetadata

MAX_SPLITS = 32  # a power of two: the combine kernel reads this many partials, masked
PROGRAMS_PER_SM = 1


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int  # context tokens per tile
    num_warps: int
    num_stages: int


def decode_config(head_dim: int, block_size: int, dtype: torch.dtype = torch.bfloat16,
                  kv_dtype: torch.dtype | None = None) -> DecodeConfig:
    """Tile shape for the split kernel. Decode is bound by K/V reads, so what matters is bytes in flight:
    at head_dim 128 a 64-token tile is 32 KiB of K+V, and num_stages 3 double-buffers it (~70 KiB of
    shared memory, ~96 registers a thread on sm_90): three programs per SM keep up to 192 KiB in flight,
    several times what HBM3 needs at its latency. `benchmarks/kernels_cuda.py --sweep` re-tunes this."""
    if head_dim > 128 or dtype == torch.float32:  # same bytes per tile for wider rows
        return DecodeConfig(block_n=32, num_warps=4, num_stages=3)
    if kv_dtype is not None and kv_dtype.itemsize == 1:
        # benchmarks/fp8_decode.py --sweep on an H200 (K as word pairs, longest first), batch 256 x 1k / mixed
        # lengths: (64, 4, 3) 146.2 / 149.0 us (0.86 of copy bandwidth); (64, 4, 4) 148.1 / 151.8, (64, 2, 4)
        # 149.1 / 153.5, (32, 4, 4) 173.9 / 150.0, 128-token tiles 156-169. Pages of 128+ tokens take 128-token
        # tiles: the 64-token tile spills there under Triton 3.9
        if block_size >= 128:
            return DecodeConfig(block_n=128, num_warps=4, num_stages=3)
        return DecodeConfig(block_n=64, num_warps=4, num_stages=3)
    return DecodeConfig(block_n=64, num_warps=4, num_stages=3)


@cache
def num_programs_target(device: torch.device) -> int:
    """How many (KV head, sequence, split) programs the split rule aims for: one per SM, so a batch is split
    only while its unsplit programs would leave SMs idle."""
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 16  # the interpreter: enough to exercise splitting in tests


def choose_num_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits per sequence from the launch shape only (never the context length), so a CUDA graph
    captured for this batch size stays valid for any context lengths replayed into it."""
    programs = max(1, num_seqs * num_kv_heads)
    # split only while unsplit programs would leave whole SMs idle: measured on an H100 (benchmarks/
    # sweep_splits.py, context 1200), one split reads K/V fastest from 16 sequences x 8 KV heads upwards
    # (0.59 of copy bandwidth against 0.30 with two splits at batch 16; 0.92 against 0.88 at batch 128)
    return max(1, min(MAX_SPLITS, num_programs_target(device) // programs))


@triton.jit
def _tile_rows(block_table_ptr, tile_start, end, stride_block, stride_row, PAGE_SIZE: tl.constexpr,
               BLOCK_N: tl.constexpr, KV_FP8: tl.constexpr):
    """FP8 tiles of whole pages take the aligned lookup: fewer integer instructions per byte matter twice as much
    with 1-byte K/V (on sm_90: 18% fewer instructions in the loop)."""
    if KV_FP8 and (PAGE_SIZE & (PAGE_SIZE - 1)) == 0 and BLOCK_N % PAGE_SIZE == 0:
        return aligned_paged_row_offsets(block_table_ptr, tile_start, end, stride_block, stride_row, PAGE_SIZE, BLOCK_N)
    else:
        return paged_row_offsets(block_table_ptr, tile_start, end, stride_block, stride_row, PAGE_SIZE, BLOCK_N)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr, qk_scale, k_scale_ptr, v_scale_ptr, seq_order_ptr,
    stride_q_seq, stride_q_head, stride_cache_block, stride_cache_row, stride_cache_head,
    stride_bt_seq, stride_o_seq, stride_o_head,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr, DOT_DTYPE: tl.constexpr, ASM: tl.constexpr, ORDERED: tl.constexpr,
):
    kv_head = tl.program_id(0)  # fastest: the KV heads of a token, adjacent in the cache, are read together
    if ORDERED:  # programs start in launch order: the longest sequences first leave the shortest for the tail
        seq = tl.load(seq_order_ptr + tl.program_id(1))
    else:
        seq = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)  # a launch dimension, not a constant: one compiled kernel serves all
    context_len = tl.load(context_lens_ptr + seq)
    tiles_per_split = tl.cdiv(tl.cdiv(context_len, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, context_len)

    group_rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + group_rows
    head_mask = group_rows < GROUP
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = head_dim_mask(HEAD_DIM, HEAD_DIM_PAD)
    q = tl.load(q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
                mask=head_mask[:, None] & dim_mask[None, :], other=0.0)
    # FP8: K and V read as 16-bit words of two dims (see widen_fp8_pairs); q's even and odd dims apart
    pairs = tl.arange(0, HEAD_DIM_PAD // 2)
    pair_mask = head_dim_mask(HEAD_DIM // 2, HEAD_DIM_PAD // 2)
    if KV_FP8:  # stored = value / scale: fold K's scale into the scores, V's into the output
        qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head)
        v_scale = tl.load(v_scale_ptr + kv_head)
        q = q.to(DOT_DTYPE)
        q_pair_ptr = q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + 2 * pairs[None, :]
        q_pair_mask = head_mask[:, None] & pair_mask[None, :]
        q_even = tl.load(q_pair_ptr, mask=q_pair_mask, other=0.0).to(DOT_DTYPE)
        q_odd = tl.load(q_pair_ptr + 1, mask=q_pair_mask, other=0.0).to(DOT_DTYPE)
    else:
        v_scale = 1.0

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    # the softmax denominator is summed per token column and reduced once after the loop: warps split a tile's
    # tokens, so a per-tile row sum is a cross-warp reduction through shared memory (two barriers) each tile
    l_cols = tl.zeros([GROUP_PAD, BLOCK_N], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    k_base = k_cache_ptr + kv_head * stride_cache_head
    v_base = v_cache_ptr + kv_head * stride_cache_head
    k_words = k_base.to(tl.pointer_type(tl.uint16))
    v_words = v_base.to(tl.pointer_type(tl.uint16))
    acc_even = tl.zeros([GROUP_PAD, HEAD_DIM_PAD // 2], tl.float32)
    acc_odd = tl.zeros([GROUP_PAD, HEAD_DIM_PAD // 2], tl.float32)
    # the next tile's rows are looked up one iteration ahead, so its K/V addresses do not wait on a
    # block-table load: that lets the compiler keep num_stages - 1 tiles in flight while this one computes
    rows = _tile_rows(block_table_ptr, start, end, stride_cache_block, stride_cache_row, PAGE_SIZE, BLOCK_N, KV_FP8)
    for tile_start in range(start, end, BLOCK_N):
        next_rows = _tile_rows(block_table_ptr, tile_start + BLOCK_N, end, stride_cache_block, stride_cache_row,
                               PAGE_SIZE, BLOCK_N, KV_FP8)
        token_mask = tile_start + tl.arange(0, BLOCK_N) < end
        kv_mask = token_mask[:, None] & dim_mask[None, :]
        if KV_FP8:  # dims 2i and 2i+1 in two dots (no reordering of K's operand); see widen_fp8_pairs
            words = tl.load(k_words + (rows >> 1)[:, None] + pairs[None, :],
                            mask=token_mask[:, None] & pair_mask[None, :], other=0)
            k_even, k_odd = widen_fp8_pairs(words, k_cache_ptr.dtype.element_ty, ASM)
            s = tl.dot(q_even, tl.trans(k_even.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
            s = tl.dot(q_odd, tl.trans(k_odd.to(DOT_DTYPE)), s, input_precision=DOT_PRECISION)
        else:
            k = tl.load(k_base + rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        # scores in log2 units are s * qk_scale (> 0): the scale goes into the row max once and into the
        # exponent's fused multiply-add, not a multiply per score
        s = tl.where(token_mask[None, :], s, float("-inf"))  # [GROUP_PAD, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l_cols = l_cols * alpha[:, None] + p
        if KV_FP8:
            words = tl.load(v_words + (rows >> 1)[:, None] + pairs[None, :],
                            mask=token_mask[:, None] & pair_mask[None, :], other=0)
            v_even, v_odd = widen_fp8_pairs(words, v_cache_ptr.dtype.element_ty, ASM)
            p = p.to(DOT_DTYPE)
            acc_even = acc_even * alpha[:, None] + tl.dot(p, v_even.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            acc_odd = acc_odd * alpha[:, None] + tl.dot(p, v_odd.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        else:
            v = tl.load(v_base + rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        rows = next_rows

    # an empty range (short context, or context_len 0 in a padded graph batch) contributes nothing
    if KV_FP8:  # dims 2i and 2i+1 back side by side
        acc = tl.reshape(tl.join(acc_even, acc_odd), [GROUP_PAD, HEAD_DIM_PAD])
    l_i = tl.sum(l_cols, 1)
    has_tokens = l_i > 0
    part = tl.where(has_tokens[:, None], acc * (v_scale / tl.where(has_tokens, l_i, 1.0))[:, None], 0.0)
    if not SPLIT:
        tl.store(out_ptr + seq * stride_o_seq + heads[:, None] * stride_o_head + dims[None, :],
                 part.to(out_ptr.dtype.element_ty), mask=head_mask[:, None] & dim_mask[None, :])
    else:
        # scratch: part_out [num_seqs, num_heads, num_splits, HEAD_DIM_PAD], part_lse [num_seqs, num_heads, num_splits]
        slot = (seq.to(tl.int64) * tl.num_programs(0) * GROUP + heads) * num_splits + split
        lse = tl.where(has_tokens, m_i + tl.log2(tl.where(has_tokens, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + slot, lse, mask=head_mask)
        tl.store(part_out_ptr + slot[:, None] * HEAD_DIM_PAD + dims[None, :], part, mask=head_mask[:, None])


@triton.jit(do_not_specialize=["num_splits"])
def _decode_combine_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, stride_o_seq, stride_o_head,
    num_splits, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    head = tl.program_id(0)
    seq = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    base = (seq.to(tl.int64) * tl.num_programs(0) + head) * num_splits
    lse = tl.load(part_lse_ptr + base + splits, mask=splits < num_splits, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    # every split empty (context_len 0): all weights 0 and the output 0, not NaN
    weights = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))
    parts = tl.load(part_out_ptr + (base + splits)[:, None] * HEAD_DIM_PAD + dims[None, :],
                    mask=(splits < num_splits)[:, None], other=0.0)
    total = tl.sum(weights, 0)
    out = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_o_seq + head * stride_o_head + dims, out.to(out_ptr.dtype.element_ty),
             mask=head_dim_mask(HEAD_DIM, HEAD_DIM_PAD))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context_lens: torch.Tensor,
                 block_tables: torch.Tensor, scale: float, num_splits: int | None = None,
                 config: DecodeConfig | None = None, out: torch.Tensor | None = None,
                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                 seq_order: torch.Tensor | None = None) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim];
    context_lens: [num_seqs] int32; block_tables: [num_seqs, max_blocks] int32 -> [num_seqs, num_heads, head_dim]
    (written into `out` when given); k_scale, v_scale: [num_kv_heads] float32 for an FP8 cache; seq_order:
    [num_seqs] int32, a permutation of the sequences in the order their programs should start (longest first,
    see `core/step_metadata.longest_first`). Issues no host sync, so it can be captured in a CUDA graph."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim or num_heads % num_kv_heads or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode: q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    if head_dim > 256:
        raise ValueError(f"decode: head_dim {head_dim} is over 256")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("decode: q and the caches need a unit stride on head_dim, and the two caches one layout")
    kv_fp8 = is_fp8(k_cache.dtype)
    if kv_fp8 and (k_scale is None or v_scale is None):
        raise ValueError(f"decode: a {k_cache.dtype} cache needs k_scale and v_scale")
    if kv_fp8 and (head_dim % 2 or head_dim <= 16 or any(s % 2 for s in k_cache.stride()[:3])):
        raise ValueError(f"decode: an FP8 cache is read in byte pairs and needs an even head_dim above 16 and even "
                         f"strides (got head_dim {head_dim}, strides {k_cache.stride()})")
    if seq_order is not None and (seq_order.shape != (num_seqs,) or seq_order.dtype != torch.int32):
        raise ValueError(f"decode: seq_order must be [num_seqs] = [{num_seqs}] int32 (a permutation, see "
                         f"core/step_metadata.longest_first), got {tuple(seq_order.shape)} {seq_order.dtype}")
    out = _output(out, q)
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    head_dim_pad = padded_head_dim(head_dim)
    num_splits = num_splits or choose_num_splits(num_seqs, num_kv_heads, q.device)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"decode: num_splits {num_splits} is not in [1, {MAX_SPLITS}]")
    config = config or decode_config(head_dim_pad, block_size, q.dtype, k_cache.dtype)
    if num_splits > 1:
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim_pad, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused by the single-split kernel
    _decode_split_kernel[(num_kv_heads, num_seqs, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse, scale * LOG2_E,
        k_scale if kv_fp8 else q, v_scale if kv_fp8 else q, seq_order if seq_order is not None else context_lens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        PAGE_SIZE=block_size, BLOCK_N=config.block_n, SPLIT=num_splits > 1, DOT_PRECISION=dot_precision(q.dtype),
        KV_FP8=kv_fp8, DOT_DTYPE=fp8_dot_dtype(q.dtype), ASM=q.device.type == "cuda", ORDERED=seq_order is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if num_splits > 1:
        _decode_combine_kernel[(num_heads, num_seqs)](
            part_out, part_lse, out, out.stride(0), out.stride(1),
            num_splits, SPLITS_PAD=MAX_SPLITS, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, num_warps=4,
        )
    return out


def _output(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} must be shaped and typed like q "
                         f"{tuple(q.shape)} {q.dtype}, with a unit stride on head_dim")
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: DecodeMetadata,
                     scale: float, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The `attention.decode` op: q [num_seqs, num_heads, head_dim], one token per sequence."""
    return paged_decode(q, k_cache, v_cache, meta.context_lens, meta.block_tables, scale, k_scale=k_scale,
                        v_scale=v_scale, seq_order=meta.seq_order)
