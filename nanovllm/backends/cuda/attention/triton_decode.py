"""Paged decode attention in Triton, flash-decoding style.

Grid (num_seqs, num_kv_heads, num_splits). A program serves every query head of one KV head's group at
once (the group padded to >= 16 rows so the scores are one `tl.dot`), so each K/V tile is read from
memory once per KV head. Splits divide each sequence's context so that small batches still fill the
GPU; every program derives its token range from its own context length, so the launch depends only on
the batch and head counts and one captured CUDA graph serves every replay. With more than one split,
partial outputs and their log-sum-exp go to scratch and a small second kernel combines them.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nanovllm.backends.cuda.attention.triton_common import (LOG2_E, dot_precision, head_dim_mask, padded_head_dim,
                                                           paged_row_offsets)
from nanovllm.core.step_metadata import DecodeMetadata

MAX_SPLITS = 32


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int  # context tokens per tile
    num_warps: int
    num_stages: int


def decode_config(head_dim: int, block_size: int) -> DecodeConfig:
    """Tile shape for the split kernel. Decode is bound by K/V reads: 64-token tiles keep a 32 KiB
    K+V tile in flight per stage at head_dim 128, three stages deep, and still fit two programs per SM."""
    if head_dim > 128:
        return DecodeConfig(block_n=32, num_warps=4, num_stages=3)
    return DecodeConfig(block_n=64, num_warps=4, num_stages=3)


def num_programs_target(device: torch.device) -> int:
    """How many (sequence, KV head, split) programs fill the device: a few per SM."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 16  # the interpreter: enough to exercise splitting in tests


def choose_num_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits per sequence from the launch shape only (never the context length), so a CUDA graph
    captured for this batch size stays valid for any context lengths replayed into it."""
    programs = max(1, num_seqs * num_kv_heads)
    return max(1, min(MAX_SPLITS, -(-num_programs_target(device) // programs)))


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr, qk_scale,
    stride_q_seq, stride_q_head, stride_k_block, stride_k_row, stride_k_head,
    stride_v_block, stride_v_row, stride_v_head, stride_bt_seq, stride_o_seq, stride_o_head,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    tiles_per_split = tl.cdiv(tl.cdiv(context_len, BLOCK_N), NUM_SPLITS)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, context_len)

    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + rows
    head_mask = rows < GROUP
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = head_dim_mask(HEAD_DIM, HEAD_DIM_PAD)
    q = tl.load(q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
                mask=head_mask[:, None] & dim_mask[None, :], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    k_base = k_cache_ptr + kv_head * stride_k_head
    v_base = v_cache_ptr + kv_head * stride_v_head
    for tile_start in range(start, end, BLOCK_N):
        tokens = tile_start + tl.arange(0, BLOCK_N)
        token_mask = tokens < end
        k_rows = paged_row_offsets(block_table_ptr, tokens, token_mask, tile_start, stride_k_block, stride_k_row,
                                   PAGE_SIZE, BLOCK_N)
        v_rows = paged_row_offsets(block_table_ptr, tokens, token_mask, tile_start, stride_v_block, stride_v_row,
                                   PAGE_SIZE, BLOCK_N)
        kv_mask = token_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_base + k_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + v_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [GROUP_PAD, BLOCK_N], log2 units
        s = tl.where(token_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # an empty range (short context, or context_len 0 in a padded graph batch) contributes nothing
    has_tokens = l_i > 0
    part = tl.where(has_tokens[:, None], acc / tl.where(has_tokens, l_i, 1.0)[:, None], 0.0)
    if NUM_SPLITS == 1:
        tl.store(out_ptr + seq * stride_o_seq + heads[:, None] * stride_o_head + dims[None, :],
                 part.to(out_ptr.dtype.element_ty), mask=head_mask[:, None] & dim_mask[None, :])
    else:
        # scratch: part_out [num_seqs, num_heads, NUM_SPLITS, HEAD_DIM_PAD], part_lse [num_seqs, num_heads, NUM_SPLITS]
        slot = (seq.to(tl.int64) * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + split
        lse = tl.where(has_tokens, m_i + tl.log2(tl.where(has_tokens, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + slot, lse, mask=head_mask)
        tl.store(part_out_ptr + slot[:, None] * HEAD_DIM_PAD + dims[None, :], part, mask=head_mask[:, None])


@triton.jit
def _decode_combine_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, stride_o_seq, stride_o_head,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    base = (seq.to(tl.int64) * tl.num_programs(1) + head) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + base + splits, mask=splits < NUM_SPLITS, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    # every split empty (context_len 0): all weights 0 and the output 0, not NaN
    weights = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))
    parts = tl.load(part_out_ptr + (base + splits)[:, None] * HEAD_DIM_PAD + dims[None, :],
                    mask=(splits < NUM_SPLITS)[:, None], other=0.0)
    total = tl.sum(weights, 0)
    out = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_o_seq + head * stride_o_head + dims, out.to(out_ptr.dtype.element_ty),
             mask=head_dim_mask(HEAD_DIM, HEAD_DIM_PAD))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context_lens: torch.Tensor,
                 block_tables: torch.Tensor, scale: float, num_splits: int | None = None,
                 config: DecodeConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim];
    context_lens: [num_seqs] int32; block_tables: [num_seqs, max_blocks] int32 -> [num_seqs, num_heads, head_dim]
    (written into `out` when given). Issues no host sync, so it can be captured in a CUDA graph."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim or num_heads % num_kv_heads or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode: q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if head_dim > 256:
        raise ValueError(f"decode: head_dim {head_dim} is over 256")
    if any(t.stride(-1) != 1 for t in (q, k_cache, v_cache)):
        raise ValueError("decode: q and the caches need a unit stride on head_dim")
    out = _output(out, q)
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    head_dim_pad = padded_head_dim(head_dim)
    num_splits = num_splits or choose_num_splits(num_seqs, num_kv_heads, q.device)
    config = config or decode_config(head_dim_pad, block_size)
    if num_splits > 1:
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim_pad, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused by the single-split kernel
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse, scale * LOG2_E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        PAGE_SIZE=block_size,
        BLOCK_N=config.block_n, NUM_SPLITS=num_splits, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if num_splits > 1:
        _decode_combine_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad, num_warps=1 if head_dim_pad <= 64 else 2,
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
                     scale: float) -> torch.Tensor:
    """The `attention.decode` op: q [num_seqs, num_heads, head_dim], one token per sequence."""
    return paged_decode(q, k_cache, v_cache, meta.context_lens, meta.block_tables, scale)
