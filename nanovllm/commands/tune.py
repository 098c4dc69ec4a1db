"""`nanovllm tune`: time every usable kernel of each op at the shapes a model will run, keep the fastest.

Shapes: decode batches of 1, 2, 4, ... up to max_num_seqs sequences of `--context-len` tokens; prefill chunks
of `--prefill-tokens`; the model's head dim, heads and KV heads; the run's dtype and KV block size. The
winners go to the user's plugins.toml (NANOVLLM_PLUGINS_TOML or ~/.config/nanovllm/plugins.toml) as a
`[kernels.<backend>]` block, which later engines use and their plan credits to tune.
"""
import argparse
import datetime
import time
from typing import Callable

import torch

from nanovllm.core.registry import KernelImpl, KernelQuery
from nanovllm.core.sampler import SamplingTensors
from nanovllm.core.step_metadata import DecodeMetadata, PrefillMetadata


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", help="the backend to tune (default: first available)")
    p.add_argument("--model", help="a Hugging Face checkpoint folder: its config.json gives the shapes (default: none; "
                                   "give --model or --config)")
    p.add_argument("--config", help="a config.json (or its folder) instead of a checkpoint (default: none)")
    p.add_argument("--dtype", help="float32, float16 or bfloat16 (default: the backend's)")
    p.add_argument("--kvcache-block-size", type=int, help="tokens per KV block (default: the backend's)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="largest decode batch timed")
    p.add_argument("--context-len", type=int, default=512, help="context of each decoding sequence")
    p.add_argument("--prefill-tokens", default="128,1024", help="prefill chunk sizes, comma-separated")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per kernel and shape (median kept)")
    p.add_argument("--force", action="store_true", help="replace choices you wrote in plugins.toml")
    p.add_argument("--dry-run", action="store_true", help="print the table, write nothing")


class Shape:
    """One op's arguments at one shape, built once on the device."""

    def __init__(self, label: str, args: tuple):
        self.label, self.args = label, args


def decode_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1 << i for i in range(max_num_seqs.bit_length()) if 1 << i < max_num_seqs]
    return sizes + [max_num_seqs]


