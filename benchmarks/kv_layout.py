"""Decode attention over two KV cache layouts (GPU only): token-major pages, as the cache is allocated now
([blocks, block_size, kv_heads, head_dim]: a page holds each token's KV heads side by side), against head-major
pages ([blocks, kv_heads, block_size, head_dim]: each KV head's tokens of a page contiguous, 2 KiB of FP8 or 4 KiB
of bf16 at head_dim 128 and 16-token pages). The kernels take the cache's strides, so the same kernel reads both;
the head-major cache is passed as a permuted view of the same logical shape. Measured on an H200 and not adopted
(benchmarks/RESULTS.md, round seven).

    python benchmarks/kv_layout.py [--batches 64,128,256] [--contexts 1024,mixed]

Timed as the engine runs the kernel (`sweep_splits.graph_seconds`: one CUDA graph, two input sets each larger than
L2, longest-first order); the outputs of the two layouts must be equal. Prints the fraction of copy bandwidth at
which K/V are read for each layout.
"""
import argparse

import torch

from benchmarks.kernels_cuda import copy_bandwidth
from benchmarks.sweep_splits import decode_call, graph_seconds, sweep_cases


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
    for kv_name, context, batch, cases, kv_bytes in sweep_cases(args):
        moved = [head_major(c) for c in cases]
        same = torch.equal(decode_call(cases[0])(), decode_call(moved[0])())
        times = {}
        for _ in range(2):  # alternated
            for name, cs in (("token", cases), ("head", moved)):
                t = graph_seconds([decode_call(c) for c in cs])
                times[name] = min(times.get(name, t), t)
        print(f"{kv_name:>14} ctx {context!s:>5} batch {batch:3d}: token-major "
              f"{kv_bytes / times['token'] / bw:.3f}  head-major {kv_bytes / times['head'] / bw:.3f}  "
              f"outputs equal: {same}", flush=True)


if __name__ == "__main__":
    main()
