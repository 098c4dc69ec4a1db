"""cuBLAS as torch calls it, against PyTorch's TunableOp (every GEMM implementation it can time, the fastest kept),
at the Qwen3-0.6B decode shapes.

    python benchmarks/gemm_tunable.py [--ms 1,32,128,256]

Each layer product runs over 28 weight copies in one CUDA graph (gemm_sweep.graph_us: weights from HBM). TunableOp
tunes a shape on its first eager call (before capture); its choices are printed with the times.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.gemm_sweep import LAYERS, SHAPES, bandwidth, graph_us  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="1,32,128,256")
    p.add_argument("--shapes", default="qkv,o,gate_up,down")
    args = p.parse_args()
    names, ms = args.shapes.split(","), [int(m) for m in args.ms.split(",")]
    bw = bandwidth()
    weights = {n: [torch.randn(*SHAPES[n], device="cuda", dtype=torch.bfloat16) * 0.03 for _ in range(LAYERS)]
               for n in names}
    inputs = {(n, m): torch.randn(m, SHAPES[n][1], device="cuda", dtype=torch.bfloat16) for n in names for m in ms}

    def time_all():
        return {(n, m): graph_us(lambda i, n=n, m=m: F.linear(inputs[n, m], weights[n][i]), LAYERS)
                for n in names for m in ms}
    default = time_all()
    torch.cuda.tunable.enable(True)
    torch.cuda.tunable.tuning_enable(True)
    torch.cuda.tunable.set_max_tuning_duration(200)
    for (n, m), x in inputs.items():
        F.linear(x, weights[n][0])  # tunes this shape
    torch.cuda.synchronize()
    torch.cuda.tunable.tuning_enable(False)
    tuned = time_all()
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    print(f"{'product':>8} {'M':>4} {'floor us':>8} {'cuBLAS us':>9} {'TunableOp us':>12}")
    total = [0.0, 0.0]
    for (n, m), us in default.items():
        floor = SHAPES[n][0] * SHAPES[n][1] * 2 / bw * 1e6
        print(f"{n:>8} {m:>4} {floor:8.2f} {us:9.2f} {tuned[n, m]:12.2f}")
    for m in ms:
        a, b = sum(default[n, m] for n in names), sum(tuned[n, m] for n in names)
        print(f"M={m}: the four products {a:.2f} us a layer with cuBLAS, {b:.2f} tuned")
    for line in torch.cuda.tunable.get_results():
        print("tuned:", line)


if __name__ == "__main__":
    main()
