"""Paged decode attention in Triton, flash-decoding style, and the choice of schedule for a launch shape.

Grid (num_kv_heads, num_seqs, num_splits). A program serves every query head of one KV head's group at once
(`triton_decode_tiles`, shared with the balanced schedule), so each K/V tile is read from memory once per KV
head. Splits divide each sequence's context so that small batches still fill the GPU; every program derives its
token range from its own context length, so the launch depends only on the batch and head counts and one
captured CUDA graph serves every replay. With more than one split, partial outputs and their log-sum-exp go to
scratch and a small second kernel combines them. `decode_plan` picks this kernel's tile config and split count,
or the load-balanced schedule (`triton_decode_balanced`), from the launch shape alone.
"""
from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

from nanovllm.backends.cuda.attention.triton_common import (LOG2_E, dot_precision, fp8_dot_dtype, head_dim_mask,
                                                           padded_head_dim)
from nanovllm.backends.cuda.attention.triton_decode_balanced import balanced_decode
from nanovllm.backends.cuda.attention.triton_decode_tiles import attend_range, load_query, normalise
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
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 16 under the interpreter (enough to exercise every schedule)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 16


def num_programs_target(device: torch.device) -> int:
    """How many (KV head, sequence, split) programs the split rule aims for: one per SM, so a batch is split
    only while its unsplit programs would leave SMs idle."""
    return PROGRAMS_PER_SM * num_sms(device)


@dataclass(frozen=True)
class DecodePlan:
    """Which schedule serves a launch shape: the split kernel with num_splits splits a sequence, or (num_programs
    set) the balanced schedule with that many programs a KV head; with its tile config."""
    config: DecodeConfig
    num_splits: int = 1
    num_programs: int | None = None


WIDE_TILES = DecodeConfig(128, 8, 3)  # twice the bytes in flight a program: for SMs that hold few programs
DEEP_PIPELINE = DecodeConfig(64, 4, 4)  # two programs a SM (not three) over one more stage each


