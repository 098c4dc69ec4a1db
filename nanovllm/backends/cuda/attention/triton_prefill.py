"""Paged prefill attention in Triton: query chunks against their whole context through the block table.

Grid (num_heads / PACK, num_seqs, query tiles). A program takes BLOCK_M / PACK query positions of PACK query
heads that share a KV head (PACK = 1: one head), stacked as the BLOCK_M rows of one tile, so each K/V tile it
loads serves them all; the chunk is the last len_q positions of a context of len_k tokens, so position r sits at
len_k - len_q + r and is causal from there. Key tiles wholly before the tile's first position run
without masks; only the few tiles on the diagonal are masked. Heavy (late) query tiles are launched first.
Without a block table (no cached prefix) K/V come straight from this step's tensors. With one, K and V share
each tile's lookup; a big enough step's sequences with no cached prefix take a launch of their own that reads
this step's tensors (`paged_prefill`, `split_launch`); and an FP8 cache is read as FP8 and widened in registers
to float16 (exact for both FP8 formats, see triton_decode_tiles), its per-KV-head scales folded into the score
scale (K) and the output (V): the scores are then the exact products of q with the stored values, as in the
reference's float32 math on the dequantised cache.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nanovllm.backends.cuda.attention.triton_common import (LOG2_E, aligned_paged_row_offsets, dot_precision,
                                                           fp8_dot_dtype, head_dim_mask, padded_head_dim,
                                                           paged_row_offsets)
from nanovllm.core.kv_quant import is_fp8
from nanovllm.core.step_metadata import PrefillMetadata


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int  # query rows per program
    block_n: int  # context tokens per tile
    num_warps: int
    num_stages: int
    pack: int = 1  # query heads of one KV head per program (up to the largest power of two dividing the group)

    def heads_per_program(self, group: int) -> int:
        """How many of a KV head's `group` query heads one program takes: `pack`, or less where the group or the
        tile's rows do not divide by it (a power of two that divides both)."""
        heads = 1
        while heads * 2 <= self.pack and group % (heads * 2) == 0 and self.block_m % (heads * 2) == 0:
            heads *= 2
        return heads


SPLIT_LAUNCH_TOKENS = 8192  # query tokens from which a paged step may read its prefix-free sequences apart
SHORT_CONTEXT = 2048  # longest context (cached prefix + chunk) of a step that takes the short-context tiles


def prefill_config(head_dim: int, dtype: torch.dtype = torch.bfloat16, max_context: int | None = None,
                   kv_fp8: bool = False) -> PrefillConfig:
    """Tile shape by padded head dim and, at head_dim 128, the step's longest context and whether the launch reads
    an FP8 cache. float32 (exact-comparison runs only) gets small tiles: its 128x64 tiles would spill registers
    and fill shared memory.

    At head_dim 128 a step of short prompts (every context <= SHORT_CONTEXT) runs a few query tiles per sequence
    and KV head, and takes both query heads of a KV head in one program (Qwen3's group of two: K/V tiles read
    once for both): 64 rows (32 positions x 2 heads) by 32 tokens, 4 warps, or 64 by 64 when the launch reads an
    FP8 cache (its widening wants the longer tile). Long contexts keep 128x64 with 8 warps, one head a program.
    Measured on an H200 at Qwen3-0.6B's shape (`benchmarks/prefill_tiles.py`, RESULTS.md round twenty-two), us a
    layer against round twelve's 64x64 one-head tiles: 16,384 tokens of 100-1,024-token prompts, one continued,
    229.5 -> 213.0 (bf16) and 272.7 -> 266.6 (FP8); the same with no cache 207.3 -> 187.5; 16 x 1,024 241.4 ->
    230.0; 8 x 128 87.7 -> 91.6 (timed by launches; in CUDA graphs 7.3 us, FA2 varlen 10.3: round twenty-three).
    Round twelve: 128x64/8 warps against 64x64/4 312 -> 289 on the first step; 2 x 8,192 1,288 against 1,331 and a
    2,048-token chunk after 6,144 cached 355 against 373 (faster with the long-context tiles)."""
    if dtype == torch.float32:
        return PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    if head_dim <= 128:
        if max_context is not None and max_context <= SHORT_CONTEXT:
            if kv_fp8:
                return PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=3, pack=2)
            return PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=3, pack=2)
        return PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    return PrefillConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)


