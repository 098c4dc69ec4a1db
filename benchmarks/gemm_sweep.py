"""cuBLAS against the Triton decode GEMM (nanovllm/backends/cuda/linear.py) at the Qwen3-0.6B shapes, small M.

    python benchmarks/gemm_sweep.py --out sweep.json [--shapes qkv,o,gate_up,down,lm_head] [--ms 1,8,32,64,128,256]
                                    [--chain 32,256]

Each layer product runs over 28 weight copies in one CUDA graph (the model's 28 layers: weights come from HBM,
not L2); the LM head (311 MB) over one. Times are us per call (median of 5 groups of 20 graph replays) and the
fraction of the weight-read time at the copy bandwidth measured first. Phase 1 times a grid of tile shapes and
splits, plain and swapped (out.T = w @ x.T; warps and stages derived); phase 2 varies warps and stages around
each shape's three best. gate_up is also timed with SiLU-and-mul in its epilogue against cuBLAS + act.silu_mul.
Configurations are compiled first in parallel worker processes (Triton's cache on disk), then timed in this one.
`--chain`: 28 layers of qkv -> o -> gate_up -> SiLU -> down with real data dependencies (o reads qkv's first
2048 columns), all cuBLAS against each product by what the sweep found faster, also as programmatic dependent
launches (PDL). The first device run (RESULTS.md) also tried the next kernel launching at the start of each
GEMM and the weights prefetched into L2 before the wait: both slower, and removed.
"""
import argparse
import itertools
import json
import multiprocessing as mp
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanovllm.backends.cuda.linear import Config, fits, matmul  # noqa: E402

SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072),
          "lm_head": (151936, 1024)}
LAYERS = 28
SMEM = 227 * 1024


def derived(bm, bn, bk, split, swap=False) -> Config:
    warps = (4 if bn <= 64 else 8) if swap else (4 if bm * bn <= 64 * 128 else 8)
    stages = 4 if bk <= 128 else 3
    return Config(bm, bn, bk, split, warps, stages, swap)


def smem_ok(c: Config) -> bool:
    return (c.block_m + c.block_n) * c.block_k * 2 * c.stages <= SMEM


