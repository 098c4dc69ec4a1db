"""Launch shapes of a decode step's two elementwise kernels at batch > 64: `rotary.qk_store` (programs a token,
warps) and `act.silu_mul` (columns a program, warps), Qwen3-0.6B's shape, with the folded norms' row scale.

At decode batch > 64 a layer runs the q/k/v product, `rotary.qk_store`, attention, the o product, the gate/up
product, `act.silu_mul` and the down product (the fused Triton products lose to cuBLAS there). The two elementwise
kernels take ~3.7 and ~2.3 us a layer at batch 256 against ~1 us of memory traffic each: one program a token
(qk_store: 16 q + 8 KV heads in 4 warps) may leave the SMs too few warps to hide the chain position -> cos/sin,
row -> 1/RMS -> stores. Each variant runs 28 layers in one CUDA graph, each layer's input first rewritten by a
copy (as the product before it leaves it in L2); a graph of the copies alone is subtracted. Prints us a layer,
median of `--rounds` alternated rounds; outputs are checked against round twenty's shape's (equal up to the
rounding of sums that another warp count orders differently).

    python benchmarks/elementwise_shapes.py [--tokens 96,128,192,256,16384] [--kv auto,fp8]
"""
import argparse
import itertools
import json
import time

import torch

from nanovllm.backends.cuda.elementwise import silu_mul
from nanovllm.backends.cuda.rotary_store import rotary_qk_store

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTER, LAYERS, BLOCK = 16, 8, 128, 1024, 3072, 28, 16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run under TRITON_INTERPRET=1, times meaningless


def graph_us(step, rounds: dict, key):
    """Capture `step` in a CUDA graph; each call of the returned function appends the mean time (us) of 20
    replays to rounds[key]."""
    step()
    if DEVICE == "cpu":
        def dry():
            start = time.perf_counter()
            step()
            rounds.setdefault(key, []).append((time.perf_counter() - start) * 1e6)
        return dry
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def timed():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        rounds.setdefault(key, []).append(start.elapsed_time(end) * 1000 / 20)
    return timed


def qk_layers(tokens: int, kv_dtype: torch.dtype, g: torch.Generator, count: int):
    layers = []
    blocks = max(64, 2 * tokens // BLOCK + 2)
    for _ in range(count):
        src = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=g).to(DEVICE, torch.bfloat16)
        qkv = torch.empty_like(src)
        x = torch.randn(tokens, HIDDEN, generator=g).to(DEVICE, torch.bfloat16)
        caches = [torch.zeros(blocks, BLOCK, KV_HEADS, HEAD_DIM, device=DEVICE).to(kv_dtype) for _ in "kv"]
        slots = torch.randperm(blocks * BLOCK, generator=g)[:tokens].to(DEVICE)
        layers.append((src, qkv, x, caches, slots))
    return layers


def qk_step(layers, positions, cos_sin, weights, scales, groups: int | None, warps: int, work: bool, outs: list):
    def step():
        outs.clear()
        for src, qkv, x, (k_cache, v_cache), slots in layers:
            qkv.copy_(src)
            if work:
                q, k, v = qkv.view(len(src), -1, HEAD_DIM).split([HEADS, KV_HEADS, KV_HEADS], 1)
                outs.append(rotary_qk_store(positions, q, k, v, cos_sin, *weights, 1e-6, k_cache, v_cache, slots,
                                            False, *scales, row_scale_of=x, row_eps=1e-6, head_groups=groups,
                                            warps=warps)[0])
    return step


def silu_step(layers, block: int | None, warps: int, work: bool, outs: list):
    def step():
        outs.clear()
        for src, gate_up, x in layers:
            gate_up.copy_(src)
            if work:
                outs.append(silu_mul(gate_up, row_scale_of=x, eps=1e-6, block=block, warps=warps))
    return step


