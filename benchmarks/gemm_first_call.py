"""Host cost of a cuBLAS product's first call at a row count a process has not used before (issue #18).

A seed run's last prefill step (11,755 tokens) launches 16-24 ms slower in a process's first run than in its
second (RESULTS.md, round twenty-seven), with every CUDA module loaded eagerly too; its products meet row counts
no earlier step used. This times, in a fresh process, each of a Qwen3-0.6B layer's four products (bfloat16,
F.linear as the engine calls them at prefill sizes) at a few row counts: the first call's host time (from the call
to its return, the device idle before it) against the second's. Row counts run in the order given, after
`--warm` ones, so whether a first call is paid per row count or per kernel (shared by neighbouring counts) shows.

    python benchmarks/gemm_first_call.py --warm 16384,256 --rows 11755,11756,12000,12288,9001 [--blas cublaslt]

`--scan MAX` instead calls every product at every row count from 1 to MAX in turn, as the engine calls them (o and
down also as the folded layer's C += A B on a residual), and lists the row counts whose first call took over 1 ms
of host (a kernel not run before). `--sweep ALIGN --random N` warms as the cuda backend's start-up does
(backends/cuda/product_warmup.py: every ALIGN-th row count and the one after) and then times first calls at N random row counts up to MAX,
counting those still over 1 ms.

    python benchmarks/gemm_first_call.py --scan 16384
    python benchmarks/gemm_first_call.py --scan 16384 --sweep 8 --random 400
"""
import argparse
import json
import random
import time
import types

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}  # (N, K)


def host_ms(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed * 1000


def engine_products(dev: torch.device) -> list[tuple[str, object, bool]]:
    """The products as product_warmup.layer_products gives them: (name, a plain linear layer, added)."""
    out = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        linear = types.SimpleNamespace(weight=w, linear_op=F.linear, product=lambda x, w=w: F.linear(x, w))
        out.append((name, linear, False))
        if name in ("o", "down"):
            out.append((name + "+=", linear, True))
    return out


def scan(args) -> None:
    from nanovllm.backends.cuda.product_warmup import product_calls, warm_up_rows
    dev = torch.device("cuda")
    calls = product_calls(engine_products(dev), args.scan)
    for _, call in calls:  # cuBLAS's handle and workspace, outside the timings
        call(1)
    start = time.perf_counter()
    if args.sweep:
        for m in warm_up_rows(args.scan, align=args.sweep):
            for _, call in calls:
                call(m)
        torch.cuda.synchronize()
    sweep_s = time.perf_counter() - start
    rows = (sorted(random.Random(0).sample(range(1, args.scan + 1), args.random)) if args.sweep
            else range(1, args.scan + 1))
    new = {name: [] for name, _ in calls}
    for m in rows:
        for name, call in calls:
            ms = host_ms(lambda: call(m))
            if ms > 1.0:
                new[name].append([m, round(ms, 2)])
                print(json.dumps({"product": name, "rows": m, "first_ms": round(ms, 2)}), flush=True)
    print(json.dumps({"scan": args.scan, "sweep": args.sweep, "sweep_s": round(sweep_s, 3), "rows_timed": len(rows),
                      "new_kernel_calls": sum(map(len, new.values())), "torch": torch.__version__,
                      "device": torch.cuda.get_device_name(), "new": new}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--warm", default="16384,256", help="row counts called twice first (the engine's warm-up)")
    p.add_argument("--rows", default="11755,11756,12000,12288,9001")
    p.add_argument("--blas", choices=("default", "cublas", "cublaslt"), default="default")
    p.add_argument("--scan", type=int, default=0, help="every row count 1..SCAN, or with --sweep random ones")
    p.add_argument("--sweep", type=int, default=0, help="warm as the engine does (align SWEEP; 8 is its) first")
    p.add_argument("--random", type=int, default=200, help="with --sweep: row counts timed after it")
    args = p.parse_args()
    if args.blas != "default":
        torch.backends.cuda.preferred_blas_library(args.blas)
    if args.scan:
        return scan(args)
    dev = torch.device("cuda")
    weights = {name: torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for name, (n, k) in SHAPES.items()}
    most = max(int(m) for m in (args.warm + "," + args.rows).split(",") if m)
    inputs = {k: torch.randn(most, k, device=dev, dtype=torch.bfloat16) for k in {k for _, k in SHAPES.values()}}
    for m in (int(m) for m in args.warm.split(",") if m):
        for name, w in weights.items():
            for _ in range(2):
                F.linear(inputs[w.shape[1]][:m], w)
    torch.cuda.synchronize()
    rows = []
    for m in (int(m) for m in args.rows.split(",") if m):
        row = {"rows": m}
        for name, w in weights.items():
            x = inputs[w.shape[1]][:m]
            first = host_ms(lambda: F.linear(x, w))
            second = host_ms(lambda: F.linear(x, w))
            row[name] = [round(first, 3), round(second, 3)]
        row["first_minus_second_ms"] = round(sum(v[0] - v[1] for k, v in row.items() if k in SHAPES), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"blas": args.blas, "warm": args.warm, "torch": torch.__version__,
                      "device": torch.cuda.get_device_name(), "rows": rows}))


if __name__ == "__main__":
    main()
