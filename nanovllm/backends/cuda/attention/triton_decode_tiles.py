"""The inner part of both paged decode kernels (`triton_decode`, `triton_decode_balanced`): one KV head's query rows,
attended over one token range of one sequence's pages, as Triton device functions (inlined where called).

A program serves every query head of one KV head's group at once (the group padded to >= 16 rows so the scores
are one `tl.dot`), so each K/V tile is read from memory once per KV head. An FP8 cache is read as FP8 and
widened in registers to float16 (exact for both FP8 formats, and one native conversion on sm_89+, where widening
to bfloat16 goes through float32), with the dots in float16; its per-KV-head scales are folded into the score
scale (K) and the output (V), so dequantising costs two multiplies per range, not one per element. FP8 K and V
are read as 16-bit words of two dims (`widen_fp8_pairs`), even and odd dims in two dots each: P x V reads V
transposed, which Triton 3.6 does a byte at a time for an 8-bit tile; as words it is `ldmatrix.trans`. For
q x K^T, a K tile widened from bytes takes a q operand that Triton reloads from shared memory and re-packs
every tile (16 loads + ~57 moves a warp on sm_90); split into even and odd dims, q's two halves load with
`ldmatrix` like any 16-bit operand.
"""
import triton
import triton.language as tl

from nanovllm.backends.cuda.attention.triton_common import (aligned_paged_row_offsets, head_dim_mask,
                                                           paged_row_offsets, widen_fp8_pairs)


@triton.jit
def tile_rows(block_table_ptr, tile_start, end, stride_block, stride_row, PAGE_SIZE: tl.constexpr,
              BLOCK_N: tl.constexpr, KV_FP8: tl.constexpr):
    """FP8 tiles of whole pages take the aligned lookup: fewer integer instructions per byte matter twice as much
    with 1-byte K/V (on sm_90: 18% fewer instructions in the loop)."""
    if KV_FP8 and (PAGE_SIZE & (PAGE_SIZE - 1)) == 0 and BLOCK_N % PAGE_SIZE == 0:
        return aligned_paged_row_offsets(block_table_ptr, tile_start, end, stride_block, stride_row, PAGE_SIZE, BLOCK_N)
    else:
        return paged_row_offsets(block_table_ptr, tile_start, end, stride_block, stride_row, PAGE_SIZE, BLOCK_N)


