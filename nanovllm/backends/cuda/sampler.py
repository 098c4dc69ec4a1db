"""A split-vocabulary sampling kernel: temperature and Gumbel-max over the raw logits, in Triton.

argmax(logits / T + Gumbel noise) draws a token with probability softmax(logits / T), so one read of
the logits replaces the reference's cast, divide, softmax, noise, divide and two argmaxes. Rows with
T = 0 take the argmax. Each row's vocabulary is cut into slices read by programs of their own (one
program per row would leave most of the GPU idle at small batches), each slice's best candidate is kept,
and a second tiny kernel picks each row's winner. The kernel must stay near memory speed (one read of
the logits takes ~20 us at batch 256 on an H200): the noise comes from an integer hash of (seed, row, token)
rather than Philox's ten rounds, and the logarithms from the GPU's fast log2 rather than libdevice's
accurate one (the old one-pass kernel spent ~220 us computing both). Scores are in base 2:
argmax(l / T + Gumbel) = argmax(l * log2(e) / T - log2(E)) with E = -ln(u) ~ Exp(1); E is computed from
v = 1 - u by a series where v is small, since an approximate log of u near 1 loses the tail that wins.
Batches that use top-k, top-p, min-p or per-request seeds go to the reference sampler.
"""
import os

import torch
import triton
import triton.language as tl

from nanovllm.core import sampler as reference
from nanovllm.core.sampler import SamplingTensors

SLICE = 8192  # tokens per program
BLOCK = 2048  # tokens per loop iteration of one program


@triton.jit
def _log2(x, FAST: tl.constexpr):
    if FAST:  # the MUFU approximation: max absolute error ~2^-22 (Triton's interpreter cannot run PTX)
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _hash32(x):
    """lowbias32 (C. Wellons): a bijective 32-bit mix with good avalanche; x is uint32."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _slice_best_kernel(logits_ptr, stride_row, temperatures_ptr, seed_ptr, best_value_ptr, best_index_ptr,
                       vocab_size, num_slices, SLICE: tl.constexpr, BLOCK: tl.constexpr, FAST: tl.constexpr):
    row = tl.program_id(0)
    part = tl.program_id(1)
    temperature = tl.load(temperatures_ptr + row)
    scale = 1.4426950408889634 / tl.maximum(temperature, 1e-6)  # log2(e) / T
    sampled = temperature > 0
    seed = _hash32(tl.load(seed_ptr).to(tl.uint32))
    row_key = (row * vocab_size).to(tl.uint32)
    best_value = tl.full((BLOCK,), float("-inf"), tl.float32)  # per lane: the loop is elementwise, one
    best_index = tl.zeros((BLOCK,), tl.int32)                      # reduction at the end of the slice
    start0 = part * SLICE
    for offset in range(0, SLICE, BLOCK):
        index = start0 + offset + tl.arange(0, BLOCK)
        mask = index < vocab_size
        logits = tl.load(logits_ptr + row.to(tl.int64) * stride_row + index, mask=mask,
                         other=float("-inf")).to(tl.float32)
        bits = _hash32((row_key + index.to(tl.uint32)) ^ seed)
        v = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)  # uniform in (0, 1); u = 1 - v
        series = v * (1.0 + v * (0.5 + v * (1.0 / 3.0)))  # -ln(1 - v), error < v^4 / 4
        exp1 = tl.where(v < 0.0078125, series, -_log2(1.0 - v, FAST) * 0.6931471805599453)  # ~ Exp(1)
        score = tl.where(sampled, logits * scale - _log2(exp1, FAST), logits)
        score = tl.where(mask, score, float("-inf"))
        better = score > best_value  # strictly: a lane keeps its first index on ties
        best_index = tl.where(better, index, best_index)
        best_value = tl.where(better, score, best_value)
    slice_best = tl.max(best_value, 0)
    # ties across lanes: the lowest token index, as torch.argmax (a slice of all -inf keeps index start0)
    slice_index = tl.min(tl.where(best_value == slice_best, best_index, 2147483647), 0)
    slice_index = tl.where(slice_best == float("-inf"), start0, slice_index)
    tl.store(best_value_ptr + row * num_slices + part, slice_best)
    tl.store(best_index_ptr + row * num_slices + part, slice_index)


@triton.jit
def _pick_kernel(best_value_ptr, best_index_ptr, out_ptr, num_slices, SLICES: tl.constexpr):
    row = tl.program_id(0)
    part = tl.arange(0, SLICES)
    mask = part < num_slices
    values = tl.load(best_value_ptr + row * num_slices + part, mask=mask, other=float("-inf"))
    indices = tl.load(best_index_ptr + row * num_slices + part, mask=mask, other=0)
    winner = tl.argmax(values, 0)  # the first slice of the largest value: the lowest token index on ties
    token = tl.sum(tl.where(part == winner, indices, 0), 0)
    tl.store(out_ptr + row, token.to(tl.int64))


def gumbel_sample(logits: torch.Tensor, temperatures: torch.Tensor, seed: torch.Tensor, slice_size: int = SLICE,
                  block: int = BLOCK) -> torch.Tensor:
    """logits [B, V] (any float dtype, unit stride), temperatures [B] float32, seed [1] int -> tokens [B] int64.

    Launches two kernels and makes no host sync, so it can run inside a captured graph.
    """
    num_rows, vocab_size = logits.shape
    num_slices = triton.cdiv(vocab_size, slice_size)
    best_value = torch.empty(num_rows, num_slices, dtype=torch.float32, device=logits.device)
    best_index = torch.empty(num_rows, num_slices, dtype=torch.int32, device=logits.device)
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    _slice_best_kernel[(num_rows, num_slices)](logits, logits.stride(0), temperatures, seed, best_value, best_index,
                                               vocab_size, num_slices, SLICE=slice_size, BLOCK=block, FAST=not _interpreting(),
                                               num_warps=4)
    _pick_kernel[(num_rows,)](best_value, best_index, out, num_slices,
                              SLICES=triton.next_power_of_2(num_slices), num_warps=1)
    return out


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def sample(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """The `sampler` op: logits [B, V] -> token ids [B] int64."""
    if params.top_k is not None or params.top_p is not None or params.min_p is not None or params.generators:
        return reference.sample(logits, params)
    if params.all_greedy:
        return logits.argmax(dim=-1)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int32, device=logits.device)
    slice_size = min(SLICE, triton.next_power_of_2(logits.shape[1]))
    return gumbel_sample(logits, params.temperatures, seed, slice_size, min(BLOCK, slice_size))
