"""Decode split counts by batch size and context (GPU only): which num_splits reads K/V fastest, against the
default the kernel picks from the launch shape.

    python benchmarks/sweep_splits.py [--batches 16,32,64,128,256 --contexts 1200,mixed --splits 1,2,3,4,6,8]
"""
import argparse

import torch

from benchmarks.kernels_cuda import HEAD_DIM, NUM_KV_HEADS, bench, copy_bandwidth, decode_inputs
from nanovllm.backends.cuda.attention.triton_decode import choose_num_splits, paged_decode


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="16,32,64,96,128,192")
    p.add_argument("--contexts", default="1200", help="tokens per sequence, or 'mixed' (100-2048)")
    p.add_argument("--splits", default="1,2,3,4,6,8")
    args = p.parse_args()
    bw = copy_bandwidth()
    g = torch.Generator().manual_seed(0)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s; fraction of it read per split count")
    for context in args.contexts.split(","):
        context = context if context == "mixed" else int(context)
        for batch in map(int, args.batches.split(",")):
            q, k_cache, v_cache, meta, kv_bytes = decode_inputs(batch, context, 16, g)
            row = []
            for splits in map(int, args.splits.split(",")):
                s = bench(lambda: paged_decode(q, k_cache, v_cache, meta.context_lens, meta.block_tables,
                                               HEAD_DIM ** -0.5, num_splits=splits))
                row.append(f"{splits}:{kv_bytes / s / bw:.3f}")
            default = choose_num_splits(batch, NUM_KV_HEADS, q.device)
            print(f"context {context} batch {batch:>4} (default {default}): " + "  ".join(row))
            del k_cache, v_cache


if __name__ == "__main__":
    main()
