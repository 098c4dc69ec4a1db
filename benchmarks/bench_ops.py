"""Per-op timings of a decode step's non-attention work on the GPU, to choose what to write.

    python benchmarks/bench_ops.py [--gemm] [--sampler]   (--sampler also times top-k 20 + top-p 0.95 steps)

GEMMs: the Qwen3-0.6B projections at small M through cuBLAS (PyTorch's default and cuBLASLt) and a plain
Triton kernel over a few tile shapes (split-K writes fp32 partials, as a fused reduce would read them).
Each variant runs over 28 weight copies in one CUDA graph (the model's 28 layers: weights come from HBM,
not L2); times are per call, medians of graph replays.
"""
import argparse

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}
LAYERS = 28


@triton.jit
def _mm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               SPLIT_K: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    k_per = K // SPLIT_K
    a_ptrs = a_ptr + offs_m[:, None] * K + (pid_k * k_per + offs_k)[None, :]
    b_ptrs = b_ptr + offs_n[None, :] * K + (pid_k * k_per + offs_k)[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, k_per, BK):
        a = tl.load(a_ptrs, mask=offs_m[:, None] < M, other=0.0)
        b = tl.load(b_ptrs)
        acc = tl.dot(a, b, acc)
        a_ptrs += BK
        b_ptrs += BK
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(c_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)


def triton_mm(a, w, out, cfg):
    bm, bn, bk, split, warps, stages = cfg
    m, k = a.shape
    n = w.shape[0]
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), split)
    _mm_kernel[grid](a, w, out, m, n, k, BM=bm, BN=bn, BK=bk, SPLIT_K=split, num_warps=warps, num_stages=stages)


def graph_time(fn) -> float:
    """us per call of fn(i) for i in range(LAYERS), captured once and replayed."""
    for i in range(LAYERS):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(LAYERS):
            fn(i)
    ms = do_bench(g.replay, warmup=25, rep=100, return_mode="median")
    return ms * 1000 / LAYERS


def gemm_table(ms: list[int]):
    configs = [(64, 64, 128, 1, 4, 4), (64, 128, 64, 1, 4, 4), (128, 64, 64, 1, 4, 4), (128, 128, 64, 1, 8, 3),
               (64, 64, 128, 2, 4, 4), (64, 64, 128, 4, 4, 4), (128, 64, 128, 4, 8, 3), (16, 64, 256, 1, 4, 4),
               (16, 64, 256, 4, 4, 4), (32, 64, 128, 2, 4, 4)]
    bw = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    copy_s = do_bench(lambda: bw[: 1 << 29].copy_(bw[1 << 29:]), return_mode="median") / 1000
    bandwidth = 2 * (1 << 29) / copy_s
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"{'shape':>8} {'M':>4} {'floor':>6} {'cublas':>7} {'lt':>7} {'best triton':>12} config")
    for name, (n, k) in SHAPES.items():
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            floor = max(n * k * 2 / bandwidth, 2 * m * n * k / 780e12) * 1e6
            torch.backends.cuda.preferred_blas_library("cublas")
            t_cublas = graph_time(lambda i: torch.matmul(x, weights[i].t(), out=out))
            torch.backends.cuda.preferred_blas_library("cublaslt")
            t_lt = graph_time(lambda i: torch.matmul(x, weights[i].t(), out=out))
            torch.backends.cuda.preferred_blas_library("cublas")
            ref = x.float() @ weights[0].float().t()
            best = (float("inf"), None)
            for cfg in configs:
                if cfg[0] > max(16, triton.next_power_of_2(m)) * 2 or k % (cfg[2] * cfg[3]):
                    continue
                part = torch.empty(cfg[3], m, n, device="cuda", dtype=torch.float32) if cfg[3] > 1 else out
                try:
                    triton_mm(x, weights[0], part, cfg)
                    got = part.sum(0) if cfg[3] > 1 else part.float()
                    err = ((got - ref).norm() / ref.norm()).item()
                    if not err < 1e-2:
                        print(f"  {name} M={m} {cfg}: error {err:.2e}")
                        continue
                    t = graph_time(lambda i: triton_mm(x, weights[i], part, cfg))
                except Exception as e:  # a config that does not compile or fit
                    print(f"  {name} M={m} {cfg}: {type(e).__name__}: {str(e)[:80]}")
                    continue
                best = min(best, (t, cfg), key=lambda p: p[0])
            print(f"{name:>8} {m:>4} {floor:6.2f} {t_cublas:7.2f} {t_lt:7.2f} {best[0]:12.2f} {best[1]}", flush=True)


def sampler_table():
    from nanovllm.backends.cuda import sampler
    from nanovllm.core.sampler import SamplingTensors
    print("sampler module:", sampler.__file__)
    for b in (32, 256):
        logits = torch.randn(b, 151936, device="cuda", dtype=torch.bfloat16)
        read_us = logits.numel() * 2 / 4.3e12 * 1e6
        seeds = {"a seed drawn per call": None,
                 "a device seed (as in the decode graph)": torch.zeros(1, dtype=torch.int64, device="cuda")}
        for how, seed in seeds.items():
            params = SamplingTensors(torch.full((b,), 0.6, device="cuda"), seed=seed)
            sampler.sample(logits, params)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                sampler.sample(logits, params)
            ms = do_bench(g.replay, warmup=25, rep=100, return_mode="median")
            print(f"sampler batch {b}, {how}: {ms * 1000:.1f} us (one read of the logits ~{read_us:.1f} us)")
        # Qwen3's generation_config: top_k 20, top_p 0.95 on every row (not graph-captured: eager, as the engine)
        from nanovllm.core import sampler as reference
        filtered = SamplingTensors(torch.full((b,), 0.6, device="cuda"), top_k=torch.full((b,), 20, device="cuda"),
                                   top_p=torch.full((b,), 0.95, device="cuda"), top_k_bound=20)
        for name, fn in (("reference (sort)", reference.sample), ("cuda (candidates)", sampler.sample)):
            ms = do_bench(lambda: fn(logits, filtered), warmup=25, rep=100, return_mode="median")
            print(f"sampler batch {b}, top_k 20 + top_p 0.95, {name}: {ms * 1000:.1f} us")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gemm", action="store_true")
    p.add_argument("--sampler", action="store_true")
    p.add_argument("--m", default="32,64,128,256")
    args = p.parse_args()
    if args.sampler:
        sampler_table()
    if args.gemm:
        gemm_table([int(m) for m in args.m.split(",")])


if __name__ == "__main__":
    main()
