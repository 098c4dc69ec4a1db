"""cuBLAS at Qwen3-0.6B's decode shapes in the layouts it could be called with: which one picks the fastest kernel.

    python benchmarks/gemm_layouts.py [--ms 1,8,16,32,64,128,256] [--out layouts.json]

The engine calls `F.linear(x, w)` with w [N, K] row-major (cuBLAS sees C^T = W x^T: "TN"); o and down add into the
residual (`residual.addmm_(x, w.t())`, beta 1). cuBLAS's heuristic picks a kernel per layout, so the same product can
run on other tiles when the weight is stored transposed (w^T [K, N] contiguous: "NN", `x @ wt`), or when the
output is produced transposed (`w @ x.T`, out [N, M]). Each product runs over 28 weight copies in one CUDA graph
(weights from HBM, as the model's 28 layers read them); us per call, median of 5 groups of 20 replays. Also
`torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction` off, which changes which kernels cuBLAS may
choose. Results print as a table and, with --out, as JSON.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.gemm_sweep import LAYERS, SHAPES, bandwidth, graph_us  # noqa: E402

RESIDUAL = ("o", "down")  # products the engine adds into the residual stream (beta 1)


def variants(name: str, x: torch.Tensor, ws: list[torch.Tensor], wts: list[torch.Tensor], res: torch.Tensor):
    """name -> fn(i) for each way of computing layer i's product."""
    out = {
        "TN linear (main)": lambda i: F.linear(x, ws[i]),
        "NN x @ wt": lambda i: torch.mm(x, wts[i]),
        "out^T = w @ x^T": lambda i: torch.mm(ws[i], x.t()),
    }
    if name in RESIDUAL:
        out["TN addmm_ residual (main)"] = lambda i: res.addmm_(x, ws[i].t())
        out["NN addmm_ residual"] = lambda i: res.addmm_(x, wts[i])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", default="1,8,16,32,64,128,256")
    parser.add_argument("--shapes", default="qkv,o,gate_up,down,lm_head")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ms = [int(m) for m in args.ms.split(",")]
    bw = bandwidth()
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s; {torch.cuda.get_device_name()}, torch {torch.__version__}")
    results = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        copies = 1 if name == "lm_head" else LAYERS
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.03 for _ in range(copies)]
        wts = [w.t().contiguous() for w in ws]
        floor_us = n * k * 2 / bw * 1e6
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            res = torch.zeros(m, n, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ ws[0].float().t()
            row = {"shape": name, "m": m, "floor_us": round(floor_us, 2)}
            for reduced in (True, False):
                torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = reduced
                for label, fn in variants(name, x, ws, wts, res).items():
                    if "residual" not in label:  # the same numbers, whatever the layout
                        got = fn(0).float()
                        got = got.t() if got.shape != ref.shape else got
                        assert (got - ref).abs().max() < 0.05 * ref.abs().max() + 1e-2, (name, m, label)
                    key = label if reduced else f"{label}, reduced-precision reduction off"
                    row[key] = round(graph_us(fn, copies), 2)
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
            results.append(row)
            cells = "  ".join(f"{key.split(' (')[0][:26]} {value}" for key, value in row.items()
                              if key not in ("shape", "m", "floor_us"))
            print(f"{name:8s} M {m:4d} floor {floor_us:6.2f} | {cells}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"bandwidth": bw, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
