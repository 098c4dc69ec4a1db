"""Paged decode attention with a load-balanced schedule, for batches too small to fill the GPU one program per
(KV head, sequence).

Grid (num_kv_heads, num_programs): the launch depends only on the batch and head counts, so one captured CUDA graph
serves every replay. Each KV head's work is the concatenation of all sequences' BLOCK_N-token tiles (in `seq_order`
when given); every program computes the tile counts' prefix sum from the context lengths itself and takes an
equal share of that range, walking it across sequence boundaries. A sequence a program covers whole is written
to the output directly; a sequence cut between programs leaves one partial (output and log-sum-exp) per program in
scratch, two slots per program (the sequence it starts inside, the one it ends inside), and the last of those
programs to finish (counted by an atomic counter per KV head and sequence) merges them: no second kernel.
Context-0 rows (padded graph batches) are whole sequences of no tiles: their output is written as 0.
"""
import torch
import triton
import triton.language as tl

from nanovllm.backends.cuda.attention.triton_common import (LOG2_E, dot_precision, fp8_dot_dtype, head_dim_mask,
                                                           padded_head_dim)
from nanovllm.backends.cuda.attention.triton_decode_tiles import attend_range, load_query, normalise


@triton.jit
def _tile_prefix(context_lens_ptr, seq_order_ptr, num_seqs, SEQS_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                 ORDERED: tl.constexpr):
    """-> (positions, tiles, ends) over the batch in schedule order: each position's tile count and where its tiles
    end in the concatenation (inclusive prefix sum); positions past num_seqs have no tiles."""
    positions = tl.arange(0, SEQS_PAD)
    in_batch = positions < num_seqs
    if ORDERED:
        seqs = tl.load(seq_order_ptr + positions, mask=in_batch, other=0)
    else:
        seqs = positions
    tiles = tl.cdiv(tl.load(context_lens_ptr + seqs, mask=in_batch, other=0), BLOCK_N)
    return positions, tiles, tl.cumsum(tiles, 0)


@triton.jit
def _program_of(tile, total, num_progs):
    """The program whose share holds `tile`: the last j with j * total // num_progs <= tile (total > 0)."""
    return ((tile.to(tl.int64) + 1) * num_progs - 1) // total


@triton.jit
def _arrive(counter_ptr, rows, ASM: tl.constexpr):
    """Publishes this program's partial (already stored by every thread) and counts it: -> how many programs had
    arrived before. A fence by every thread, a barrier, then one acquire-release atomic (Triton issues a scalar
    atomic from one thread and broadcasts its result)."""
    if ASM:
        tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.b32 $0, $1;", "=r,r", [rows], dtype=tl.int32,
                                  is_pure=False, pack=1)
    tl.debug_barrier()
    return tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")


