"""Pieces shared by the Triton attention kernels: paged-cache addressing, head-dim padding, dot precision."""
from functools import cache

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634  # the kernels use exp2, so scores are scaled into log2 units


def dot_precision(dtype: torch.dtype) -> str:
    """float32 runs exist to compare with the reference, so they get three-pass TF32 (float32 accuracy on
    tensor cores; plain "ieee" FMA dots spill registers at these tile sizes). Ignored for 16-bit inputs."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def fp8_dot_dtype(q_dtype: torch.dtype):
    """What an FP8 cache's K/V (and q) are widened to for the dots: float16, which holds every e4m3 and e5m2
    value exactly and converts from FP8 in one instruction; float32 for float32 runs (exact comparisons)."""
    return tl.float32 if q_dtype == torch.float32 else tl.float16


@triton.jit
def paged_row_offsets(block_table_ptr, tile_start, end, stride_block, stride_row,
                      PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Element offsets in the cache of the rows holding context positions tile_start .. tile_start +
    BLOCK_N - 1 (tile_start a multiple of BLOCK_N) of the sequence whose block-table row starts at
    `block_table_ptr`. Positions >= `end` are not looked up, so the table is never read past its row."""
    tokens = tile_start + tl.arange(0, BLOCK_N)
    if PAGE_SIZE % BLOCK_N == 0:
        # the tile lies inside one page: a single block-table load serves the whole tile
        block = tl.load(block_table_ptr + tile_start // PAGE_SIZE, mask=tile_start < end, other=0)
    else:
        # the tile spans several pages (or pages are not a multiple of the tile): one lookup per token
        block = tl.load(block_table_ptr + tokens // PAGE_SIZE, mask=tokens < end, other=0)
    return block.to(tl.int64) * stride_block + (tokens % PAGE_SIZE) * stride_row


@triton.jit
def aligned_paged_row_offsets(block_table_ptr, tile_start, end, stride_block, stride_row,
                              PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """`paged_row_offsets` for a tile starting at a multiple of BLOCK_N, a power-of-two number of whole pages:
    a token's page in the tile and row in its page are then constants, so no per-token division is left in
    the loop (one table entry per page, one multiply-add per token)."""
    offsets = tl.arange(0, BLOCK_N)
    block = tl.load(block_table_ptr + tile_start // PAGE_SIZE + offsets // PAGE_SIZE,
                    mask=tile_start + offsets < end, other=0)
    return block.to(tl.int64) * stride_block + (offsets % PAGE_SIZE) * stride_row


@triton.jit
def widen_fp8_pairs(words, FP8_DTYPE: tl.constexpr, ASM: tl.constexpr):
    """uint16 words, each the FP8 values of dims 2i (low byte) and 2i+1 (high byte) of a row -> (even, odd)
    float16 tensors, exactly. A dot whose B operand is an FP8 tile with dims contiguous (P x V) reads that
    operand transposed, which Triton does a byte at a time from shared memory; as 16-bit words the
    transposed read is `ldmatrix.trans`, and one PRMT + two conversions widen two words (ASM, compiled
    code; the same values through plain casts where inline assembly cannot run, in the interpreter)."""
    # two words (one 32-bit register) a call: bytes [e0, o0, e1, o1] -> PRMT -> [e0, e1 | o0, o1] -> widen
    if ASM and FP8_DTYPE == tl.float8e5:
        even, odd = tl.inline_asm_elementwise(
            "{ prmt.b32 $0, $2, 0, 0x2404; prmt.b32 $1, $2, 0, 0x3414; }",
            "=r,=r,r", [words], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
    elif FP8_DTYPE == tl.float8e5:
        even = (words << 8).to(tl.float16, bitcast=True)
        odd = (words & 0xFF00).to(tl.float16, bitcast=True)
    elif ASM:
        even, odd = tl.inline_asm_elementwise(
            "{ .reg .b32 t; .reg .b16 lo, hi; prmt.b32 t, $2, 0, 0x3120; mov.b32 {lo, hi}, t; "
            "cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
            "=r,=r,r", [words], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
    else:
        even = (words & 0xFF).to(tl.uint8).to(FP8_DTYPE, bitcast=True).to(tl.float16)
        odd = (words >> 8).to(tl.uint8).to(FP8_DTYPE, bitcast=True).to(tl.float16)
    return even, odd


@cache  # called on every eager launch (prefill): a dict lookup, not triton's helper
def padded_head_dim(head_dim: int) -> int:
    """tl.arange needs a power of two and tl.dot a reduction of >= 16: head dims are padded to one."""
    return max(16, triton.next_power_of_2(head_dim))


@triton.jit
def head_dim_mask(HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """Which of the HEAD_DIM_PAD lanes hold data. All-true when nothing is padded, a constant the
    compiler folds away, so power-of-two head dims keep unmasked, full-width loads."""
    if HEAD_DIM == HEAD_DIM_PAD:
        return tl.full([HEAD_DIM_PAD], 1, tl.int1)
    else:
        return tl.arange(0, HEAD_DIM_PAD) < HEAD_DIM
