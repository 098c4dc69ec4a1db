"""Decode attention over two KV cache layouts (GPU only): token-major pages, as the cache is allocated now
([blocks, block_size, kv_heads, head_dim]: a page holds each token's KV heads side by side), against head-major
pages ([blocks, kv_heads, block_size, head_dim]: each KV head's tokens of a page contiguous, 2 KiB of FP8 or 4 KiB
of bf16 at head_dim 128 and 16-token pages). The kernels take the cache's strides, so the same kernel reads both;
the head-major cache is passed as a permuted view of the same logical shape.

    python benchmarks/kv_layout.py [--batches 64,128,256] [--contexts 1024,mixed]

Timed as the engine runs the kernel (`sweep_splits.graph_seconds`: one CUDA graph, two input sets each larger than
L2, longest-first order); the outputs of the two layouts must be equal. Prints the fraction of copy bandwidth at
which K/V are read for each layout.
"""
import argparse

import torch

from benchmarks.fp8_decode import inputs
from benchmarks.kernels_cuda import copy_bandwidth
from benchmarks.sweep_splits import decode_call, graph_seconds


def head_major(case):
    """The same case with each cache stored head-major (a permuted view of a contiguous [N, KV, B, D] tensor)."""
    q, caches, scales, meta, kv_bytes = case
    moved = tuple(c.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3) for c in caches)
    return q, moved, scales, meta, kv_bytes


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="64,128,256")
    p.add_argument("--contexts", default="1024,mixed")
    p.add_argument("--kv-dtypes", default="bfloat16,float8_e4m3fn")
    args = p.parse_args()
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bw / 1e9:.0f} GB/s; fraction of it at which K/V are "
          f"read: token-major / head-major pages")
    for kv_name in args.kv_dtypes.split(","):
        kv_dtype = getattr(torch, kv_name)
        for context in args.contexts.split(","):
            context = context if context in ("mixed", "padded") else int(context)
            for batch in map(int, args.batches.split(",")):
                cases = [inputs(batch, context, kv_dtype, seed=seed) for seed in (0, 1)]
                moved = [head_major(c) for c in cases]
                kv_bytes = sum(c[-1] for c in cases) / len(cases)
                a, b = decode_call(cases[0]), decode_call(moved[0])
                same = torch.equal(a(), b())
                times = {}
                for _ in range(2):  # alternated
                    for name, cs in (("token", cases), ("head", moved)):
                        t = graph_seconds([decode_call(c) for c in cs])
                        times[name] = min(times.get(name, t), t)
                print(f"{kv_name:>14} ctx {context!s:>5} batch {batch:3d}: token-major "
                      f"{kv_bytes / times['token'] / bw:.3f}  head-major {kv_bytes / times['head'] / bw:.3f}  "
                      f"outputs equal: {same}", flush=True)
                del cases, moved


if __name__ == "__main__":
    main()