def decode_plan(num_seqs: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                kv_dtype: torch.dtype, device: torch.device) -> DecodePlan:
    """The schedule for a launch shape (never the context lengths: one CUDA graph per batch size replays any),
    by (KV head, sequence) programs a SM. Measured on an H200 at head_dim 128 and 16-token pages, timed in CUDA
    graphs as the engine runs them, on uniform, mixed and padded (a third of rows empty) batches
    (`benchmarks/sweep_splits.py`, benchmarks/RESULTS.md): where few programs share an SM, wider tiles (FP8 from a
    fifth of a program a SM to two, bf16 from a quarter to a half) or, for bf16 from a half to one a SM, the
    balanced schedule (mixed and padded batches leave most of the split kernel's SMs idle behind the longest
    sequence); at three to four a SM (bf16) a deeper pipeline over two programs a SM rather than 1.3 waves of
    three. Other shapes, and everything not measured better: `decode_config`, split while there is less than one
    program a SM."""
    config = decode_config(padded_head_dim(head_dim), block_size, dtype, kv_dtype)
    splits = choose_num_splits(num_seqs, num_kv_heads, device)
    if config != DecodeConfig(64, 4, 3) or padded_head_dim(head_dim) != 128 or block_size > 32:
        return DecodePlan(config, num_splits=splits)
    sms = num_sms(device)
    per_sm = num_seqs * num_kv_heads / sms
    if kv_dtype.itemsize == 1:
        return DecodePlan(WIDE_TILES if 0.2 < per_sm <= 2 else config, num_splits=splits)
    if 0.25 < per_sm <= 0.5:
        return DecodePlan(WIDE_TILES, num_splits=splits)
    if 0.5 < per_sm <= 1:
        return DecodePlan(config, num_programs=-(-2 * sms // num_kv_heads))
    if 3 < per_sm <= 4:
        return DecodePlan(DEEP_PIPELINE, num_splits=splits)
    return DecodePlan(config, num_splits=splits)


def choose_num_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits per sequence from the launch shape only (never the context length), so a CUDA graph
    captured for this batch size stays valid for any context lengths replayed into it."""
    programs = max(1, num_seqs * num_kv_heads)
    # split only while unsplit programs would leave whole SMs idle: measured on an H100 (benchmarks/
    # sweep_splits.py, context 1200), one split reads K/V fastest from 16 sequences x 8 KV heads upwards
    # (0.59 of copy bandwidth against 0.30 with two splits at batch 16; 0.92 against 0.88 at batch 128)
    return max(1, min(MAX_SPLITS, num_programs_target(device) // programs))


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr, qk_scale, k_scale_ptr, v_scale_ptr, seq_order_ptr, table_width,
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
    if SPLIT or KV_FP8:
        tiles_per_split = tl.cdiv(tl.cdiv(context_len, BLOCK_N), num_splits)
        start = split * tiles_per_split * BLOCK_N
        end = tl.minimum(start + tiles_per_split * BLOCK_N, context_len)
        lookup_end = end
    else:
        # the whole context from 0: the first tile's block-table entries (and q) load beside the context length,
        # not after it. Each program starts one memory latency sooner, which counts once a wave: on an H200, at
        # Qwen3-0.6B's shape, -2.1 / -2.0 / -1.5 / -0.9 us a launch at batch 256 / 128 / 64 / 32 (1.1% at 256).
        # The FP8 kernel lost 4.7 / 2.2 us at 256 / 128 the same way (RESULTS.md, round eleven): not there
        start = 0
        end = context_len
        lookup_end = table_width * PAGE_SIZE

    q, q_even, q_odd = load_query(q_ptr, seq, kv_head, stride_q_seq, stride_q_head, GROUP, GROUP_PAD, HEAD_DIM,
                                  HEAD_DIM_PAD, KV_FP8, DOT_DTYPE)
    if KV_FP8:  # stored = value / scale: fold K's scale into the scores, V's into the output
        qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head)
        v_scale = tl.load(v_scale_ptr + kv_head)
    else:
        v_scale = 1.0
    acc, l_i, m_i = attend_range(
        q, q_even, q_odd, qk_scale, k_cache_ptr + kv_head * stride_cache_head,
        v_cache_ptr + kv_head * stride_cache_head, block_tables_ptr + seq.to(tl.int64) * stride_bt_seq, start, end,
        lookup_end, stride_cache_block, stride_cache_row,
        GROUP_PAD, HEAD_DIM, HEAD_DIM_PAD, PAGE_SIZE, BLOCK_N, DOT_PRECISION, KV_FP8, DOT_DTYPE, ASM)
    part, lse = normalise(acc, l_i, m_i, v_scale)

    group_rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + group_rows
    head_mask = group_rows < GROUP
    dims = tl.arange(0, HEAD_DIM_PAD)
    if not SPLIT:
        tl.store(out_ptr + seq * stride_o_seq + heads[:, None] * stride_o_head + dims[None, :],
                 part.to(out_ptr.dtype.element_ty),
                 mask=head_mask[:, None] & head_dim_mask(HEAD_DIM, HEAD_DIM_PAD)[None, :])
    else:
        # scratch: part_out [num_seqs, num_heads, num_splits, HEAD_DIM_PAD], part_lse [num_seqs, num_heads, num_splits]
        slot = (seq.to(tl.int64) * tl.num_programs(0) * GROUP + heads) * num_splits + split
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
                 seq_order: torch.Tensor | None = None, num_programs: int | None = None) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim];
    context_lens: [num_seqs] int32; block_tables: [num_seqs, max_blocks] int32 -> [num_seqs, num_heads, head_dim]
    (written into `out` when given); k_scale, v_scale: [num_kv_heads] float32 for an FP8 cache; seq_order:
    [num_seqs] int32, a permutation of the sequences in the order their programs should start (longest first,
    see `core/step_metadata.longest_first`). num_splits picks the split kernel with that many splits a sequence,
    num_programs the balanced schedule (`triton_decode_balanced`) with that many programs a KV head; neither:
    `decode_plan` picks from the launch shape. Issues no host sync, so it can be captured in a CUDA graph."""
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
    if num_splits is None and num_programs is None:
        plan = decode_plan(num_seqs, num_kv_heads, head_dim, block_size, q.dtype, k_cache.dtype, q.device)
        config = config or plan.config
        num_splits, num_programs = (None, plan.num_programs) if plan.num_programs else (plan.num_splits, None)
    config = config or decode_config(padded_head_dim(head_dim), block_size, q.dtype, k_cache.dtype)
    if num_programs is not None and num_splits is None:
        if num_programs < 1:
            raise ValueError(f"decode: num_programs {num_programs} must be at least 1")
        return balanced_decode(q, k_cache, v_cache, context_lens, block_tables, scale, out, num_programs,
                               config.block_n, config.num_warps, config.num_stages, k_scale if kv_fp8 else None,
                               v_scale if kv_fp8 else None, seq_order)
    group = num_heads // num_kv_heads
    head_dim_pad = padded_head_dim(head_dim)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"decode: num_splits {num_splits} is not in [1, {MAX_SPLITS}]")
    if num_splits > 1:
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim_pad, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused by the single-split kernel
    _decode_split_kernel[(num_kv_heads, num_seqs, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse, scale * LOG2_E,
        k_scale if kv_fp8 else q, v_scale if kv_fp8 else q, seq_order if seq_order is not None else context_lens,
        block_tables.shape[1], q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
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
