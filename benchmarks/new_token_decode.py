"""A decode layer's q/k/v-to-attention part three ways, at decode batch sizes (GPU only):

  two kernels    cuBLAS's q/k/v product, `rotary.qk_store` (row-scaled, K/V into the cache), the decode kernel
  new token      cuBLAS's product, `decode_with_new_token` (the store's work inside the decode kernel)
  fused product  `qkv_rotary_store` (the store's work in the product's epilogue), the decode kernel: where its
                 table lists the batch size

    python benchmarks/new_token_decode.py [--batches 32,64,128,256] [--kv-cache-dtype fp8] [--out x.json]

Qwen3-0.6B's shapes (16 heads, 8 KV heads, head_dim 128, hidden 1,024), bfloat16, 16-token pages, sequences
longest first as the engine orders them; contexts all 1,024 or mixed (uniform 256-1,792). Each variant runs over 28
layers (own q/k/v weights, one cache) in one CUDA graph; the variants alternate over rounds; us a layer, the
median of the rounds. The outputs of the first two are compared (they round alike: max |diff| should be 0 or a
bfloat16 ulp).
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.gemm_sweep import graph_us  # noqa: E402

LAYERS, HEADS, KV_HEADS, HEAD_DIM, HIDDEN, PAGE = 28, 16, 8, 128, 1024, 16


def step(batch: int, contexts: str, kv_dtype: torch.dtype, g: torch.Generator) -> dict:
    from nanovllm.core.step_metadata import longest_first
    dev = "cuda"
    if contexts == "mixed":
        lens = torch.randint(256, 1793, (batch,), generator=g).tolist()
    else:
        lens = [int(contexts)] * batch
    pages = [-(-n // PAGE) for n in lens]
    perm = torch.randperm(sum(pages), generator=g)
    table = torch.zeros(batch, max(pages), dtype=torch.int32)
    start = 0
    for i, n in enumerate(pages):
        table[i, :n] = perm[start:start + n].int()
        start += n
    slots = torch.tensor([int(table[i, (n - 1) // PAGE]) * PAGE + (n - 1) % PAGE for i, n in enumerate(lens)])
    fp8 = kv_dtype.itemsize == 1
    caches = [torch.randn(sum(pages), PAGE, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16).to(kv_dtype)
              for _ in range(2)]
    scales = tuple(torch.full((KV_HEADS,), 0.05, device=dev) for _ in range(2)) if fp8 else (None, None)
    inv = 1.0 / (1e6 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    freqs = torch.arange(4096, dtype=torch.float32)[:, None] * inv[None, :]
    return dict(lens=torch.tensor(lens, dtype=torch.int32, device=dev), table=table.to(dev), slots=slots.to(dev),
                positions=torch.tensor(lens, device=dev) - 1, caches=caches, scales=scales,
                order=torch.from_numpy(longest_first(lens)).to(dev),
                cos_sin=torch.cat([freqs.cos(), freqs.sin()], -1).to(dev),
                x=torch.randn(batch, HIDDEN, generator=g).to(dev, torch.bfloat16))


def variants(s: dict, weights: list, norms: list) -> dict:
    import torch.nn.functional as F
    from nanovllm.backends.cuda import qkv_rotary_store as qkv_mod
    from nanovllm.backends.cuda.attention.triton_decode import decode_with_new_token, new_token_config, paged_decode
    from nanovllm.backends.cuda.rotary_store import rotary_qk_store
    x, caches, scales, d = s["x"], s["caches"], s["scales"], HEAD_DIM
    batch = x.shape[0]
    decode_args = dict(k_scale=scales[0], v_scale=scales[1], seq_order=s["order"])

    def two_kernels(i):
        q, k, v = F.linear(x, weights[i]).split([HEADS * d, KV_HEADS * d, KV_HEADS * d], -1)
        q, _ = rotary_qk_store(s["positions"], q.view(batch, HEADS, d), k.view(batch, KV_HEADS, d),
                               v.view(batch, KV_HEADS, d), s["cos_sin"], *norms, 1e-6, *caches, s["slots"], False,
                               *scales, row_scale_of=x, row_eps=1e-6)
        return paged_decode(q, *caches, s["lens"], s["table"], d ** -0.5, **decode_args)

    def new_token(i):
        return decode_with_new_token(F.linear(x, weights[i]), HEADS, s["positions"], s["cos_sin"], *norms, 1e-6,
                                     *caches, s["slots"], s["lens"], s["table"], d ** -0.5, *scales, s["order"],
                                     row_scale_of=x, row_eps=1e-6)

    out = {"two kernels": two_kernels}
    if new_token_config(batch, KV_HEADS, d, PAGE, x.dtype, caches[0].dtype, x.device) is not None:
        out["new token"] = new_token
    config = qkv_mod.pick(batch, *weights[0].shape)
    if config is not None:
        def fused_product(i):
            q = qkv_mod.qkv_rotary_store(x, weights[i], HEADS, KV_HEADS, s["positions"], s["cos_sin"], *norms, 1e-6,
                                         1e-6, *caches, s["slots"], *scales, config)
            return paged_decode(q, *caches, s["lens"], s["table"], d ** -0.5, **decode_args)
        out["fused product"] = fused_product
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="32,64,128,256")
    p.add_argument("--contexts", default="1024,mixed")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args()
    kv_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    n = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    weights = [(torch.randn(n, HIDDEN, generator=g) / 32).to("cuda", torch.bfloat16) for _ in range(LAYERS)]
    norms = [(1 + 0.1 * torch.randn(HEAD_DIM, generator=g)).to("cuda", torch.bfloat16) for _ in range(2)]
    results = {}
    print(f"us a layer, kv {kv_dtype}; delta: new token - two kernels")
    for contexts in args.contexts.split(","):
        for batch in map(int, args.batches.split(",")):
            s = step(batch, contexts, kv_dtype, g)
            fns = variants(s, weights, norms)
            times = {name: [] for name in fns}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    times[name].append(graph_us(fn, LAYERS))
            row = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
            if "new token" in fns:
                caches = [c.clone() for c in s["caches"]]
                a = fns["two kernels"](0)
                s["caches"][0].copy_(caches[0]), s["caches"][1].copy_(caches[1])
                b = fns["new token"](0)
                row["max |diff|"] = float((a.float() - b.float()).abs().max())
            results[f"{contexts} x {batch}"] = row
            delta = f"  delta {row['new token'] - row['two kernels']:+.2f}" if "new token" in row else ""
            print(f"{contexts:>6} x {batch:>3}: " + "  ".join(f"{k} {v:.2f}" if "diff" not in k else f"{k} {v:.3g}"
                                                           for k, v in row.items()) + delta, flush=True)
            del s, fns
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"kv_dtype": str(kv_dtype), "us_a_layer": results}, f, indent=1)


if __name__ == "__main__":
    main()