def build_shapes(query: KernelQuery, device: torch.device, vocab_size: int, batch_sizes: list[int],
                 context_len: int, prefill_tokens: list[int]) -> dict[str, list[Shape]]:
    bs, kvh, hd, dt = query.block_size, query.num_kv_heads, query.head_dim, query.dtype
    blocks_per_seq = -(-context_len // bs)
    num_blocks = max(batch_sizes) * blocks_per_seq
    k_cache = torch.randn(num_blocks, bs, kvh, hd, device=device).to(dt)
    v_cache = torch.randn_like(k_cache)
    scale = hd ** -0.5
    shapes: dict[str, list[Shape]] = {op: [] for op in ("kv_cache.store", "attention.prefill", "attention.decode",
                                                        "sampler")}
    for b in batch_sizes:
        q = torch.randn(b, query.num_heads, hd, device=device).to(dt)
        tables = torch.arange(b * blocks_per_seq, dtype=torch.int32, device=device).view(b, blocks_per_seq)
        lens = torch.full((b,), context_len, dtype=torch.int32, device=device)
        shapes["attention.decode"].append(Shape(f"decode {b} x {context_len}", (
            q, k_cache, v_cache, DecodeMetadata(lens, tables, context_len), scale)))
        kv = torch.randn(b, kvh, hd, device=device).to(dt)
        slots = torch.arange(b, device=device) * bs  # one token into each sequence's first block
        shapes["kv_cache.store"].append(Shape(f"store {b} tokens", (kv, kv.clone(), k_cache, v_cache, slots)))
        logits = torch.randn(b, vocab_size, device=device).to(dt)
        shapes["sampler"].append(Shape(f"greedy {b} x {vocab_size}", (
            logits, SamplingTensors(torch.zeros(b, device=device), all_greedy=True))))
    for n in prefill_tokens:
        q = torch.randn(n, query.num_heads, hd, device=device).to(dt)
        k, v = torch.randn(n, kvh, hd, device=device).to(dt), torch.randn(n, kvh, hd, device=device).to(dt)
        cu = torch.tensor([0, n], dtype=torch.int32, device=device)
        shapes["attention.prefill"].append(Shape(f"prefill {n} tokens", (
            q, k, v, k_cache, v_cache, PrefillMetadata(cu, cu, n, n), scale)))
        slots = torch.arange(n, device=device) % (num_blocks * bs)
        shapes["kv_cache.store"].append(Shape(f"store {n} tokens", (k, v, k_cache, v_cache, slots)))
    return shapes


def median_seconds(fn: Callable, args: tuple, repeats: int, sync: Callable[[], None]) -> float:
    fn(*args)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def usable_impls(registry, op: str, backend: str, query: KernelQuery) -> list[KernelImpl]:
    pool = registry.candidates(op, backend)
    reference = registry.reference(op)
    if reference is not None and reference not in pool:
        pool.append(reference)
    return [i for i in pool if not i.reasons(query)]


def preference_name(impl: KernelImpl, backend: str) -> str:
    return impl.name if impl.backend == backend else impl.full_name


def time_op(impls: list[KernelImpl], shapes: list[Shape], repeats: int, sync) -> dict[str, list[float]]:
    """{kernel full name: [seconds per shape]}"""
    return {i.full_name: [median_seconds(i.fn, s.args, repeats, sync) for s in shapes] for i in impls}


def format_table(op: str, shapes: list[Shape], timings: dict[str, list[float]], winner: str) -> str:
    names = list(timings)
    rows = [["shape", *names]] + [[s.label, *(f"{timings[n][j] * 1e3:.3f} ms" for n in names)]
                                   for j, s in enumerate(shapes)]
    rows.append(["total", *(f"{sum(timings[n]) * 1e3:.3f} ms" for n in names)])
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [op] + ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    return "\n".join(lines + [f"  -> {winner}"])


def main(args) -> int:
    from transformers import AutoConfig

    from nanovllm.checkpoint.folder import config_folder
    from nanovllm.core.config import EngineConfig
    from nanovllm.core.plugins import load_plugins, load_settings, user_toml_path
    from nanovllm.core.startup import resolve
    from nanovllm.commands.tune_preferences import write_tuned_preferences

    folder = config_folder(args.model, args.config)
    options = {"dtype": args.dtype} if args.dtype else {}
    if args.kvcache_block_size:
        options["kvcache_block_size"] = args.kvcache_block_size
    config = EngineConfig(model=folder, backend=args.backend, hf_config=AutoConfig.from_pretrained(folder),
                          max_num_seqs=args.max_num_seqs, max_num_batched_tokens=max(args.max_num_seqs, 16384),
                          **options)
    plugins = load_plugins(load_settings(user_file_may_be_missing=True))  # tune writes the user's file
    resolved = resolve(config, plugins)
    backend, plan = resolved.backend, resolved.plan
    device = backend.device(config)
    prefill_tokens = [int(n) for n in args.prefill_tokens.split(",") if n.strip()]
    shapes = build_shapes(plan.query, device, config.hf_config.vocab_size, decode_batch_sizes(args.max_num_seqs),
                          args.context_len, prefill_tokens)
    winners = {}
    q = plan.query
    print(f"tuning backend {backend.name} on {backend.device_name(device)}: {str(q.dtype).removeprefix('torch.')}, head_dim "
          f"{q.head_dim}, {q.num_heads}/{q.num_kv_heads} heads, block size {q.block_size}; median of {args.repeats}")
    for op, op_shapes in shapes.items():
        impls = usable_impls(plugins.registry, op, backend.name, plan.query)
        timings = time_op(impls, op_shapes, args.repeats, lambda: backend.synchronize(device))
        ranked = sorted(impls, key=lambda i: sum(timings[i.full_name]))
        winners[op] = [preference_name(i, backend.name) for i in ranked]
        print(format_table(op, op_shapes, timings, ranked[0].full_name))
    if args.dry_run:
        return 0
    path = user_toml_path()
    block = write_tuned_preferences(path, backend.name, winners, datetime.date.today().isoformat(),
                                    backend.device_name(device), args.force)
    print(f"wrote to {path}:\n{block}", end="")
    return 0
