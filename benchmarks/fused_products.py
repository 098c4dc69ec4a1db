"""The folded decoder's fused products against the two kernels each replaces, at every decode graph size.

    python benchmarks/fused_products.py --out fused.json [--ms 1,2,4,8,16,32,...] [--kv-cache-dtype fp8]

q/k/v: cuBLAS's product then `rotary.qk_store` (row-scaled, K/V into the paged cache) against
`qkv_rotary_store` with each of QKV_CANDIDATES; gate/up: cuBLAS's product then the row-scaled `act.silu_mul`
against linear.py's GLU epilogue with each of GLU_CANDIDATES. Qwen3-0.6B's shapes (16 heads, 8 KV heads,
head_dim 128, hidden 1,024, intermediate 3,072), bfloat16. Each runs over 28 weight copies in one CUDA graph (the
model's layers: weights come from HBM, not L2); times are us a layer (gemm_sweep.graph_us). The
output JSON holds every time and, per product, the table the folded decoder would take (`table` entries:
[largest M, configuration or null]): a fused configuration where it beats the two kernels by > 0.1 us.
`--apply fused.json -- <nanovllm bench arguments>` runs the seed benchmark with those tables installed.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.gemm_sweep import graph_us  # noqa: E402
from nanovllm.backends.cuda.linear import Config as LinearConfig  # noqa: E402
from nanovllm.backends.cuda.qkv_rotary_store import Config as QkvConfig  # noqa: E402

QKV_CANDIDATES = [QkvConfig(16, 128, 4, 3, True), QkvConfig(32, 128, 4, 3, True), QkvConfig(64, 64, 4, 3, True),
                  QkvConfig(64, 128, 4, 3, True), QkvConfig(128, 64, 8, 3, True), QkvConfig(64, 64, 4, 3, False),
                  QkvConfig(128, 64, 8, 3, False),
                  # split K (round sixteen): each program walks 1/split of a head's weight, the last adds the partials
                  QkvConfig(16, 128, 4, 3, True, 2), QkvConfig(16, 128, 4, 3, True, 4),
                  QkvConfig(16, 128, 4, 2, True, 8), QkvConfig(32, 128, 4, 3, True, 4),
                  QkvConfig(64, 128, 4, 3, True, 2), QkvConfig(64, 64, 8, 3, True, 4),
                  QkvConfig(128, 64, 8, 3, True, 2)]
GLU_CANDIDATES = [LinearConfig(16, 64, 128, 1, 4, 4, True), LinearConfig(32, 64, 128, 1, 4, 4, True),
                  LinearConfig(64, 64, 128, 1, 4, 4, True), LinearConfig(64, 128, 64, 1, 8, 3, True),
                  LinearConfig(128, 64, 64, 1, 8, 3, True), LinearConfig(64, 64, 128, 1, 4, 4),
                  LinearConfig(64, 128, 64, 1, 8, 3), LinearConfig(128, 64, 64, 1, 8, 3)]
DEFAULT_MS = [1, 2, 4, 8] + list(range(16, 257, 16))
LAYERS, HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTER, PAGE = 28, 16, 8, 128, 1024, 3072, 16


def table_of(ms: list[int], rows: dict) -> list:
    """[largest M, configuration or None] entries, merged: the fastest fused configuration at each swept M where it
    beats the two kernels by > 0.1 us; M between two swept sizes takes the larger one's choice."""
    entries = []
    for m in ms:
        row = rows[str(m)]
        name, best = min(((k, v) for k, v in row.items() if k != "two kernels"), key=lambda kv: kv[1])
        choice = json.loads(name) if best < row["two kernels"] - 0.1 else None
        if entries and entries[-1][1] == choice:
            entries[-1][0] = m
        else:
            entries.append([m, choice])
    while entries and entries[-1][1] is None:
        entries.pop()
    return entries


