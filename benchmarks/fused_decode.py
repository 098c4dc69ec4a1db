"""A decode layer's q/k/v transform + KV store + attention: two kernels (`rotary_qk_store`, the paged decode kernel)
against the fused one (backends/cuda/attention/triton_decode_fused.py), timed in CUDA graphs as the engine runs
them, at Qwen3-0.6B's shape (16 query heads, 8 KV heads of 128, folded norms' row scale of 1,024, 16-token pages).

    python benchmarks/fused_decode.py [--batches 256,64,16,4,1] [--context 1024] [--json out.json]

Per batch and KV dtype: microseconds a layer for the two kernels, the fused kernel, and (FP8) the fused kernel with
its registers capped (`FP8_MAX_REGISTERS`); each replay is `--layers` layers over as many caches, so K/V come from
HBM as in a step.
"""
import argparse
import json

import torch

from nanovllm.backends.cuda.attention import triton_decode_fused as fused_module
from nanovllm.backends.cuda.attention.triton_decode import paged_decode
from nanovllm.backends.cuda.rotary_store import rotary_qk_store
from nanovllm.core.kv_quant import quantize
from nanovllm.core.step_metadata import DecodeMetadata

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, PAGE = 16, 8, 128, 1024, 16


def graph_us(fn, layers: int, replays: int = 20) -> float:
    """Microseconds per layer: the median replay of a graph of fn(0..layers-1), over layers."""
    for i in range(layers):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(layers):
            fn(i)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / layers)
    return sorted(times)[len(times) // 2]


def setup(batch: int, context: int, kv_dtype: torch.dtype, layers: int, g: torch.Generator):
    pages = -(-context // PAGE)
    num_blocks = batch * pages
    tables = torch.randperm(num_blocks, generator=g).view(batch, pages).to(torch.int32).cuda()
    caches = []
    scales = (torch.full((KV_HEADS,), 0.05).cuda(), torch.full((KV_HEADS,), 0.05).cuda())
    for _ in range(layers):
        pair = []
        for scale in scales:
            values = torch.randn(num_blocks, PAGE, KV_HEADS, HEAD_DIM, device="cuda")
            pair.append(quantize(values, scale, kv_dtype) if kv_dtype.itemsize == 1 else values.to(kv_dtype))
        caches.append(pair)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    positions = (lens - 1).long()
    slots = (tables[:, -1].long() * PAGE + (context - 1) % PAGE)
    meta = DecodeMetadata(lens, tables, context, torch.arange(batch, dtype=torch.int32, device="cuda"))
    qkv = torch.randn(batch, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda").to(torch.bfloat16)
    q, k, v = (t.view(batch, -1, HEAD_DIM) for t in qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM,
                                                             KV_HEADS * HEAD_DIM], dim=1))
    r = torch.randn(batch, HIDDEN, device="cuda").to(torch.bfloat16)
    cos_sin = torch.randn(context + 1, HEAD_DIM, device="cuda")
    norms = (torch.ones(HEAD_DIM, device="cuda", dtype=torch.bfloat16),) * 2
    kv_scales = scales if kv_dtype.itemsize == 1 else (None, None)
    return caches, meta, slots, positions, q, k, v, r, cos_sin, norms, kv_scales


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="256,128,64,16,4,1")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--json")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    results = []
    for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        for batch in map(int, args.batches.split(",")):
            caches, meta, slots, positions, q, k, v, r, cos_sin, norms, kv_scales = setup(
                batch, args.context, kv_dtype, args.layers, g)
            scale = HEAD_DIM ** -0.5

            def two_kernels(i):
                q_rot, _ = rotary_qk_store(positions, q, k, v, cos_sin, *norms, 1e-6, *caches[i], slots, False,
                                           *kv_scales, row_scale_of=r, row_eps=1e-6)
                paged_decode(q_rot, *caches[i], meta.context_lens, meta.block_tables, scale, k_scale=kv_scales[0],
                             v_scale=kv_scales[1], seq_order=meta.seq_order)

            def fused(i):
                fused_module.fused_decode(positions, q, k, v, cos_sin, *norms, 1e-6, *caches[i], slots, meta, scale,
                                          *kv_scales, row_scale_of=r, row_eps=1e-6)
            row = {"kv": str(kv_dtype).removeprefix("torch."), "batch": batch,
                   "fuses": fused_module.fused_plan(q, caches[0][0]) is not None,
                   "two_kernels_us": graph_us(two_kernels, args.layers), "fused_us": graph_us(fused, args.layers)}
            if kv_dtype.itemsize == 1:
                fused_module.FP8_MAX_REGISTERS = 96
                row["fused_96_registers_us"] = graph_us(fused, args.layers)
                fused_module.FP8_MAX_REGISTERS = None
            kv_bytes = 2 * batch * args.context * KV_HEADS * HEAD_DIM * kv_dtype.itemsize
            row["fused_TBps"] = kv_bytes / row["fused_us"] / 1e6
            results.append(row)
            print("  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
            caches = None  # free the layers' caches before the next batch
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