@triton.jit
def _attend_tile(q, acc, m_i, l_i, k_base, v_base, k_rows, v_rows, dims, dim_mask, tile_start, positions, kv_end,
                 qk_scale, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step of a query tile over the context tile starting at tile_start."""
    tokens = tile_start + tl.arange(0, BLOCK_N)
    if MASKED:
        kv_mask = (tokens < kv_end)[:, None] & dim_mask[None, :]
    else:
        kv_mask = dim_mask[None, :]  # all-true (folded away) unless head_dim is padded
    k = tl.load(k_base + k_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0).to(q.dtype)  # FP8: widened
    v = tl.load(v_base + v_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0).to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
    if MASKED:
        visible = (tokens[None, :] <= positions[:, None]) & (tokens < kv_end)[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _kv_rows(block_table_ptr, row_start, tile_start, kv_end, stride_block, stride_k_row, stride_v_row,
             PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Offsets of the K and V rows of context positions tile_start .. tile_start + BLOCK_N - 1."""
    if PAGED:  # one layout for both caches: the same offsets
        if (PAGE_SIZE & (PAGE_SIZE - 1)) == 0 and BLOCK_N % PAGE_SIZE == 0:
            rows = aligned_paged_row_offsets(block_table_ptr, tile_start, kv_end, stride_block, stride_k_row,
                                             PAGE_SIZE, BLOCK_N)
        else:
            rows = paged_row_offsets(block_table_ptr, tile_start, kv_end, stride_block, stride_k_row, PAGE_SIZE,
                                     BLOCK_N)
        return rows, rows
    else:  # this step's tensors: the sequence's tokens are consecutive rows from row_start
        tokens = (row_start + tile_start + tl.arange(0, BLOCK_N)).to(tl.int64)
        return tokens * stride_k_row, tokens * stride_v_row


@triton.jit(do_not_specialize=["prefix"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, block_tables_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr, out_ptr, qk_scale,
    k_scale_ptr, v_scale_ptr, stride_q_token, stride_q_head, stride_o_token, stride_o_head,
    stride_k_block, stride_k_row, stride_k_head, stride_v_row, stride_v_head, stride_bt_seq, prefix,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PAGED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr, DOT_DTYPE: tl.constexpr, PACK: tl.constexpr,
):
    """A program: BLOCK_M // PACK query positions of PACK heads sharing one KV head, a [BLOCK_M, head_dim] tile
    whose row i is position i // PACK of head i % PACK (a token's heads are adjacent in q and out)."""
    first_head = tl.program_id(0) * PACK
    seq = tl.program_id(1)
    tile = tl.num_programs(2) - 1 - tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    BLOCK_Q: tl.constexpr = BLOCK_M // PACK  # query positions per program
    m_start = tile * BLOCK_Q
    if m_start >= q_len:
        return
    kv_start = tl.load(cu_seqlens_k_ptr + seq)
    context_offset = tl.load(cu_seqlens_k_ptr + seq + 1) - kv_start - q_len  # cached tokens before the chunk
    # prefix 0: every sequence; 1: only those with no cached prefix; 2: only those with one (a split launch). Not
    # specialised on: one compiled kernel serves all three
    if prefix == 1:
        if context_offset != 0:
            return
    if prefix == 2:
        if context_offset == 0:
            return

    rows = m_start + tl.arange(0, BLOCK_M) // PACK
    heads = first_head + tl.arange(0, BLOCK_M) % PACK
    row_mask = rows < q_len
    positions = context_offset + rows
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = head_dim_mask(HEAD_DIM, HEAD_DIM_PAD)
    q_rows = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_q_token + heads[:, None] * stride_q_head + dims[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)

    kv_head = first_head // GROUP
    if KV_FP8:  # stored = value / scale: fold K's scale into the scores, V's into the output
        qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head)
        v_scale = tl.load(v_scale_ptr + kv_head)
        q = q.to(DOT_DTYPE)
    else:
        v_scale = 1.0
    k_base = k_ptr + kv_head * stride_k_head
    v_base = v_ptr + kv_head * stride_v_head
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    first_position = context_offset + m_start
    kv_end = context_offset + tl.minimum(m_start + BLOCK_Q, q_len)  # one past the last visible token
    full_end = (first_position + 1) // BLOCK_N * BLOCK_N  # tiles before this are visible to every row

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    # rows are looked up one tile ahead so K/V addresses never wait on a block-table load (see decode); unpaged,
    # a sequence's rows of this step's k/v start at its first query row
    k_rows, v_rows = _kv_rows(block_table_ptr, q_start, 0, kv_end, stride_k_block, stride_k_row, stride_v_row,
                              PAGED, PAGE_SIZE, BLOCK_N)
    for tile_start in range(0, full_end, BLOCK_N):
        next_k_rows, next_v_rows = _kv_rows(block_table_ptr, q_start, tile_start + BLOCK_N, kv_end, stride_k_block,
                                            stride_k_row, stride_v_row, PAGED, PAGE_SIZE, BLOCK_N)
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_base, v_base, k_rows, v_rows, dims, dim_mask, tile_start,
                                     positions, kv_end, qk_scale, False, BLOCK_N, DOT_PRECISION)
        k_rows, v_rows = next_k_rows, next_v_rows
    for tile_start in range(full_end, kv_end, BLOCK_N):
        next_k_rows, next_v_rows = _kv_rows(block_table_ptr, q_start, tile_start + BLOCK_N, kv_end, stride_k_block,
                                            stride_k_row, stride_v_row, PAGED, PAGE_SIZE, BLOCK_N)
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_base, v_base, k_rows, v_rows, dims, dim_mask, tile_start,
                                     positions, kv_end, qk_scale, True, BLOCK_N, DOT_PRECISION)
        k_rows, v_rows = next_k_rows, next_v_rows

    # every real row sees at least token 0, so l_i > 0 there; padding rows are not stored
    out = acc * (v_scale / tl.where(row_mask, l_i, 1.0))[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_o_token + heads[:, None] * stride_o_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


def paged_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: PrefillMetadata, scale: float, config: PrefillConfig | None = None,
                  out: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim] of this step;
    caches: [num_blocks, block_size, num_kv_heads, head_dim], one layout for both -> [num_tokens, num_heads,
    head_dim].

    With `meta.block_tables` the context is read through the caches (an FP8 cache with k_scale, v_scale:
    [num_kv_heads] float32), after this chunk's K/V were stored there; without it, from k and v (then cu_seqlens_k
    equals cu_seqlens_q). A cache in k's dtype holds exactly k and v for this chunk, so where `split_launch`
    says so a second launch serves the sequences with no cached prefix from k and v (consecutive rows, no
    block-table lookups) and the first only those continuing a prefix: on an H200 at Qwen3-0.6B's shape, a
    seed-like 16,384-token step with one continued prompt 280 -> 246 us, 16 x 1,024 tokens with one continued
    402 -> 334 us (RESULTS.md, round thirteen; outputs bit-identical). An FP8 cache is read as stored for every
    sequence, as the reference does. Writes into `out` if given."""
    num_tokens, num_heads, head_dim = q.shape
    paged = meta.block_tables is not None
    kv_fp8 = paged and is_fp8(k_cache.dtype)
    if kv_fp8 and (k_scale is None or v_scale is None):
        raise ValueError(f"prefill: a {k_cache.dtype} cache needs k_scale and v_scale")
    k_src, v_src = (k_cache, v_cache) if paged else (k, v)
    num_kv_heads = k_src.shape[-2]
    if k_src.shape[-1] != head_dim or num_heads % num_kv_heads or v_src.shape != k_src.shape:
        raise ValueError(f"prefill: q {tuple(q.shape)} does not fit k/v {tuple(k_src.shape)}, {tuple(v_src.shape)}")
    if head_dim > 256:
        raise ValueError(f"prefill: head_dim {head_dim} is over 256")
    if any(t.stride(-1) != 1 for t in (q, k_src, v_src)):
        raise ValueError("prefill: q, k, v and the caches need a unit stride on head_dim")
    if paged and k_cache.stride() != v_cache.stride():
        raise ValueError(f"prefill: the K and V caches need one layout (strides {k_cache.stride()} and "
                         f"{v_cache.stride()})")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"prefill: out {tuple(out.shape)} {out.dtype} must be shaped and typed like q "
                         f"{tuple(q.shape)} {q.dtype}, with a unit stride on head_dim")
    if num_tokens == 0:
        return out
    head_dim_pad = padded_head_dim(head_dim)
    config = config or prefill_config(head_dim_pad, q.dtype, meta.max_seqlen_k, kv_fp8)
    fresh = paged and not kv_fp8 and split_launch(meta, num_tokens) and all(
        t is not None and t.dtype == k_cache.dtype and t.shape == (num_tokens, num_kv_heads, head_dim)
        and t.stride(-1) == 1 for t in (k, v))
    if fresh:  # sequences with no cached prefix read k and v, the others the cache: two launches
        _launch(q, k, v, None, meta, out, scale, None, None, config, head_dim_pad, prefix=1)
        _launch(q, k_cache, v_cache, meta.block_tables, meta, out, scale, None, None, config, head_dim_pad, prefix=2)
    else:
        _launch(q, k_src, v_src, meta.block_tables, meta, out, scale, k_scale if kv_fp8 else None,
                v_scale if kv_fp8 else None, config, head_dim_pad, prefix=0)
    return out


def split_launch(meta: PrefillMetadata, num_tokens: int) -> bool:
    """Whether a paged step's prefix-free sequences take a launch of their own: when the step has
    SPLIT_LAUNCH_TOKENS query tokens or more and at least half of them are theirs (or the step does not say how
    many are). On an H200 at Qwen3-0.6B's shape, reading ~15,000 of them unpaged saved 34-68 us a layer, while a
    launch costs the host ~25-50 us (a step of 8 x 128 tokens took 102 us with two launches against 52 with one).
    The start-up warm-up's paged step (`warmup_steps.warm_up_full_steps`) is such a step at the default sizes, so
    both launches' kernels are compiled before the first request."""
    known = meta.prefix_free_tokens
    return known is None or (num_tokens >= SPLIT_LAUNCH_TOKENS and num_tokens <= 2 * known < 2 * num_tokens)


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_tables: torch.Tensor | None,
            meta: PrefillMetadata, out: torch.Tensor, scale: float, k_scale: torch.Tensor | None,
            v_scale: torch.Tensor | None, config: PrefillConfig, head_dim_pad: int, prefix: int) -> None:
    """One launch of the kernel over every sequence of the step (those of `prefix`, see the kernel): K/V from
    caches through `block_tables` (FP8 with scales), or from this step's k and v when it is None."""
    paged, kv_fp8 = block_tables is not None, k_scale is not None
    if paged:  # [num_blocks, block_size, num_kv_heads, head_dim], one layout for K and V
        page_size, strides = k.shape[1], (k.stride(0), k.stride(1), k.stride(2), v.stride(1), v.stride(2))
    else:  # [num_tokens, num_kv_heads, head_dim]: rows are tokens; the table pointer and block stride are unused
        block_tables, page_size, strides = meta.cu_seqlens_k, 1, (0, k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    num_heads, head_dim = q.shape[1], q.shape[2]
    group = num_heads // k.shape[-2]
    pack = config.heads_per_program(group)
    grid = (num_heads // pack, meta.num_seqs, triton.cdiv(meta.max_seqlen_q, config.block_m // pack))
    _prefill_kernel[grid](
        q, k, v, block_tables, meta.cu_seqlens_q, meta.cu_seqlens_k, out, scale * LOG2_E,
        k_scale if kv_fp8 else q, v_scale if kv_fp8 else q,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *strides, block_tables.stride(0) if paged else 0,
        prefix,
        GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, PAGE_SIZE=page_size,
        PAGED=paged, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        DOT_PRECISION=dot_precision(q.dtype), KV_FP8=kv_fp8, DOT_DTYPE=fp8_dot_dtype(q.dtype), PACK=pack,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, meta: PrefillMetadata, scale: float, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The `attention.prefill` op (cached prefixes and chunked prefill included; k_scale, v_scale: [num_kv_heads]
    float32 for an FP8 cache)."""
    return paged_prefill(q, k, v, k_cache, v_cache, meta, scale, k_scale=k_scale, v_scale=v_scale)