def phase1(name: str, m: int, swapped_only: bool = False) -> list[Config]:
    n, k = SHAPES[name]
    p2 = 1 << max(m - 1, 0).bit_length()
    bms = sorted({max(16, min(128, p2 // 2)), max(16, min(128, p2))})
    splits = (1,) if name == "lm_head" else (1, 2, 4, 8)
    out = []
    for bm, bn, bk, split in itertools.product(bms, (64, 128, 256), (64, 128, 256), () if swapped_only else splits):
        c = derived(bm, bn, bk, split)
        if bm * bn <= 128 * 128 and smem_ok(c) and fits(m, n, k, c):
            out.append(c)
    # swapped (out.T = w @ x.T): 64 or 128 weight rows on the MMA's M side, up to 256 rows of x on its N side
    for bm, bn, bk, split in itertools.product(sorted({max(16, min(256, p2 // 2)), max(16, min(256, p2))}),
                                               (64, 128), (64, 128, 256), splits):
        c = derived(bm, bn, bk, split, swap=True)
        if bm * bn <= 128 * 256 and smem_ok(c) and fits(m, n, k, c):
            out.append(c)
    return out


def phase2(best: list[Config]) -> list[Config]:
    out = []
    for c in best:
        for warps, stages in itertools.product((4, 8), (2, 3, 4, 5)):
            v = c._replace(warps=warps, stages=stages)
            if smem_ok(v) and v not in best:
                out.append(v)
    return out


def _compile(items):
    torch.cuda.set_device(0)
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)  # K large enough for every split
    w = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
    failed = []
    for c, glu in items:
        try:
            matmul(x, w, Config(*c), glu=glu)
        except Exception as e:  # noqa: BLE001 - a configuration that does not compile is reported and skipped
            failed.append((c, f"{type(e).__name__}: {str(e)[:100]}"))
    torch.cuda.synchronize()
    return failed


def compile_all(configs: list[Config], workers: int, glu: bool = False) -> set[Config]:
    configs = sorted(set(configs))
    chunks = [[(tuple(c), glu) for c in configs[i::workers]] for i in range(workers)]
    t = time.time()
    with mp.get_context("spawn").Pool(workers) as pool:
        failed = [f for part in pool.map(_compile, chunks) for f in part]
    for c, why in failed:  # _compile reports (config tuple, why)
        print(f"  config {c} failed: {why}")
    print(f"compiled {len(configs)} configurations{' (gate/up + SiLU)' if glu else ''} in {time.time() - t:.0f} s",
          flush=True)
    return {Config(*c) for c, _ in failed}


def graph_us(fn, calls: int) -> float:
    """us per call of fn(i), i in range(calls), captured once and replayed."""
    for i in range(calls):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / 20 / calls)
    return sorted(times)[2]


def bandwidth() -> float:
    """Bytes per second of a 256 MB device-to-device copy (read + write)."""
    a, b = (torch.empty(1 << 26, dtype=torch.float32, device="cuda") for _ in range(2))
    us = graph_us(lambda i: a.copy_(b), 8)
    return 2 * a.numel() * 4 / (us * 1e-6)


def sweep(names: list[str], ms: list[int], bw: float, workers: int, swapped_only: bool = False) -> dict:
    """Phase 1 over every shape and M, then phase 2 around each one's three best (compiled in parallel first)."""
    weights = {name: [torch.randn(*SHAPES[name], device="cuda", dtype=torch.bfloat16) * 0.03
                      for _ in range(1 if name == "lm_head" else LAYERS)] for name in names}
    inputs = {(name, m): torch.randn(m, SHAPES[name][1], device="cuda", dtype=torch.bfloat16) for name in names
              for m in ms}
    timed = {key: {} for key in inputs}
    failed = compile_all([c for name, m in inputs for c in phase1(name, m, swapped_only)], workers)

    def run(name, m, configs):
        x, w = inputs[name, m], weights[name]
        ref = x.float() @ w[0].float().t()
        for c in configs:
            if c in failed or c in timed[name, m]:
                continue
            try:
                err = ((matmul(x, w[0], c).float() - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    print(f"  {name} M={m} {tuple(c)}: relative error {err:.1e}")
                    continue
                timed[name, m][c] = graph_us(lambda i: matmul(x, w[i], c), len(w))
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: skipped, said
                print(f"  {name} M={m} {tuple(c)}: {type(e).__name__}: {str(e)[:100]}")
                failed.add(c)
    t = time.time()
    for name, m in inputs:
        run(name, m, phase1(name, m, swapped_only))
    print(f"phase 1: {time.time() - t:.0f} s", flush=True)
    second = {key: phase2(sorted(timed[key], key=timed[key].get)[:3]) for key in inputs}
    failed |= compile_all([c for cs in second.values() for c in cs], workers)
    t = time.time()
    results = {}
    for (name, m), configs in second.items():
        run(name, m, configs)
        x, w = inputs[name, m], weights[name]
        n, k = SHAPES[name]
        floor = n * k * 2 / bw * 1e6
        t_cublas = graph_us(lambda i: torch.nn.functional.linear(x, w[i]), len(w))
        ranked = sorted(timed[name, m], key=timed[name, m].get)
        best = ranked[0]
        t_best = timed[name, m][best]
        results[f"{name}/{m}"] = dict(name=name, m=m, n=n, k=k, floor_us=floor, cublas_us=t_cublas,
                                      triton_us=t_best, config=list(best),
                                      top5=[[list(c), timed[name, m][c]] for c in ranked[:5]])
        print(f"{name:>8} M={m:>4}  floor {floor:7.2f}  cuBLAS {t_cublas:7.2f} ({floor / t_cublas:.2f})  "
              f"triton {t_best:7.2f} ({floor / t_best:.2f}) {tuple(best)}  x{t_cublas / t_best:.2f}", flush=True)
    print(f"phase 2: {time.time() - t:.0f} s", flush=True)
    if "gate_up" in names:
        glu(results, weights["gate_up"], {m: inputs["gate_up", m] for m in ms}, workers)
    return results


def glu(results: dict, weights: list[torch.Tensor], inputs: dict, workers: int) -> None:
    """gate_up with SiLU-and-mul in its epilogue (one kernel, half the output) against cuBLAS + act.silu_mul."""
    from nanovllm.backends.cuda.elementwise import silu_mul
    candidates = {}
    for m in inputs:
        top = [Config(*c) for c, _ in results[f"gate_up/{m}"]["top5"][:3]]
        halves = [c._replace(block_n=max(c.block_n // 2, 64 if c.swap else 16)) for c in top]
        fewer_stages = [c._replace(stages=max(2, c.stages - 1)) for c in top]  # two weight tiles per stage
        candidates[m] = list(dict.fromkeys(top + halves + fewer_stages))
    failed = compile_all([c for cs in candidates.values() for c in cs], workers, glu=True)
    for m, x in inputs.items():
        separate = graph_us(lambda i: silu_mul(torch.nn.functional.linear(x, weights[i])), len(weights))
        timed = {}
        for c in candidates[m]:
            if c not in failed:
                timed[c] = graph_us(lambda i: matmul(x, weights[i], c, glu=True), len(weights))
        if not timed:
            print(f"gate_up+silu M={m}: no configuration ran")
            continue
        best = min(timed, key=timed.get)
        results[f"gate_up/{m}"].update(silu_separate_us=separate, glu_us=timed[best], glu_config=list(best))
        print(f"gate_up+silu M={m:>4}  cuBLAS + silu_mul {separate:7.2f}  fused {timed[best]:7.2f} {tuple(best)}  "
              f"x{separate / timed[best]:.2f}", flush=True)


def chain(results: dict, ms: list[int]) -> dict:
    """28 layers of qkv -> o -> gate_up -> SiLU-and-mul -> down with real dependencies: all cuBLAS (+ the
    act.silu_mul kernel), each product by what the sweep found faster (fused SiLU where it won), and that with
    the Triton kernels launched as programmatic dependent launches (PDL)."""
    from nanovllm.backends.cuda.elementwise import silu_mul
    names = ("qkv", "o", "gate_up", "down")
    weights = {nm: [torch.randn(*SHAPES[nm], device="cuda", dtype=torch.bfloat16) * 0.03 for _ in range(LAYERS)]
               for nm in names}
    out = {}
    for m in ms:
        h0 = torch.randn(m, SHAPES["qkv"][1], device="cuda", dtype=torch.bfloat16)
        r = {nm: results[f"{nm}/{m}"] for nm in names}
        use = {nm: Config(*r[nm]["config"]) if r[nm]["triton_us"] < r[nm]["cublas_us"] else None for nm in names}
        fused = r["gate_up"].get("glu_us", float("inf")) < r["gate_up"].get("silu_separate_us", 0)

        def layers(mode):
            def prod(nm, x, i):
                if mode == "cublas" or use[nm] is None:
                    return torch.nn.functional.linear(x, weights[nm][i])
                return matmul(x, weights[nm][i], use[nm], pdl=mode == "table_pdl")

            def step(i):
                qkv = prod("qkv", h0 if i == 0 else step.h, i)
                o = prod("o", qkv[:, :SHAPES["o"][1]], i)
                if mode != "cublas" and fused:
                    act = matmul(o, weights["gate_up"][i], Config(*r["gate_up"]["glu_config"]), glu=True,
                                 pdl=mode == "table_pdl")
                else:
                    act = silu_mul(prod("gate_up", o, i))
                step.h = prod("down", act, i)
            step.h = h0
            return step
        row = {}
        for mode in ("cublas", "table", "table_pdl"):
            try:
                row[mode] = graph_us(layers(mode), LAYERS) * LAYERS
            except Exception as e:  # noqa: BLE001 - PDL may not capture on this stack: say so, keep the rest
                print(f"  chain M={m} {mode}: {type(e).__name__}: {str(e)[:200]}")
        out[str(m)] = dict(row, choice={nm: list(c) if c else "cuBLAS" for nm, c in use.items()}, fused_silu=fused)
        print(f"chain M={m}: " + ", ".join(f"{k} {v:.1f} us" for k, v in row.items())
              + f" (28 layers; Triton for {[nm for nm in names if use[nm]]}, fused SiLU {fused})", flush=True)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--ms", default="1,8,32,64,128,256")
    p.add_argument("--chain", default="32,256")
    p.add_argument("--workers", type=int, default=min(15, os.cpu_count() or 1))
    p.add_argument("--out", default="gemm_sweep.json")
    p.add_argument("--swapped-only", action="store_true", help="phase 1 times swapped-operand tiles only")
    args = p.parse_args()
    ms = [int(m) for m in args.ms.split(",")]
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    bw = bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    results = sweep(args.shapes.split(","), ms, bw, args.workers, args.swapped_only)
    report = dict(device=torch.cuda.get_device_name(), bandwidth=bw, results=results)
    json.dump(report, open(args.out, "w"), indent=1)
    if args.chain and all(nm in args.shapes.split(",") for nm in ("qkv", "o", "gate_up", "down")):
        report["chain"] = chain(results, [int(m) for m in args.chain.split(",")])
        json.dump(report, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
