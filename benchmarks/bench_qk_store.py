"""GPU time of a decode step's q/k norm + rotary + KV store: `rotary.qk` then `kv_cache.store` (two launches a
layer) against the fused `rotary.qk_store` (one), Qwen3-0.6B's shape (16/8 heads of 128, 28 layers).

Each variant runs the 28 layers in one CUDA graph (distinct inputs and caches per layer, as in a step), timed by
replays (median of `--repeats` runs of 20 replays); a prefill-sized call (one layer, 16,384 tokens) runs eagerly.

    python benchmarks/bench_qk_store.py [--batches 32,256] [--kv fp8]
"""
import argparse

import torch

from nanovllm.backends.cuda.elementwise import rotary_qk
from nanovllm.backends.cuda.kv_store import store_kvcache
from nanovllm.backends.cuda.rotary_store import rotary_qk_store

HEADS, KV_HEADS, HEAD_DIM, LAYERS, BLOCK = 16, 8, 128, 28, 16


def layer_inputs(num_tokens: int, kv_dtype: torch.dtype, g: torch.Generator, num_blocks: int):
    qkv = torch.randn(num_tokens, HEADS + 2 * KV_HEADS, HEAD_DIM, generator=g).to("cuda", torch.bfloat16)
    q, k, v = qkv.split([HEADS, KV_HEADS, KV_HEADS], dim=1)
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    caches = [torch.randn(shape, generator=g).to("cuda").to(kv_dtype) for _ in range(2)]
    slots = torch.randperm(num_blocks * BLOCK, generator=g)[:num_tokens].to("cuda")
    scales = [torch.rand(KV_HEADS, generator=g).add(0.5).to("cuda") for _ in range(2)]
    return q, k, v, caches, slots, scales


def make_step(layers, positions, cos_sin, weights, fused: bool, return_k: bool, fp8: bool):
    def step():
        for q, k, v, (k_cache, v_cache), slots, scales in layers:
            scale_args = scales if fp8 else ()
            if fused:
                rotary_qk_store(positions, q, k, v, cos_sin, *weights, 1e-6, k_cache, v_cache, slots, return_k,
                                *scale_args)
            else:
                q2, k2 = rotary_qk(positions, q, k, cos_sin, *weights, 1e-6)
                store_kvcache(k2, v, k_cache, v_cache, slots, *scale_args)
    return step


def time_graph(step, repeats: int) -> float:
    """Median microseconds of one replay of `step` captured in a CUDA graph."""
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / 20)
    return sorted(times)[len(times) // 2]


def time_eager(step, repeats: int) -> float:
    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="32,256")
    p.add_argument("--kv", default="auto,fp8")
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    cos_sin = torch.randn(4096, HEAD_DIM, generator=g).to("cuda")
    weights = tuple(torch.randn(HEAD_DIM, generator=g).to("cuda", torch.bfloat16) for _ in "qk")
    print(f"{torch.cuda.get_device_name()}: q/k norm + rotary + KV store, {HEADS}/{KV_HEADS} heads of {HEAD_DIM}, "
          f"bf16, us of GPU time (median)")
    for kv in args.kv.split(","):
        kv_dtype = torch.float8_e4m3fn if kv == "fp8" else torch.bfloat16
        fp8 = kv == "fp8"
        for batch in map(int, args.batches.split(",")):
            layers = [layer_inputs(batch, kv_dtype, g, 2048) for _ in range(LAYERS)]
            positions = torch.randint(0, 4096, (batch,), generator=g).to("cuda")
            two = time_graph(make_step(layers, positions, cos_sin, weights, False, True, fp8), args.repeats)
            one = time_graph(make_step(layers, positions, cos_sin, weights, True, False, fp8), args.repeats)
            print(f"  decode batch {batch:>4}, KV {kv:>4}: two kernels {two:7.1f} us a step ({two / LAYERS:5.2f} a layer)"
                  f", fused {one:7.1f} ({one / LAYERS:5.2f}); saved {two - one:6.1f} us a step")
        num_tokens = 16384
        layer = [layer_inputs(num_tokens, kv_dtype, g, num_tokens // BLOCK + 16)]
        positions = torch.randint(0, 4096, (num_tokens,), generator=g).to("cuda")
        two = time_eager(make_step(layer, positions, cos_sin, weights, False, True, fp8), args.repeats)
        one = time_eager(make_step(layer, positions, cos_sin, weights, True, True, fp8), args.repeats)
        print(f"  prefill {num_tokens} tokens, KV {kv:>4}: two kernels {two:7.1f} us a layer, fused {one:7.1f} "
              f"(k returned); saved {two - one:6.1f} us a layer")


if __name__ == "__main__":
    main()
