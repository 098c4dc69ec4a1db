"""Kernel benchmark for the cuda backend (GPU only): decode attention, prefill attention, KV store.

Decode is reported as achieved K/V read bandwidth against a device-to-device copy measured in the same
run (read + write bytes), prefill as TFLOP/s of its two matrix products, the KV store as GB/s moved.
Times are medians of triton.testing.do_bench. `--check` instead compares each kernel with cpu_ref
(run on the GPU) at a few shapes; `--sweep` tries decode tile configurations at batch 256 x 1k.

    python benchmarks/kernels_cuda.py --out kernels.json
    python benchmarks/kernels_cuda.py --check
    python benchmarks/kernels_cuda.py --sweep
"""
import argparse
import json
import platform
import sys
from itertools import product

import torch

from nanovllm.core.step_metadata import DecodeMetadata, PrefillMetadata

HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, DTYPE = 128, 16, 8, torch.bfloat16
DEVICE = "cuda"
DECODE_SHAPES = [(256, 1024), (256, 512), (256, 2048), (64, 1024), (64, 2048), (256, "mixed")]


def bench(fn) -> float:
    """Median seconds of fn() (do_bench reports milliseconds and flushes L2 between runs)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3


def copy_bandwidth(num_bytes: int = 2 << 30) -> float:
    """Bytes/s of a large device-to-device copy, counting both the read and the write."""
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    return 2 * num_bytes / bench(lambda: dst.copy_(src))


def paged_cache(context_lens: list[int], block_size: int, g: torch.Generator):
    """Random K/V caches and a shuffled block table covering `context_lens`."""
    blocks_per_seq = [(n + block_size - 1) // block_size for n in context_lens]
    num_blocks = sum(blocks_per_seq)
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(context_lens), max(blocks_per_seq), dtype=torch.int32)
    start = 0
    for i, n in enumerate(blocks_per_seq):
        table[i, :n] = perm[start:start + n].int()
        start += n
    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=DTYPE, device=DEVICE)
    v_cache = torch.randn(shape, dtype=DTYPE, device=DEVICE)
    return k_cache, v_cache, table.to(DEVICE)


def decode_inputs(batch: int, context, block_size: int, g: torch.Generator):
    if context == "mixed":  # the throughput workload's spread of lengths
        context_lens = torch.randint(100, 2049, (batch,), generator=g).tolist()
    else:
        context_lens = [context] * batch
    k_cache, v_cache, table = paged_cache(context_lens, block_size, g)
    meta = DecodeMetadata(torch.tensor(context_lens, dtype=torch.int32, device=DEVICE), table, max(context_lens))
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    kv_bytes = 2 * sum(context_lens) * NUM_KV_HEADS * HEAD_DIM * k_cache.element_size()
    return q, k_cache, v_cache, meta, kv_bytes


def decode_kernels(block_size: int) -> dict:
    from nanovllm.backends.cuda.attention import triton_decode
    kernels = {"triton_paged": triton_decode.decode_attention}
    if block_size % 256 == 0 and _has_flash_attn():
        from nanovllm.backends.cuda.attention import flash_attn
        kernels["flash_attn"] = flash_attn.decode_attention
    return kernels


def run_decode(copy_bw: float, g: torch.Generator) -> list[dict]:
    rows = []
    for (batch, context), block_size in product(DECODE_SHAPES, (16, 256)):
        q, k_cache, v_cache, meta, kv_bytes = decode_inputs(batch, context, block_size, g)
        for name, fn in decode_kernels(block_size).items():
            seconds = bench(lambda: fn(q, k_cache, v_cache, meta, HEAD_DIM ** -0.5))
            rows.append(dict(kernel=name, batch=batch, context=context, block_size=block_size, us=seconds * 1e6,
                             kv_GBps=kv_bytes / seconds / 1e9, of_copy_bw=kv_bytes / seconds / copy_bw))
        del k_cache, v_cache
    return rows


def prefill_inputs(num_seqs: int, seq_len: int, paged: bool, block_size: int):
    g = torch.Generator().manual_seed(0)
    num_tokens = num_seqs * seq_len
    q = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    k = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    v = torch.randn_like(k)
    cu = torch.arange(0, num_tokens + 1, seq_len, dtype=torch.int32, device=DEVICE)
    k_cache, v_cache, table = paged_cache([seq_len] * num_seqs, block_size, g)
    meta = PrefillMetadata(cu, cu, seq_len, seq_len, table if paged else None)
    return q, k, v, k_cache, v_cache, meta


def prefix_prefill_inputs(paged: bool, block_size: int, g: torch.Generator):
    """Query chunks of 300, 700 and 1 tokens after cached prefixes of 500, 0 and 2000 (none unless paged);
    each chunk's K/V are the cache rows it was stored in."""
    q_lens, cached = [300, 700, 1], ([500, 0, 2000] if paged else [0, 0, 0])
    context_lens = [a + b for a, b in zip(q_lens, cached)]
    k_cache, v_cache, table = paged_cache(context_lens, block_size, g)
    rows = [int(table[i, t // block_size]) * block_size + t % block_size
            for i, (c, n) in enumerate(zip(cached, context_lens)) for t in range(c, n)]
    rows = torch.tensor(rows, device=DEVICE)
    k, v = k_cache.flatten(0, 1)[rows], v_cache.flatten(0, 1)[rows]
    q = torch.randn(sum(q_lens), NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)

    def cumulative(lengths):
        return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)

    meta = PrefillMetadata(cumulative(q_lens), cumulative(context_lens), max(q_lens), max(context_lens),
                           table if paged else None)
    return q, k, v, k_cache, v_cache, meta


def run_prefill(num_seqs: int = 16, seq_len: int = 1024) -> list[dict]:
    from nanovllm.backends.cuda.attention import torch_flash, triton_prefill
    # causal: each of the two matrix products covers seq_len * (seq_len + 1) / 2 query-key pairs
    flops = 2 * 2 * num_seqs * NUM_HEADS * HEAD_DIM * seq_len * (seq_len + 1) / 2
    cases = [("torch_flash", torch_flash.prefill_attention, False, 16),
             ("triton_paged", triton_prefill.prefill_attention, False, 16),
             ("triton_paged", triton_prefill.prefill_attention, True, 16),
             ("triton_paged", triton_prefill.prefill_attention, True, 256)]
    if _has_flash_attn():
        from nanovllm.backends.cuda.attention import flash_attn
        cases.insert(0, ("flash_attn", flash_attn.prefill_attention, False, 256))
    rows = []
    for name, fn, paged, block_size in cases:
        q, k, v, k_cache, v_cache, meta = prefill_inputs(num_seqs, seq_len, paged, block_size)
        seconds = bench(lambda: fn(q, k, v, k_cache, v_cache, meta, HEAD_DIM ** -0.5))
        rows.append(dict(kernel=name, tokens=f"{num_seqs}x{seq_len}", paged=paged,
                         block_size=block_size if paged else None, us=seconds * 1e6, TFLOPs=flops / seconds / 1e12,
                         tokens_per_s=num_seqs * seq_len / seconds))
    return rows


def run_kv_store(copy_bw: float) -> list[dict]:
    from nanovllm.backends.cuda.kv_store import store_kvcache
    rows = []
    for num_tokens in (256, 16384):
        num_heads_total = NUM_HEADS + 2 * NUM_KV_HEADS
        qkv = torch.randn(num_tokens, num_heads_total, HEAD_DIM, dtype=DTYPE, device=DEVICE)
        key, value = qkv[:, NUM_HEADS:NUM_HEADS + NUM_KV_HEADS], qkv[:, NUM_HEADS + NUM_KV_HEADS:]
        num_blocks = num_tokens // 16 * 4
        k_cache = torch.empty(num_blocks, 16, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
        v_cache = torch.empty_like(k_cache)
        slots = torch.randperm(num_blocks * 16, device=DEVICE)[:num_tokens]
        seconds = bench(lambda: store_kvcache(key, value, k_cache, v_cache, slots))
        moved = 2 * 2 * num_tokens * NUM_KV_HEADS * HEAD_DIM * k_cache.element_size()  # K and V, read + write
        rows.append(dict(kernel="triton", tokens=num_tokens, us=seconds * 1e6, GBps=moved / seconds / 1e9,
                         of_copy_bw=moved / seconds / copy_bw))
    return rows


def sweep_decode(copy_bw: float) -> list[dict]:
    """Decode tile configurations at batch 256 x 1k (and 64 x 1k): to tune decode_config on a new GPU."""
    from nanovllm.backends.cuda.attention.triton_decode import DecodeConfig, choose_num_splits, paged_decode
    g = torch.Generator().manual_seed(0)
    rows = []
    for (batch, context), block_size in product([(256, 1024), (64, 1024), (256, "mixed")], (16, 256)):
        q, k_cache, v_cache, meta, kv_bytes = decode_inputs(batch, context, block_size, g)
        default_splits = choose_num_splits(batch, NUM_KV_HEADS, q.device)
        for block_n, warps, stages, splits in product((32, 64, 128), (4, 8), (2, 3, 4),
                                                      sorted({default_splits, 1, 2, 4})):
            config = DecodeConfig(block_n, warps, stages)
            try:
                seconds = bench(lambda: paged_decode(q, k_cache, v_cache, meta.context_lens, meta.block_tables,
                                                     HEAD_DIM ** -0.5, num_splits=splits, config=config))
            except Exception as e:  # a config the GPU cannot run (e.g. out of shared memory)
                print(f"  skipped {config} splits={splits}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            rows.append(dict(batch=batch, context=context, block_size=block_size, block_n=block_n, num_warps=warps,
                             num_stages=stages, num_splits=splits, us=seconds * 1e6,
                             of_copy_bw=kv_bytes / seconds / copy_bw))
        del k_cache, v_cache
    return rows


def check() -> bool:
    """Each GPU kernel against cpu_ref (on the GPU) at a few shapes, bf16."""
    from nanovllm.backends.cpu_ref import attention as ref_attention
    from nanovllm.backends.cpu_ref.kv_store import store_kvcache as ref_store
    from nanovllm.backends.cuda.attention import torch_flash, triton_decode, triton_prefill
    from nanovllm.backends.cuda.kv_store import store_kvcache
    g = torch.Generator().manual_seed(1)
    ok = True

    def report(name, actual, expected, tol=2e-2):
        nonlocal ok
        err = (actual.float() - expected.float()).abs().max().item()
        passed = err <= tol and not actual.isnan().any()
        ok &= passed
        print(f"  {'ok  ' if passed else 'FAIL'} {name:<50} max abs err {err:.2e}")

    for batch, context, block_size in [(7, 1000, 16), (33, "mixed", 256), (1, 4096, 32)]:
        q, k_cache, v_cache, meta, _ = decode_inputs(batch, context, block_size, g)
        report(f"decode triton_paged b{batch} ctx{context} bs{block_size}",
               triton_decode.decode_attention(q, k_cache, v_cache, meta, 0.088),
               ref_attention.decode_attention(q, k_cache, v_cache, meta, 0.088))
    for paged, block_size in [(False, 16), (True, 16), (True, 256)]:
        q, k, v, k_cache, v_cache, meta = prefix_prefill_inputs(paged, block_size, g)
        expected = ref_attention.prefill_attention(q, k, v, k_cache, v_cache, meta, 0.088)
        for name, module in [("triton_paged", triton_prefill), ("torch_flash", torch_flash)]:
            report(f"prefill {name} paged={paged} bs{block_size}",
                   module.prefill_attention(q, k, v, k_cache, v_cache, meta, 0.088), expected)
    key = torch.randn(300, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    value = torch.randn_like(key)
    slots = torch.randperm(64 * 16, device=DEVICE)[:300]
    slots[::7] = -1
    caches = [torch.randn(64, 16, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    store_kvcache(key, value, *caches, slots)
    ref_store(key, value, *ref_caches, slots)
    report("kv_cache.store triton", torch.stack(caches), torch.stack(ref_caches), tol=0.0)
    return ok


def _has_flash_attn() -> bool:
    import importlib.util
    return importlib.util.find_spec("flash_attn") is not None


def environment() -> dict:
    import triton
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version(), command=" ".join(sys.argv))


def print_table(title: str, rows: list[dict]):
    if not rows:
        return
    print(f"\n{title}")
    keys = list(rows[0])
    print("  " + "  ".join(f"{k:>12}" for k in keys))
    for row in rows:
        print("  " + "  ".join(f"{v:>12.3f}" if isinstance(v, float) else f"{str(v):>12}" for v in row.values()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON to this path")
    parser.add_argument("--check", action="store_true", help="compare each kernel with cpu_ref and exit")
    parser.add_argument("--sweep", action="store_true", help="try decode tile configurations instead")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernels_cuda.py needs a CUDA GPU")
    env = environment()
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    if args.check:
        sys.exit(0 if check() else 1)
    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")
    results = dict(env, copy_GBps=copy_bw / 1e9)
    if args.sweep:
        results["decode_sweep"] = rows = sweep_decode(copy_bw)
        print_table("decode sweep (best first)", sorted(rows, key=lambda r: r["us"]))
    else:
        g = torch.Generator().manual_seed(0)
        results["decode"] = run_decode(copy_bw, g)
        print_table(f"decode attention: {NUM_HEADS}/{NUM_KV_HEADS} heads, head_dim {HEAD_DIM}, {DTYPE}",
                    results["decode"])
        results["prefill"] = run_prefill()
        print_table("prefill attention (causal)", results["prefill"])
        results["kv_store"] = run_kv_store(copy_bw)
        print_table("kv_cache.store", results["kv_store"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
