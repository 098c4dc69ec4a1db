"""A split-vocabulary sampling kernel in Triton: temperature, then an exact draw from softmax(logits / T).

Two kernels. The first cuts each row's vocabulary into slices read by programs of their own (one program per row
would leave most of the GPU idle at small batches) and keeps, per slice, the largest logit and the sum of
exp((logit - max) / T) (greedy rows: the largest logit and its first index). The second, one program per row,
draws a slice with probability proportional to its mass, then a token inside that slice by its cumulative
mass (re-reading that one slice, 1/19 of the row for Qwen3's vocabulary), from two uniforms hashed from
(seed, row). Greedy rows (T = 0) take the first slice holding the row's largest logit: torch.argmax's token.

Why not Gumbel-max: it needs a hash and two logarithms per token, ~44 instructions a token; at batch 256
that kernel was bound by instruction issue (66 us on an H200, against ~19 us for one read of the logits).
Here a token costs a conversion, a max, a fused multiply-add, one fast exp2 and an add. The slice's draw is
exact in distribution; its only rounding is the uniform's 24 bits against a token's share of its slice.

The seed is a [1] int64 device tensor the first kernel advances by one on every call, so a captured graph
draws fresh tokens on each replay with no host step. Steps whose sampling rows all use top-k (k <= 1,024; then
top-p and min-p among the survivors) draw from each row's k largest logits (`core/sampling/topk_candidates.py`:
a `topk`, no vocabulary sort, no host sync); other steps with top-p or min-p, and steps with per-request seeds,
go to the reference sampler.
"""
import os

import torch
import triton
import triton.language as tl

from nanovllm.core import sampler as reference
from nanovllm.core.sampling import topk_candidates
from nanovllm.core.sampler import SamplingTensors

MAX_CANDIDATES = 1024  # the largest step top_k sampled from candidates (a topk of this many per row)
SLICE = 8192  # tokens per program of the first kernel (all in registers at once: one max and one sum a slice)
PICK_BLOCK = 2048  # tokens per loop iteration of the second kernel's scan of the drawn slice
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    if FAST:  # the MUFU approximation, denormals flushed (Triton's interpreter cannot run PTX)
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


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
def _uniform(bits):
    """A uniform float in (0, 1) from the top 24 bits of a uint32."""
    return ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def _slice_stats_kernel(logits_ptr, stride_row, temperatures_ptr, seed_ptr, max_ptr, sum_ptr, index_ptr,
                        vocab_size, num_slices, SLICE: tl.constexpr, FAST: tl.constexpr):
    row = tl.program_id(0)
    part = tl.program_id(1)
    if (row == 0) & (part == 0):  # nothing else reads the seed in this kernel: the pick kernel uses the new one
        tl.store(seed_ptr, tl.load(seed_ptr) + 1)
    temperature = tl.load(temperatures_ptr + row)
    index = part * SLICE + tl.arange(0, SLICE)
    mask = index < vocab_size
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + index, mask=mask, other=float("-inf")).to(tl.float32)
    best = tl.max(x, 0)
    out = row * num_slices + part
    tl.store(max_ptr + out, best)
    if temperature > 0:
        scale = LOG2E / tl.maximum(temperature, 1e-6)
        shift = tl.where(best == float("-inf"), 0.0, best * scale)  # an all -inf slice has mass 0, not NaN
        tl.store(sum_ptr + out, tl.sum(_exp2(x * scale - shift, FAST), 0))
    else:  # the first index of the maximum, as torch.argmax (an all -inf slice gives its first index)
        tl.store(index_ptr + out, tl.min(tl.where(x == best, index, 2147483647), 0))


