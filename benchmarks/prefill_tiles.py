"""Tile shapes of the Triton prefill attention on prefill steps of Qwen3-0.6B's shape (GPU only).

Each candidate `BMxBN/warps/stages/pack` (pack: query heads of one KV head a program takes) runs the same steps as
the default `prefill_config`, alternated over rounds; prints us a call (one layer) and the largest difference
from the default's output. Steps with no cache also run PyTorch's FlashAttention-2 varlen (the `torch_flash`
kernel, which the default plan ran there until round twenty-three measured it 1.4-1.7x slower). The steps:
- `seed paged` (bf16 and FP8 cache): 16,384 tokens of 100-1,024-token prompts, the first continuing 300 cached
  tokens, as the seed benchmark's prefill steps after its first (a block table; bf16 reads the prefix-free
  prompts apart, `split_launch`);
- `seed unpaged`: the same prompts, none cached (the seed run's first step);
- `16 x 1024`, `2 x 8192`, `8 x 128` with no cache; `chunk 2048 after 6144` (a chunked long prompt).

    python benchmarks/prefill_tiles.py [--candidates 64x64/4/3/2 128x64/8/3/2] [--rounds 5] [--json FILE]
"""
import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.gemm_sweep import graph_us  # noqa: E402
from nanovllm.backends.cuda.attention import torch_flash  # noqa: E402
from nanovllm.backends.cuda.attention.triton_prefill import PrefillConfig, paged_prefill, prefill_config  # noqa: E402
from nanovllm.core.step_metadata import PrefillMetadata  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, PAGE = 16, 8, 128, 16
DEVICE = "cuda"


def parse(text: str) -> PrefillConfig:
    tiles, warps, stages, pack = text.split("/")
    block_m, block_n = tiles.split("x")
    return PrefillConfig(int(block_m), int(block_n), int(warps), int(stages), int(pack))


def seed_lengths(total: int, g: torch.Generator) -> list[int]:
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(100, 1025, (1,), generator=g)))
    lengths[-1] -= sum(lengths) - total
    return lengths


def make_step(q_lens: list[int], cached: list[int], paged: bool, kv_dtype: torch.dtype, g: torch.Generator):
    """Inputs of one layer's prefill attention: q/k/v of the chunk, caches holding the whole contexts."""
    dev, dt = DEVICE, torch.bfloat16
    contexts = [a + b for a, b in zip(q_lens, cached)]
    pages = [-(-c // PAGE) for c in contexts]
    num_blocks = sum(pages) + 1
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(q_lens), max(pages), dtype=torch.int32)
    used = 0
    for i, n in enumerate(pages):
        tables[i, :n] = torch.tensor(order[used:used + n])
        used += n
    shape = (num_blocks, PAGE, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=g).to(dev, dt)
    v_cache = torch.randn(shape, generator=g).to(dev, dt)
    tokens = sum(q_lens)
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=g).to(dev, dt)
    q = qkv[:, :HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM)
    k = qkv[:, HEADS * HEAD_DIM:(HEADS + KV_HEADS) * HEAD_DIM].view(tokens, KV_HEADS, HEAD_DIM)
    v = qkv[:, (HEADS + KV_HEADS) * HEAD_DIM:].view(tokens, KV_HEADS, HEAD_DIM)
    if paged:  # the chunk's K/V are in the cache before attention runs, as in the engine
        rows = [int(tables[i, t // PAGE]) * PAGE + t % PAGE
                for i, (c, n) in enumerate(zip(cached, contexts)) for t in range(c, n)]
        flat = torch.tensor(rows, dtype=torch.long, device=dev)
        k_cache.view(-1, KV_HEADS, HEAD_DIM)[flat] = k
        v_cache.view(-1, KV_HEADS, HEAD_DIM)[flat] = v
    scales = None
    if kv_dtype != dt:
        k_cache, v_cache = k_cache.to(kv_dtype), v_cache.to(kv_dtype)
        scales = (torch.ones(KV_HEADS, device=dev), torch.ones(KV_HEADS, device=dev))

    def cumulative(lengths):
        return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    prefix_free = sum(n for n, c in zip(q_lens, cached) if c == 0)
    meta = PrefillMetadata(cumulative(q_lens), cumulative(contexts), max(q_lens), max(contexts),
                           tables.to(dev) if paged else None, prefix_free)
    return q, k, v, k_cache, v_cache, meta, scales


def steps(g: torch.Generator) -> dict:
    seed = seed_lengths(16384, g)
    fp8 = torch.float8_e4m3fn
    return {
        "seed paged bf16": make_step(seed, [300] + [0] * (len(seed) - 1), True, torch.bfloat16, g),
        "seed paged fp8": make_step(seed, [300] + [0] * (len(seed) - 1), True, fp8, g),
        "seed unpaged": make_step(seed, [0] * len(seed), False, torch.bfloat16, g),
        "16 x 1024": make_step([1024] * 16, [0] * 16, False, torch.bfloat16, g),
        "2 x 8192": make_step([8192] * 2, [0] * 2, False, torch.bfloat16, g),
        "8 x 128": make_step([128] * 8, [0] * 8, False, torch.bfloat16, g),
        "chunk 2048 after 6144": make_step([2048], [6144], True, torch.bfloat16, g),
    }


def run(step, config):
    q, k, v, k_cache, v_cache, meta, scales = step
    k_scale, v_scale = scales or (None, None)
    return paged_prefill(q, k, v, k_cache, v_cache, meta, HEAD_DIM ** -0.5, config=config, k_scale=k_scale,
                         v_scale=v_scale)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--candidates", nargs="+", default=["64x64/4/3/2", "128x64/8/3/2", "64x32/4/3/2", "64x64/4/2/2",
                                                        "128x32/8/3/2", "128x64/8/4/2", "128x64/8/3/1"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="write {step: {config: median us}} here")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    cases = steps(g)
    results = {}
    print(f"{torch.cuda.get_device_name()}; GPU us a call (one layer, in CUDA graphs), median of {args.rounds} "
          f"alternated rounds; max |diff| against the default's output")
    for step_name, step in cases.items():
        q, meta = step[0], step[5]
        default = prefill_config(HEAD_DIM, q.dtype, meta.max_seqlen_k, kv_fp8=step[3].dtype != q.dtype)
        configs = {"default": default, **{c: parse(c) for c in args.candidates}}
        runs = {name: (lambda c=c: run(step, c)) for name, c in configs.items()}
        if meta.block_tables is None:  # PyTorch's FlashAttention-2 varlen, the torch_flash kernel
            runs["FA2 varlen"] = lambda: torch_flash.prefill_attention(*step[:5], meta, HEAD_DIM ** -0.5)
        expected = runs["default"]().float()
        diffs = {name: (fn().float() - expected).abs().max().item() for name, fn in runs.items()}
        times = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                times[name].append(graph_us(lambda i, fn=fn: fn(), 4))  # GPU time in CUDA graphs, not the host's
        medians = {name: statistics.median(t) for name, t in times.items()}
        results[step_name] = medians
        d = default
        print(f"{step_name} (default {d.block_m}x{d.block_n}/{d.num_warps}/{d.num_stages}/{d.pack}):")
        for name in runs:
            print(f"  {name:>14} {medians[name]:8.1f} us  {medians[name] / medians['default']:.3f}  "
                  f"diff {diffs[name]:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