@triton.jit
def load_query(q_ptr, seq, kv_head, stride_q_seq, stride_q_head, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
               HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, KV_FP8: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """-> (q, q_even, q_odd): the group's query rows [GROUP_PAD, HEAD_DIM_PAD] (padding rows 0) and, for an FP8
    cache, its even and odd dims apart in DOT_DTYPE (see widen_fp8_pairs); without FP8 both are q."""
    group_rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + group_rows
    head_mask = group_rows < GROUP
    dims = tl.arange(0, HEAD_DIM_PAD)
    row_ptr = q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head
    q = tl.load(row_ptr + dims[None, :], mask=head_mask[:, None] & head_dim_mask(HEAD_DIM, HEAD_DIM_PAD)[None, :],
                other=0.0)
    if KV_FP8:
        pairs = tl.arange(0, HEAD_DIM_PAD // 2)
        pair_mask = head_mask[:, None] & head_dim_mask(HEAD_DIM // 2, HEAD_DIM_PAD // 2)[None, :]
        q_even = tl.load(row_ptr + 2 * pairs[None, :], mask=pair_mask, other=0.0).to(DOT_DTYPE)
        q_odd = tl.load(row_ptr + 2 * pairs[None, :] + 1, mask=pair_mask, other=0.0).to(DOT_DTYPE)
        return q.to(DOT_DTYPE), q_even, q_odd
    else:
        return q, q, q


@triton.jit
def attend_range(q, q_even, q_odd, qk_scale, k_base, v_base, block_table_ptr, start, end, lookup_end,
                 stride_cache_block, stride_cache_row, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                 HEAD_DIM_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr, DOT_DTYPE: tl.constexpr, ASM: tl.constexpr):
    """Context tokens start .. end - 1 (start a multiple of BLOCK_N) of the sequence whose block-table row starts at
    `block_table_ptr`, for the query rows from `load_query` -> (acc [GROUP_PAD, HEAD_DIM_PAD] unnormalised, l_i,
    m_i [GROUP_PAD]): sum of exp2(s - m_i) V, its denominator and the running max, scores s in log2 units (qk_scale
    includes log2(e) and, for FP8, K's scale). An empty range gives acc 0, l_i 0, m_i -inf.

    `lookup_end` bounds the positions whose block-table entries are read (K/V rows past `end` are never loaded):
    `end`, or the row's whole width when the caller knows `start` without the context length, so the first
    tile's table entries load beside the context length rather than after it (one dependent load fewer)."""
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = head_dim_mask(HEAD_DIM, HEAD_DIM_PAD)
    pairs = tl.arange(0, HEAD_DIM_PAD // 2)
    pair_mask = head_dim_mask(HEAD_DIM // 2, HEAD_DIM_PAD // 2)
    k_words = k_base.to(tl.pointer_type(tl.uint16))
    v_words = v_base.to(tl.pointer_type(tl.uint16))
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    # the softmax denominator is summed per token column and reduced once after the loop: warps split a tile's
    # tokens, so a per-tile row sum is a cross-warp reduction through shared memory (two barriers) each tile
    l_cols = tl.zeros([GROUP_PAD, BLOCK_N], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    acc_even = tl.zeros([GROUP_PAD, HEAD_DIM_PAD // 2], tl.float32)
    acc_odd = tl.zeros([GROUP_PAD, HEAD_DIM_PAD // 2], tl.float32)
    # the next tile's rows are looked up one iteration ahead, so its K/V addresses do not wait on a
    # block-table load: that lets the compiler keep num_stages - 1 tiles in flight while this one computes
    rows = tile_rows(block_table_ptr, start, lookup_end, stride_cache_block, stride_cache_row, PAGE_SIZE, BLOCK_N,
                     KV_FP8)
    for tile_start in range(start, end, BLOCK_N):
        next_rows = tile_rows(block_table_ptr, tile_start + BLOCK_N, lookup_end, stride_cache_block, stride_cache_row,
                              PAGE_SIZE, BLOCK_N, KV_FP8)
        token_mask = tile_start + tl.arange(0, BLOCK_N) < end
        kv_mask = token_mask[:, None] & dim_mask[None, :]
        if KV_FP8:  # dims 2i and 2i+1 in two dots (no reordering of K's operand); see widen_fp8_pairs
            words = tl.load(k_words + (rows >> 1)[:, None] + pairs[None, :],
                            mask=token_mask[:, None] & pair_mask[None, :], other=0)
            k_even, k_odd = widen_fp8_pairs(words, k_base.dtype.element_ty, ASM)
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
            v_even, v_odd = widen_fp8_pairs(words, v_base.dtype.element_ty, ASM)
            p = p.to(DOT_DTYPE)
            acc_even = acc_even * alpha[:, None] + tl.dot(p, v_even.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            acc_odd = acc_odd * alpha[:, None] + tl.dot(p, v_odd.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        else:
            v = tl.load(v_base + rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        rows = next_rows
    if KV_FP8:  # dims 2i and 2i+1 back side by side
        acc = tl.reshape(tl.join(acc_even, acc_odd), [GROUP_PAD, HEAD_DIM_PAD])
    return acc, tl.sum(l_cols, 1), m_i


@triton.jit
def normalise(acc, l_i, m_i, v_scale):
    """-> (the range's output acc / l_i times V's scale, its log-sum-exp in log2 units); an empty range (a short
    context, or context_len 0 in a padded graph batch) gives 0 and -inf, which the combine weighs 0."""
    has_tokens = l_i > 0
    l_safe = tl.where(has_tokens, l_i, 1.0)
    part = tl.where(has_tokens[:, None], acc * (v_scale / l_safe)[:, None], 0.0)
    lse = tl.where(has_tokens, m_i + tl.log2(l_safe), float("-inf"))
    return part, lse
