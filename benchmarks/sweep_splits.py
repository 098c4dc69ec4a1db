"""Decode split counts at mid-size batches (GPU only): which num_splits reads K/V fastest.

    python benchmarks/sweep_splits.py
"""
import torch

from benchmarks.kernels_cuda import HEAD_DIM, NUM_KV_HEADS, bench, copy_bandwidth, decode_inputs
from nanovllm.backends.cuda.attention.triton_decode import choose_num_splits, paged_decode


def main():
    bw = copy_bandwidth()
    g = torch.Generator().manual_seed(0)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    for batch in (16, 32, 64, 96, 128, 192):
        q, k_cache, v_cache, meta, kv_bytes = decode_inputs(batch, 1200, 16, g)
        row = []
        for splits in (1, 2, 3, 4, 6, 8):
            s = bench(lambda: paged_decode(q, k_cache, v_cache, meta.context_lens, meta.block_tables, HEAD_DIM ** -0.5,
                                           num_splits=splits))
            row.append(f"{splits}:{kv_bytes / s / bw:.3f}")
        print(f"batch {batch:>4} (default {choose_num_splits(batch, NUM_KV_HEADS, q.device)}): " + "  ".join(row))
        del k_cache, v_cache


if __name__ == "__main__":
    main()