def run_variants(name: str, tokens: int, variants: dict, baseline, rounds_n: int, layers: int) -> dict:
    rounds: dict = {}
    timers = {key: graph_us(step, rounds, key) for key, (step, _) in variants.items()}
    timers["copies"] = graph_us(baseline, rounds, "copies")
    reference = None
    for key, (step, outs) in variants.items():  # outputs of each shape equal the first's
        step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        got = [o.clone() for o in outs]
        if reference is None:
            reference = got
        elif not all(torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2) for a, b in zip(reference, got)):
            raise AssertionError(f"{name} {key}: output differs from {next(iter(variants))}")  # warps reorder sums
    for _ in range(rounds_n):
        for timer in timers.values():
            timer()
    median = {key: sorted(v)[len(v) // 2] for key, v in rounds.items()}
    base = median.pop("copies")
    first = next(iter(median))
    line = ", ".join(f"{key} {(t - base) / layers:.2f}" for key, t in sorted(median.items(), key=lambda kv: kv[1]))
    print(f"{name} {tokens:>5} tokens (us a layer, copies {base / layers:.2f} subtracted; first {first} "
          f"{(median[first] - base) / layers:.2f}): {line}", flush=True)
    return {key: (t - base) / layers for key, t in median.items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="96,128,192,256,16384")
    p.add_argument("--kv", default="auto,fp8")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="write {kernel: {tokens: {shape: us a layer}}} here")
    args = p.parse_args()
    results: dict = {}
    g = torch.Generator().manual_seed(0)
    cos_sin = torch.randn(4096, HEAD_DIM, generator=g).to(DEVICE)
    weights = tuple(torch.randn(HEAD_DIM, generator=g).to(DEVICE, torch.bfloat16) for _ in "qk")
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"{name}: launch shapes of rotary.qk_store and act.silu_mul", flush=True)
    for tokens in map(int, args.tokens.split(",")):
        big = tokens > 4096
        positions = torch.randint(0, 4096, (tokens,), generator=g).to(DEVICE)
        for kv in args.kv.split(","):
            fp8 = kv == "fp8"
            kv_dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
            layers = qk_layers(tokens, kv_dtype, g, 1 if big else LAYERS)
            scales = [torch.rand(KV_HEADS, generator=g).add(0.5).to(DEVICE) for _ in "kv"] if fp8 else []
            variants = {}
            for groups, warps in itertools.product((1, 2, 4, 8), (1, 2, 4, 8)):
                if groups * warps > 16 or (groups, warps) == (1, 1):
                    continue
                outs: list = []
                variants[f"g{groups}w{warps}"] = (qk_step(layers, positions, cos_sin, weights, scales, groups, warps,
                                                          True, outs), outs)
            variants = dict(sorted(variants.items(), key=lambda kv: kv[0] != "g1w4"))  # round twenty's shape first
            baseline = qk_step(layers, positions, cos_sin, weights, scales, 1, 4, False, [])
            results.setdefault(f"qk_store {kv}", {})[tokens] = run_variants(f"qk_store {kv}", tokens, variants,
                                                                             baseline, args.rounds, len(layers))
        layers = [(torch.randn(tokens, 2 * INTER, generator=g).to(DEVICE, torch.bfloat16),
                   torch.empty(tokens, 2 * INTER, device=DEVICE, dtype=torch.bfloat16),
                   torch.randn(tokens, HIDDEN, generator=g).to(DEVICE, torch.bfloat16))
                  for _ in range(1 if big else LAYERS)]
        variants = {}
        for block, warps in itertools.product((1024, 256, 512, 2048, 4096), (4, 1, 2, 8, 16)):
            if block < warps * 64:
                continue
            outs = []
            variants[f"b{block}w{warps}"] = (silu_step(layers, block, warps, True, outs), outs)
        results.setdefault("silu_mul", {})[tokens] = run_variants("silu_mul", tokens, variants,
                                                                   silu_step(layers, None, 4, False, []), args.rounds,
                                                                   len(layers))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