def sweep(ms: list[int], kv_dtype: torch.dtype) -> dict:
    from nanovllm.backends.cuda.elementwise import silu_mul
    from nanovllm.backends.cuda.linear import matmul
    from nanovllm.backends.cuda.qkv_rotary_store import qkv_rotary_store
    from nanovllm.backends.cuda.rotary_store import rotary_qk_store
    dt, dev = torch.bfloat16, "cuda"
    n_qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    w_qkv = [torch.randn(n_qkv, HIDDEN, device=dev, dtype=dt) / 32 for _ in range(LAYERS)]
    w_gu = [torch.randn(2 * INTER, HIDDEN, device=dev, dtype=dt) / 32 for _ in range(LAYERS)]
    norms = [torch.ones(HEAD_DIM, device=dev, dtype=dt) for _ in range(2)]
    inv = 1.0 / (1e6 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    freqs = torch.arange(4096, dtype=torch.float32)[:, None] * inv[None, :]
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1).to(dev)
    blocks = 4096
    caches = [torch.zeros(blocks, PAGE, KV_HEADS, HEAD_DIM, device=dev, dtype=kv_dtype) for _ in range(2)]
    fp8 = kv_dtype != dt
    scales = tuple(torch.full((KV_HEADS,), 0.05, device=dev) for _ in range(2)) if fp8 else (None, None)
    out = {"qkv": {}, "gate_up": {}}
    for m in ms:
        x = torch.randn(m, HIDDEN, device=dev, dtype=dt)
        positions = torch.randint(0, 4000, (m,), device=dev)
        slots = torch.randperm(blocks * PAGE, device=dev)[:m]

        def two_qkv(i):
            q, k, v = (x @ w_qkv[i].t()).split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
            rotary_qk_store(positions, q.view(m, HEADS, HEAD_DIM), k.view(m, KV_HEADS, HEAD_DIM),
                            v.view(m, KV_HEADS, HEAD_DIM), cos_sin, *norms, 1e-6, *caches, slots, False, *scales,
                            row_scale_of=x, row_eps=1e-6)
        row = {"two kernels": graph_us(two_qkv, LAYERS)}
        for c in QKV_CANDIDATES:
            def fused(i, c=c):
                qkv_rotary_store(x, w_qkv[i], HEADS, KV_HEADS, positions, cos_sin, *norms, 1e-6, 1e-6, *caches,
                                 slots, *scales, c)
            row[json.dumps(list(c))] = graph_us(fused, LAYERS)
        out["qkv"][str(m)] = row

        def two_glu(i):
            silu_mul(x @ w_gu[i].t(), row_scale_of=x, eps=1e-6)
        row = {"two kernels": graph_us(two_glu, LAYERS)}
        for c in GLU_CANDIDATES:
            def fused_glu(i, c=c):
                matmul(x, w_gu[i], c, glu=True, row_scale_eps=1e-6)
            row[json.dumps(list(c))] = graph_us(fused_glu, LAYERS)
        out["gate_up"][str(m)] = row
        q_best = min(v for k, v in out["qkv"][str(m)].items() if k != "two kernels")
        g_best = min(v for k, v in out["gate_up"][str(m)].items() if k != "two kernels")
        print(f"M {m:>3}: qkv two kernels {out['qkv'][str(m)]['two kernels']:6.2f} us, fused best {q_best:6.2f}; "
              f"gate_up + SiLU two kernels {out['gate_up'][str(m)]['two kernels']:6.2f}, fused best {g_best:6.2f}",
              flush=True)
    out["tables"] = {name: table_of(ms, out[name]) for name in ("qkv", "gate_up")}
    return out


def apply(path: str) -> None:
    """Install the tables of a sweep's JSON (the Qwen3-0.6B shapes) in this process."""
    from nanovllm.backends.cuda import linear, qkv_rotary_store
    tables = json.load(open(path))["tables"]
    n_qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    qkv_rotary_store.TABLE[(n_qkv, HIDDEN)] = [(m, QkvConfig(*c) if c else None) for m, c in tables["qkv"]]
    linear.GLU_TABLE[(2 * INTER, HIDDEN)] = [(m, LinearConfig(*c) if c else None) for m, c in tables["gate_up"]]
    print("fused tables:", qkv_rotary_store.TABLE, linear.GLU_TABLE, flush=True)


def main() -> None:
    if "--apply" in sys.argv:
        i = sys.argv.index("--apply")
        apply(sys.argv[i + 1])
        from nanovllm.cli import main as cli
        sys.argv = ["nanovllm", *sys.argv[i + 3:]]  # after "--apply PATH --"
        sys.exit(cli())
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="fused_products.json")
    parser.add_argument("--ms", default=",".join(map(str, DEFAULT_MS)))
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    args = parser.parse_args()
    kv = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else torch.bfloat16
    print(torch.cuda.get_device_name(), flush=True)
    result = sweep([int(m) for m in args.ms.split(",")], kv)
    json.dump(result, open(args.out, "w"), indent=1)
    print(json.dumps(result["tables"]))


if __name__ == "__main__":
    main()
