"""A Triton matrix product for the few rows of a decode step: y = x @ w.T, x [M, K], w [N, K] (a linear layer).

At decode batch sizes (M <= 256) the products of a small model read their weight once and do little math, and
cuBLAS reaches 0.2-0.75 of the memory bandwidth there. This kernel takes a tile shape from a table measured on
the device (`benchmarks/gemm_sweep.py`), optionally with the operands swapped (out.T = w @ x.T, so the weight's
rows fill the tensor cores' wide side and the few rows of x the narrow one), and may split K over several
programs: each writes a float32 partial, and the last to finish a tile (a per-tile counter it resets) adds the
partials and writes the output, so one launch does all of it and CUDA graphs capture it as one node. With
`glu` it computes gate and up tiles side by side and writes silu(gate) * up (act.silu_mul in its epilogue).
float32 inputs take three-pass TF32 dots (float32 accuracy, for runs compared with the reference; the
table is bfloat16's).

`matmul(x, w, config)` runs one configuration (the sweep times them). `install_triton_linear(model, dtype)`
(the cuda backend's `prepare_model`) gives the layers whose weight shape is in TABLE a `TritonLinear`: the
table's configuration for the call's M, cuBLAS (F.linear) for every other M, dtype or a bias.

On an H200 the first sweep (plain tiles, split-K) found cuBLAS faster than every configuration of this kernel
at the Qwen3-0.6B layer products for M from 8 to 256: each product costs ~3-4 us beyond its weight read whoever
launches it, which tile shapes do not remove. So TABLE is short: the o projection at M = 1, where cuBLAS takes
a matrix-vector path (12.7 us against 6.3 here), and the LM head at M <= 8 (4% faster). Swapped operands and
the fused SiLU are tested and swept, not yet measured faster. See benchmarks/RESULTS.md.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from nanovllm.backends.cuda.attention.triton_common import dot_precision

LOCKS = 8192  # per-tile counters of the split-K reduction, shared by every call on a device (one stream)


class Config(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    warps: int
    stages: int
    swap: bool = False  # compute out.T = w @ x.T: the weight's rows fill the MMA's M side, the few rows of x its N


@triton.jit
def _load_tiles(x_ptrs, w_ptrs, m_ok, n_ok, k_ok, SWAP: tl.constexpr):
    """x [BM, BK] and w [BK, BN] tiles, or x [BK, BM] and w [BN, BK] when SWAP."""
    if SWAP:
        x = tl.load(x_ptrs, mask=m_ok[None, :] & k_ok[:, None], other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    else:
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
    return x, w


@triton.jit
def _mma(x, w, acc, SWAP: tl.constexpr, PRECISION: tl.constexpr):
    if SWAP:
        acc = tl.dot(w, x, acc, input_precision=PRECISION)
    else:
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=["M"])  # one compiled variant serves every batch size
def _linear_kernel(x_ptr, w_ptr, out_ptr, partial_ptr, lock_ptr, M, N, K, stride_xm, stride_om, k_per_split, x_eps,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
                   SWAP: tl.constexpr = False, GLU: tl.constexpr = False, PDL: tl.constexpr = False,
                   ROW_SCALE: tl.constexpr = False, PRECISION: tl.constexpr = "tf32"):
    """out [M, N] = x [M, K] @ w[:N].T; with GLU, out = silu(x @ w[:N].T) * (x @ w[N:2N].T), rounded as
    act.silu_mul rounds the product it reads. ROW_SCALE (GLU, one split): gate and up of each row are first
    multiplied by rsqrt(mean(x_row^2) + x_eps), summed on the way through K (act.silu_mul's `row_scale_of=x`)."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    k_start = pid_k * k_per_split
    offs_k = k_start + tl.arange(0, BK)
    m_ok, n_ok = offs_m < M, offs_n < N
    if SWAP:
        x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + offs_k[:, None]
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_up = tl.zeros_like(acc)
    squares = tl.zeros((BM,), dtype=tl.float32)
    k_end = tl.minimum(k_start + k_per_split, K)
    if PDL:  # launched as a programmatic dependent: wait for the kernel before to finish and flush
        tl.extra.cuda.gdc_wait()
    for k in range(k_start, k_end, BK):
        k_ok = (k + tl.arange(0, BK)) < k_end
        x, w = _load_tiles(x_ptrs, w_ptrs, m_ok, n_ok, k_ok, SWAP)
        acc = _mma(x, w, acc, SWAP, PRECISION)
        if ROW_SCALE:
            xf = x.to(tl.float32)
            squares += tl.sum(xf * xf, 0 if SWAP else 1)
        if GLU:
            _, w_up = _load_tiles(x_ptrs, w_ptrs + N * K, m_ok, n_ok, k_ok, SWAP)
            acc_up = _mma(x, w_up, acc_up, SWAP, PRECISION)
        x_ptrs += BK
        w_ptrs += BK
    if SWAP:
        acc = tl.trans(acc)
        acc_up = tl.trans(acc_up)
    mask = m_ok[:, None] & n_ok[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    dtype = out_ptr.dtype.element_ty
    if SPLIT_K > 1:
        tile = offs_m[:, None] * N + offs_n[None, :]
        parts = 2 if GLU else 1
        tl.store(partial_ptr + pid_k * parts * M * N + tile, acc, mask=mask)
        if GLU:
            tl.store(partial_ptr + (pid_k * 2 + 1) * M * N + tile, acc_up, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        lock = lock_ptr + pid_m * tl.num_programs(1) + pid_n
        last = tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1
        if last:  # the last split of this tile adds every split's partial in split order: the same sum, bit for
            acc = tl.zeros_like(acc)  # bit, whichever split ends last
            acc_up = tl.zeros_like(acc_up)
            for s in tl.static_range(SPLIT_K):
                acc += tl.load(partial_ptr + s * parts * M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
                if GLU:
                    acc_up += tl.load(partial_ptr + (s * 2 + 1) * M * N + tile, mask=mask, other=0.0,
                                      cache_modifier=".cg")
            tl.atomic_xchg(lock, 0)  # ready for the next call
    else:
        last = True
    if last:
        if GLU:
            gate = acc.to(dtype).to(tl.float32)
            up = acc_up.to(dtype).to(tl.float32)
            if ROW_SCALE:
                row_scale = tl.rsqrt(squares / K + x_eps)[:, None]
                gate = (gate * row_scale).to(dtype).to(tl.float32)
                up = (up * row_scale).to(dtype).to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            acc = silu * up
        tl.store(out_ptrs, acc.to(dtype), mask=mask)


_locks: dict[torch.device, torch.Tensor] = {}


def split_counters(device: torch.device) -> torch.Tensor:
    """The device's split-K counters (LOCKS of them, int32, zero between launches: the last split of a tile resets
    its counter), shared by this kernel and qkv_rotary_store's split-K launches on the device's one stream."""
    locks = _locks.get(device)
    if locks is None:
        locks = _locks[device] = torch.zeros(LOCKS, dtype=torch.int32, device=device)
    return locks


def fits(m: int, n: int, k: int, config: Config) -> bool:
    """Whether `config` can run this shape (the split-K counters are bounded; each split gets whole K blocks)."""
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    return config.split_k == 1 or (tiles <= LOCKS and k >= config.split_k * config.block_k)


def matmul(x: torch.Tensor, w: torch.Tensor, config: Config, glu: bool = False, pdl: bool = False,
           row_scale_eps: float | None = None) -> torch.Tensor:
    """x [M, K] (unit stride on K) @ w [N, K].T (contiguous) with one configuration, in x's dtype.

    `glu`: w holds gate then up rows ([2 * N, K]); returns silu(x @ gate.T) * (x @ up.T), [M, N].
    `row_scale_eps` (with `glu`, one split): gate and up of row i are first scaled by rsqrt(mean(x[i]^2) + eps),
    as act.silu_mul with `row_scale_of=x` (the RMSNorm folded into the gate/up weight, norm_folding.py).
    `pdl` (swept, not used by the engine): launch as a programmatic dependent launch (Hopper), which may start
    before the kernel ahead of it ends and waits for it before reading x."""
    m, k = x.shape
    n = w.shape[0] // 2 if glu else w.shape[0]
    if w.shape[1] != k or x.stride(1) != 1 or not w.is_contiguous() or (glu and w.shape[0] % 2):
        raise ValueError(f"linear: x {tuple(x.shape)} (strides {x.stride()}) and weight {tuple(w.shape)} need "
                         f"x [M, K] with unit stride on K and a contiguous weight [N, K] (an even N for gate/up)")
    row_scale = row_scale_eps is not None
    if row_scale and not (glu and config.split_k == 1):
        raise ValueError(f"linear: row_scale_eps needs glu=True and one split (the sums of squares of a row need "
                         f"all of K in one program), got glu={glu}, split_k={config.split_k}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    bm, bn, bk, split, warps, stages, swap = config
    k_per_split = triton.cdiv(triton.cdiv(k, split), bk) * bk
    split = triton.cdiv(k, k_per_split)  # no empty split
    parts = 2 if glu else 1
    partial = torch.empty(split * parts, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    locks = split_counters(x.device) if split > 1 else out
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), split)
    _linear_kernel[grid](x, w, out, partial, locks, m, n, k, x.stride(0), out.stride(0), k_per_split,
                         row_scale_eps if row_scale else 0.0,
                         BM=bm, BN=bn, BK=bk, SPLIT_K=split, SWAP=swap, GLU=glu, PDL=pdl, ROW_SCALE=row_scale,
                         PRECISION=dot_precision(x.dtype), num_warps=warps, num_stages=stages,
                         **({"launch_pdl": True} if pdl else {}))
    return out


# (N, K) of a weight -> [(largest M, configuration)] in increasing M, measured on an H200 in bfloat16
# (`benchmarks/gemm_sweep.py`); M beyond the last entry, other shapes and dtypes go to cuBLAS.
TABLE: dict[tuple[int, int], list[tuple[int, Config]]] = {
    (1024, 2048): [(1, Config(16, 64, 64, 4, 4, 5))],  # Qwen3-0.6B o_proj: 6.27 us, cuBLAS 12.65
    (151936, 1024): [(1, Config(16, 64, 128, 1, 4, 4)),  # Qwen3-0.6B LM head: 74.1 us, cuBLAS 77.3
                     (8, Config(16, 128, 128, 1, 4, 3))],  # 76.6 us, cuBLAS 79.8
}
TABLE_DTYPES = (torch.bfloat16,)

# (N, K) of a gate/up weight -> [(largest M, configuration or None)]: gate/up with the row-scaled SiLU-and-mul in
# the epilogue (one split), measured on an H200 in bfloat16 against cuBLAS + act.silu_mul
# (`benchmarks/fused_products.py`); the folded decoder (norm_folding.mlp_block) runs it where it is listed.
# Qwen3-0.6B, round fifteen: M <= 32 6.80-6.88 us a layer against 7.46-7.73; from M 48 the two kernels win
# (7.86 against 8.28 at 48, 10.05 against 14.17 at 256).
GLU_TABLE: dict[tuple[int, int], list[tuple[int, Config | None]]] = {
    (6144, 1024): [(32, Config(16, 64, 128, 1, 4, 4, True))],
}


def pick(m: int, n: int, k: int, table: dict | None = None) -> Config | None:
    """The table's configuration (TABLE's, or `table`'s) for an M x K by K x N product, or None (cuBLAS)."""
    for largest, config in (TABLE if table is None else table).get((n, k), ()):
        if m <= largest:
            return config
    return None


class TritonLinear:
    """A layer's `linear_op(x, weight, bias)`: this kernel where TABLE has the shape and M, else F.linear."""

    def __init__(self, weight: torch.Tensor):
        split_counters(weight.device)  # allocated now, not inside a CUDA graph capture

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if bias is None and x.dim() == 2 and x.stride(1) == 1 and x.dtype == weight.dtype:
            config = pick(x.shape[0], *weight.shape)
            if config is not None:
                return matmul(x, weight, config)
        return F.linear(x, weight, bias)


def install_triton_linear(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Give each layer with a `linear_op` and a weight shape in TABLE a TritonLinear; returns how many."""
    if dtype not in TABLE_DTYPES:
        return 0
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (hasattr(module, "linear_op") and isinstance(weight, torch.Tensor) and weight.dim() == 2
                and weight.is_contiguous() and tuple(weight.shape) in TABLE):
            module.linear_op = TritonLinear(weight)
            count += 1
    return count