@triton.jit
def _pick_kernel(logits_ptr, stride_row, temperatures_ptr, seed_ptr, max_ptr, sum_ptr, index_ptr, out_ptr,
                 vocab_size, num_slices, SLICE: tl.constexpr, SLICES: tl.constexpr, BLOCK: tl.constexpr,
                 FAST: tl.constexpr):
    row = tl.program_id(0)
    temperature = tl.load(temperatures_ptr + row)
    part = tl.arange(0, SLICES)
    valid = part < num_slices
    maxima = tl.load(max_ptr + row * num_slices + part, mask=valid, other=float("-inf"))
    top = tl.max(maxima, 0)
    if temperature > 0:
        scale = LOG2E / tl.maximum(temperature, 1e-6)
        sums = tl.load(sum_ptr + row * num_slices + part, mask=valid, other=0.0)
        weights = tl.where(maxima == float("-inf"), 0.0, sums * _exp2((maxima - top) * scale, FAST))
        cumulative = tl.cumsum(weights, 0)
        key = _hash32(tl.load(seed_ptr).to(tl.uint32)) + (row * 2).to(tl.uint32)
        target = _uniform(_hash32(key)) * tl.max(cumulative, 0)
        # the first slice whose cumulative mass passes the target (it has mass); rounding: the last with mass
        chosen = tl.min(tl.where(cumulative > target, part, SLICES), 0)
        last = tl.max(tl.where(weights > 0, part, 0), 0)
        chosen = tl.minimum(chosen, last)
        slice_max = tl.sum(tl.where(part == chosen, maxima, 0.0), 0)
        slice_sum = tl.sum(tl.where(part == chosen, sums, 0.0), 0)
        shift = tl.where(slice_max == float("-inf"), 0.0, slice_max * scale)
        target = _uniform(_hash32(key + 1)) * slice_sum
        start = chosen * SLICE
        token = 2147483647  # the first index whose cumulative mass in the slice passes the target
        fallback = start  # rounding (the re-summed slice falls short of the target): its last token with mass
        running = 0.0
        for offset in range(0, SLICE, BLOCK):
            index = start + offset + tl.arange(0, BLOCK)
            x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + index, mask=index < vocab_size,
                        other=float("-inf")).to(tl.float32)
            w = _exp2(x * scale - shift, FAST)
            inside = running + tl.cumsum(w, 0)
            token = tl.minimum(token, tl.min(tl.where(inside > target, index, 2147483647), 0))
            fallback = tl.maximum(fallback, tl.max(tl.where(w > 0, index, -1), 0))
            running += tl.sum(w, 0)
        token = tl.where(token == 2147483647, fallback, token)
    else:
        first = tl.min(tl.where(maxima == top, part, SLICES - 1), 0)
        token = tl.load(index_ptr + row * num_slices + first)
    tl.store(out_ptr + row, token.to(tl.int64))


def split_sample(logits: torch.Tensor, temperatures: torch.Tensor, seed: torch.Tensor, slice_size: int = SLICE,
                 block: int = PICK_BLOCK) -> torch.Tensor:
    """logits [B, V] (any float dtype, unit stride), temperatures [B] float32, seed [1] int64 (advanced in
    place) -> tokens [B] int64. Launches two kernels and makes no host sync, so it can run inside a captured
    graph."""
    num_rows, vocab_size = logits.shape
    num_slices = triton.cdiv(vocab_size, slice_size)
    maxima = torch.empty(num_rows, num_slices, dtype=torch.float32, device=logits.device)
    sums = torch.empty(num_rows, num_slices, dtype=torch.float32, device=logits.device)
    indices = torch.empty(num_rows, num_slices, dtype=torch.int32, device=logits.device)
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    fast = not _interpreting()
    _slice_stats_kernel[(num_rows, num_slices)](logits, logits.stride(0), temperatures, seed, maxima, sums, indices,
                                                vocab_size, num_slices, SLICE=slice_size, FAST=fast,
                                                num_warps=_warps(slice_size))
    _pick_kernel[(num_rows,)](logits, logits.stride(0), temperatures, seed, maxima, sums, indices, out, vocab_size,
                              num_slices, SLICE=slice_size, SLICES=triton.next_power_of_2(num_slices),
                              BLOCK=min(block, slice_size), FAST=fast, num_warps=4)
    return out


def _warps(slice_size: int) -> int:
    return max(1, min(8, slice_size // 1024))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def sample(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """The `sampler` op: logits [B, V] -> token ids [B] int64.

    Graph-safe for what a captured decode graph hands it (temperatures and a seed, no filters): no host sync,
    the same two launches whatever the temperatures."""
    if not params.generators and params.top_k_bound is not None and params.top_k_bound <= MAX_CANDIDATES:
        return topk_candidates.sample(logits, params, params.top_k_bound)
    if params.top_k is not None or params.top_p is not None or params.min_p is not None or params.generators:
        return reference.sample(logits, params)
    if params.all_greedy:
        return logits.argmax(dim=-1)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    seed = params.seed
    if seed is None:
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=logits.device)
    slice_size = min(SLICE, triton.next_power_of_2(logits.shape[1]))
    return split_sample(logits, params.temperatures, seed, slice_size)
