"""Decode attention with a bf16 vs an FP8 KV cache (GPU only): K/V bytes read per second against copy bandwidth.

    python benchmarks/fp8_decode.py [--sweep [--configs '64,4,3 32,2,4']] [--compare MODULE] [--json FILE]

Batch 256 x context 1024 (and the mixed lengths of the seed workload), Qwen3-0.6B's heads (16/8, head_dim 128),
block size 16. `--sweep` also times FP8 tile configurations (block_n, num_warps, num_stages); every kernel is also
timed with its programs in longest-first order (`longest_first`); `--compare MODULE` times another paged_decode
(e.g. a copy of main's kernel) in the same run.
"""
import argparse
import json

import torch

from benchmarks.kernels_cuda import HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, bench, copy_bandwidth
from nanovllm.core.kv_quant import quantize
from nanovllm.core.step_metadata import DecodeMetadata

DEVICE = "cuda"


def inputs(batch: int, context, kv_dtype: torch.dtype, block_size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if context in ("mixed", "padded"):
        lens = torch.randint(100, 2049, (batch,), generator=g).tolist()
        if context == "padded":  # a graph batch with a third of its rows empty (context 0)
            lens[batch - batch // 3:] = [0] * (batch // 3)
    else:
        lens = [context] * batch
    blocks = [-(-n // block_size) for n in lens]
    perm = torch.randperm(sum(blocks), generator=g)
    table = torch.zeros(batch, max(blocks), dtype=torch.int32)
    start = 0
    for i, n in enumerate(blocks):
        table[i, :n] = perm[start:start + n].int()
        start += n
    shape = (sum(blocks), block_size, NUM_KV_HEADS, HEAD_DIM)
    scales = (torch.full((NUM_KV_HEADS,), 0.01, device=DEVICE), torch.full((NUM_KV_HEADS,), 0.01, device=DEVICE))
    caches = []
    for scale in scales:
        values = torch.randn(shape, dtype=torch.bfloat16, device=DEVICE)
        caches.append(values if kv_dtype == torch.bfloat16 else
                      quantize(values.flatten(0, 1), scale, kv_dtype).view(shape))
    meta = DecodeMetadata(torch.tensor(lens, dtype=torch.int32, device=DEVICE), table.to(DEVICE), max(lens))
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=DEVICE)
    kv_bytes = 2 * sum(lens) * NUM_KV_HEADS * HEAD_DIM * kv_dtype.itemsize
    return q, caches, scales if kv_dtype != torch.bfloat16 else (None, None), meta, kv_bytes


def main() -> None:
    import importlib

    from nanovllm.backends.cuda.attention.triton_decode import DecodeConfig, paged_decode
    from nanovllm.core.step_metadata import longest_first
    p = argparse.ArgumentParser()
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--compare", help="a module with another paged_decode (e.g. main's kernel), timed beside this one")
    p.add_argument("--configs", default="64,4,3 128,4,3 128,4,2 128,8,3 64,8,4 32,4,4 64,2,4",
                   help="FP8 tile configurations for --sweep: block_n,num_warps,num_stages separated by spaces")
    p.add_argument("--json")
    args = p.parse_args()
    sweep = [tuple(map(int, c.split(","))) for c in args.configs.split()]
    kernels = {"this": paged_decode}
    if args.compare:
        kernels = {"compared": importlib.import_module(args.compare).paged_decode, **kernels}
    copy_bw = copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)")
    rows = []
    for context in (1024, "mixed"):
        for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            q, (k_cache, v_cache), (k_scale, v_scale), meta, kv_bytes = inputs(256, context, kv_dtype)
            order = torch.from_numpy(longest_first(meta.context_lens.tolist())).to(meta.context_lens.device)
            cases = [(name, fn, None, None) for name, fn in kernels.items()] + [("this", paged_decode, None, order)]
            if args.sweep and kv_dtype == torch.float8_e4m3fn:
                cases += [("this", paged_decode, DecodeConfig(*c), order) for c in sweep]
            for name, fn, config, seq_order in cases:
                extra = dict(seq_order=seq_order) if seq_order is not None else {}
                s = bench(lambda: fn(q, k_cache, v_cache, meta.context_lens, meta.block_tables, HEAD_DIM ** -0.5,
                                     config=config, k_scale=k_scale, v_scale=v_scale, **extra))
                row = dict(kernel=name, kv_dtype=str(kv_dtype).removeprefix("torch."), batch=256, context=context,
                           config=str(config) if config else "default", longest_first=seq_order is not None,
                           us=round(s * 1e6, 1), kv_GBps=round(kv_bytes / s / 1e9),
                           of_copy_bw=round(kv_bytes / s / copy_bw, 3))
                rows.append(row)
                print(row, flush=True)
    lens = inputs(256, "mixed", torch.bfloat16)[3].context_lens
    print(f"longest_first of 256 lengths: {bench(lambda: longest_first(lens)) * 1e6:.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(copy_GBps=copy_bw / 1e9, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