@triton.jit
def _merge_partials(part_out_ptr, part_lse_ptr, kv_head, num_progs, first_prog, last_prog, seq_start, total,
                    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """-> the output [GROUP_PAD, HEAD_DIM_PAD] of a sequence cut over programs first_prog .. last_prog, from their
    partials (read from L2: other programs wrote them during this launch)."""
    group_rows = tl.arange(0, GROUP_PAD)
    head_mask = group_rows < GROUP
    dims = tl.arange(0, HEAD_DIM_PAD)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    weight = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    for prog in range(first_prog, last_prog + 1):
        prog_start = total * prog // num_progs
        # slot 1 where the sequence starts inside this program's share, 0 where it began before (see the kernel)
        slot = (kv_head * num_progs + prog).to(tl.int64) * 2 + (seq_start >= prog_start).to(tl.int64)
        rows = slot * GROUP + group_rows
        lse = tl.load(part_lse_ptr + rows, mask=head_mask, other=float("-inf"), cache_modifier=".cg")
        part = tl.load(part_out_ptr + rows[:, None] * HEAD_DIM_PAD + dims[None, :], mask=head_mask[:, None],
                       other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no partial with tokens yet: weights 0, not NaN
        old, new = tl.exp2(m - m_safe), tl.exp2(lse - m_safe)
        acc = acc * old[:, None] + part * new[:, None]
        weight = weight * old + new
        m = m_new
    return acc / tl.where(weight > 0, weight, 1.0)[:, None]


@triton.jit
def _balanced_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, seq_order_ptr,
    out_ptr, part_out_ptr, part_lse_ptr, counters_ptr, qk_scale, k_scale_ptr, v_scale_ptr, num_seqs,
    stride_q_seq, stride_q_head, stride_cache_block, stride_cache_row, stride_cache_head,
    stride_bt_seq, stride_o_seq, stride_o_head,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SEQS_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr, DOT_DTYPE: tl.constexpr, ASM: tl.constexpr, ORDERED: tl.constexpr,
):
    kv_head = tl.program_id(0)  # fastest: the KV heads of a tile range, adjacent in the cache, are read together
    prog = tl.program_id(1)
    num_progs = tl.num_programs(1)
    positions, tiles, ends = _tile_prefix(context_lens_ptr, seq_order_ptr, num_seqs, SEQS_PAD, BLOCK_N, ORDERED)
    total = tl.sum(tiles, 0).to(tl.int64)
    t0 = (prog * total // num_progs).to(tl.int32)  # this program's tiles: t0 .. t1 - 1
    t1 = ((prog + 1) * total // num_progs).to(tl.int32)
    # the first sequence to visit: the one holding tile t0, after any tile-less ones that sit at t0 (a tile-less
    # sequence belongs to the program whose range holds its position; at the very end, to the last program)
    pos = tl.sum(((ends < t0) | ((ends == t0) & (tiles > 0))).to(tl.int32), 0)
    seq_start = tl.sum(tl.where(positions < pos, tiles, 0), 0)
    limit = t1 + (prog == num_progs - 1).to(tl.int32)
    if KV_FP8:  # stored = value / scale: fold K's scale into the scores, V's into the output
        qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head)
        v_scale = tl.load(v_scale_ptr + kv_head)
    else:
        v_scale = 1.0
    group_rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + group_rows
    head_mask = group_rows < GROUP
    dims = tl.arange(0, HEAD_DIM_PAD)
    out_mask = head_mask[:, None] & head_dim_mask(HEAD_DIM, HEAD_DIM_PAD)[None, :]
    k_base = k_cache_ptr + kv_head * stride_cache_head
    v_base = v_cache_ptr + kv_head * stride_cache_head
    while (pos < num_seqs) & (seq_start < limit):
        # loaded again (from cache) rather than picked out of `seqs`/`lens`: keeping those live costs ~40 registers
        if ORDERED:
            seq = tl.load(seq_order_ptr + pos)
        else:
            seq = pos
        context_len = tl.load(context_lens_ptr + seq)
        seq_tiles = tl.cdiv(context_len, BLOCK_N)
        first = tl.maximum(t0 - seq_start, 0)  # this program's share of the sequence, in its own tiles
        last = tl.minimum(t1 - seq_start, seq_tiles)
        q, q_even, q_odd = load_query(q_ptr, seq, kv_head, stride_q_seq, stride_q_head, GROUP, GROUP_PAD, HEAD_DIM,
                                      HEAD_DIM_PAD, KV_FP8, DOT_DTYPE)
        end = tl.minimum(last * BLOCK_N, context_len)
        acc, l_i, m_i = attend_range(
            q, q_even, q_odd, qk_scale, k_base, v_base, block_tables_ptr + seq.to(tl.int64) * stride_bt_seq,
            first * BLOCK_N, end, end, stride_cache_block, stride_cache_row,
            GROUP_PAD, HEAD_DIM, HEAD_DIM_PAD, PAGE_SIZE, BLOCK_N, DOT_PRECISION, KV_FP8, DOT_DTYPE, ASM)
        part, lse = normalise(acc, l_i, m_i, v_scale)
        out_rows = out_ptr + seq * stride_o_seq + heads[:, None] * stride_o_head + dims[None, :]
        if (first == 0) & (last == seq_tiles):
            tl.store(out_rows, part.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            # scratch part_out [num_kv_heads, num_programs, 2, GROUP, HEAD_DIM_PAD], part_lse [..., 2, GROUP]:
            # slot 0 for the sequence begun before t0, 1 for the one cut at t1
            slot = (kv_head * num_progs + prog).to(tl.int64) * 2 + (seq_start >= t0).to(tl.int64)
            rows = slot * GROUP + group_rows
            tl.store(part_lse_ptr + rows, lse, mask=head_mask)
            tl.store(part_out_ptr + rows[:, None] * HEAD_DIM_PAD + dims[None, :], part, mask=head_mask[:, None])
            # the sequence's last program to finish merges all its partials and leaves the counter at 0 for the
            # next launch (a CUDA graph replays this one with the same counters)
            first_prog = _program_of(seq_start, total, num_progs)
            last_prog = _program_of(seq_start + seq_tiles - 1, total, num_progs)
            counter = counters_ptr + kv_head * num_seqs + pos
            if _arrive(counter, group_rows, ASM) == last_prog - first_prog:
                merged = _merge_partials(part_out_ptr, part_lse_ptr, kv_head, num_progs, first_prog.to(tl.int32),
                                         last_prog.to(tl.int32), seq_start, total, GROUP, GROUP_PAD, HEAD_DIM_PAD)
                tl.store(out_rows, merged.to(out_ptr.dtype.element_ty), mask=out_mask)
                tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
        seq_start += seq_tiles
        pos += 1


_COUNTERS: dict[torch.device, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []  # counters a larger call replaced: CUDA graphs captured with them still use them


def _counters(device: torch.device, size: int) -> torch.Tensor:
    """Zeroed int32 counters, one per (KV head, sequence), kept between calls: each kernel leaves them at 0, so they
    need no clearing per call (nor a memset node per layer in a CUDA graph). One decode runs at a time per device.
    A buffer once handed out is never freed: another engine's graphs (captured with it) may replay after a larger
    call here has replaced it."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < size:
        if counters is not None:
            _OUTGROWN.append(counters)
        counters = _COUNTERS[device] = torch.zeros(max(size, 4096), dtype=torch.int32, device=device)
    return counters


def balanced_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context_lens: torch.Tensor,
                    block_tables: torch.Tensor, scale: float, out: torch.Tensor, num_programs: int, block_n: int,
                    num_warps: int, num_stages: int, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None, seq_order: torch.Tensor | None = None) -> torch.Tensor:
    """The balanced schedule with `num_programs` programs per KV head, for inputs `paged_decode` has checked (its
    docstring gives the shapes). No host sync: capturable in a CUDA graph."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    head_dim_pad = padded_head_dim(head_dim)
    kv_fp8 = k_scale is not None
    part_out = torch.empty(num_kv_heads, num_programs, 2, group, head_dim_pad, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_kv_heads, num_programs, 2, group, dtype=torch.float32, device=q.device)
    order = seq_order if seq_order is not None else context_lens
    _balanced_decode_kernel[(num_kv_heads, num_programs)](
        q, k_cache, v_cache, block_tables, context_lens, order, out, part_out, part_lse,
        _counters(q.device, num_kv_heads * num_seqs), scale * LOG2_E, k_scale if kv_fp8 else q,
        v_scale if kv_fp8 else q, num_seqs,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, PAGE_SIZE=block_size, BLOCK_N=block_n,
        SEQS_PAD=max(256, triton.next_power_of_2(num_seqs)),  # one compiled kernel for every batch up to 256
        DOT_PRECISION=dot_precision(q.dtype), KV_FP8=kv_fp8, DOT_DTYPE=fp8_dot_dtype(q.dtype),
        ASM=q.device.type == "cuda", ORDERED=seq_order is not None, num_warps=num_warps, num_stages=num_stages)
    return out
