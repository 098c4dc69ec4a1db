"""What programmatic dependent launch (PDL) saves between a decode layer's kernels, and cuBLAS against cuBLASLt.

    python benchmarks/pdl_chain.py [--ms 64,256] [--layers 28]

A decode layer of Qwen3-0.6B's shape as nine kernels (add+RMSNorm, q/k/v product, two row-wise stand-ins for
rotary+store and attention, output product, add+RMSNorm, gate/up product, SiLU*up, down product), 28 layers in one
CUDA graph, timed over replays. Variants: the Triton kernels launched plainly, or with PDL (each waits on the
previous grid with `gdc_wait` at its start; `early` also lets its own dependents launch right after that wait);
the products by cuBLAS or cuBLASLt (`torch.backends.cuda.preferred_blas_library`), or left out (Triton only).
Prints microseconds a layer for each variant.
"""
import argparse

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: the PDL variants are reported as missing
    gdc_launch_dependents = gdc_wait = None

HIDDEN, Q, KV, INTER = 1024, 2048, 1024, 3072


@triton.jit
def _pdl_enter(PDL: tl.constexpr):
    if PDL >= 1:
        gdc_wait()
    if PDL >= 2:
        gdc_launch_dependents()


@triton.jit
def _add_rms(x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    s = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32) + \
        tl.load(r_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(sum_ptr + row * n + cols, s.to(sum_ptr.dtype.element_ty), mask=mask)
    rstd = tl.rsqrt(tl.sum(s * s, 0) / n + 1e-6)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + cols, (s * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rowwise(x_ptr, out_ptr, n_in, n_out, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """A stand-in for rotary + store or attention: reads a row prefix, writes a scaled row."""
    _pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * n_in + cols, mask=cols < n_out, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_out + cols, (x * 0.5).to(out_ptr.dtype.element_ty), mask=cols < n_out)


@triton.jit
def _silu_mul(x_ptr, out_ptr, d, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    g = tl.load(x_ptr + row * 2 * d + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * 2 * d + d + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * d + cols, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=mask)


class Chain:
    def __init__(self, m: int, layers: int, gemms: bool):
        f = dict(device="cuda", dtype=torch.bfloat16)
        self.m, self.layers, self.gemms = m, layers, gemms
        self.w = [dict(qkv=torch.randn(HIDDEN, Q + 2 * KV, **f) * 0.03, o=torch.randn(Q, HIDDEN, **f) * 0.03,
                       gu=torch.randn(HIDDEN, 2 * INTER, **f) * 0.03, d=torch.randn(INTER, HIDDEN, **f) * 0.03,
                       n1=torch.ones(HIDDEN, **f), n2=torch.ones(HIDDEN, **f)) for _ in range(layers)]
        self.x, self.res = torch.randn(m, HIDDEN, **f), torch.randn(m, HIDDEN, **f)
        self.h, self.s = torch.empty(m, HIDDEN, **f), torch.empty(m, HIDDEN, **f)
        self.qkv, self.a, self.b = torch.randn(m, Q + 2 * KV, **f), torch.empty(m, Q, **f), torch.empty(m, Q, **f)
        self.gu, self.act = torch.randn(m, 2 * INTER, **f), torch.empty(m, INTER, **f)

    def run(self, pdl: int):
        kw = dict(PDL=pdl, launch_pdl=pdl > 0, num_warps=4)
        m = self.m
        for w in self.w:
            _add_rms[(m,)](self.x, self.res, w["n1"], self.h, self.s, HIDDEN, BLOCK=1024, **kw)
            if self.gemms:
                torch.mm(self.h, w["qkv"], out=self.qkv)
            _rowwise[(m,)](self.qkv, self.a, Q + 2 * KV, Q, BLOCK=2048, **kw)
            _rowwise[(m,)](self.a, self.b, Q, Q, BLOCK=2048, **kw)
            if self.gemms:
                torch.mm(self.b, w["o"], out=self.x)
            _add_rms[(m,)](self.x, self.s, w["n2"], self.h, self.res, HIDDEN, BLOCK=1024, **kw)
            if self.gemms:
                torch.mm(self.h, w["gu"], out=self.gu)
            _silu_mul[(m, INTER // 1024)](self.gu, self.act, INTER, BLOCK=1024, **kw)
            if self.gemms:
                torch.mm(self.act, w["d"], out=self.x)

    def time_us(self, pdl: int, replays: int = 100) -> float:
        self.run(pdl)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self.run(pdl)
        for _ in range(5):
            g.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / replays / self.layers


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="64,256")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(f"triton {triton.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    pdls = [0] + ([1, 2] if gdc_wait is not None else [])
    for m in [int(v) for v in args.ms.split(",")]:
        for lib in ("cublas", "cublaslt", "none"):
            if lib != "none":
                torch.backends.cuda.preferred_blas_library(lib)
            chain = Chain(m, args.layers, gemms=lib != "none")
            times = {pdl: [] for pdl in pdls}
            for _ in range(args.rounds):  # alternated, so drift hits every variant alike
                for pdl in pdls:
                    times[pdl].append(chain.time_us(pdl))
            best = {pdl: min(ts) for pdl, ts in times.items()}
            names = {0: "plain", 1: "pdl", 2: "pdl-early"}
            row = ", ".join(f"{names[pdl]} {us:.2f}" for pdl, us in best.items())
            print(f"M={m:4d} products={lib:8s}: us a layer (best of {args.rounds}): {row}", flush=True)
    torch.backends.cuda.preferred_blas_library("cublas")


if __name__ == "__main__":
    main()
