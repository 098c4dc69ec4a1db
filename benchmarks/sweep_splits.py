"""Decode schedules by batch size and context (GPU only): the split kernel (its default split count, other tile
configs) beside the load-balanced schedule (programs per SM, tile configs), bf16 and FP8 caches, as the fraction of
copy bandwidth at which K/V are read.

    python benchmarks/sweep_splits.py [--batches 1,2,4,8,16,32,48,64,96,128,256 --contexts 1200,mixed,padded]
                                      [--kv-dtypes bfloat16,float8_e4m3fn --json FILE]
                                      [--configs '128,8,3 64,4,4' --split-factors 1,2 --no-balanced]

Each variant is timed as the engine runs it: captured in one CUDA graph, calls back to back over two input sets
(each larger than L2), sequences in longest-first order (`graph` columns). The default split kernel is also timed
with `triton.testing.do_bench` (`--flush`), which zeroes a 256 MB buffer before every call, so the kernel first
writes back the dirty L2 lines: a fixed ~10 us that the engine does not pay.
"""
import argparse
import json
import statistics

import torch

from benchmarks.fp8_decode import inputs
from benchmarks.kernels_cuda import HEAD_DIM, NUM_KV_HEADS, bench, copy_bandwidth
from nanovllm.backends.cuda.attention.triton_decode import MAX_SPLITS, DecodeConfig, choose_num_splits, paged_decode
from nanovllm.core.step_metadata import longest_first

SPLIT_CONFIGS = [DecodeConfig(128, 8, 3), DecodeConfig(64, 4, 4)]
BALANCED = [(2, None), (3, None), (4, None), (2, DecodeConfig(128, 8, 3)), (3, DecodeConfig(32, 4, 4))]


def graph_seconds(calls, repeats: int = 10) -> float:
    """Seconds per call of `calls` captured in one CUDA graph, run in turn `repeats` times (median of 5 replays)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            for call in calls:
                call()
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    del graph
    return statistics.median(times) / (repeats * len(calls))


def decode_call(case, **kwargs):
    q, (k_cache, v_cache), (k_scale, v_scale), meta, _ = case
    order = torch.from_numpy(longest_first(meta.context_lens.tolist())).to(q.device)
    out = torch.empty_like(q)
    return lambda: paged_decode(q, k_cache, v_cache, meta.context_lens, meta.block_tables, HEAD_DIM ** -0.5,
                                out=out, k_scale=k_scale, v_scale=v_scale, seq_order=order, **kwargs)


def variants(batch: int, num_sms: int, configs=tuple(SPLIT_CONFIGS), split_factors=(1,),
             balanced: bool = True) -> list[tuple[str, dict]]:
    """(name, paged_decode arguments): `plan` is the kernel's own choice, `split` main's (choose_num_splits with
    decode_config), `split B,W,S` the split kernel with another tile config, `xF` after it F times main's split
    count, `bal xK` the balanced schedule with K programs a SM (and a tile config)."""
    splits = choose_num_splits(batch, NUM_KV_HEADS, torch.device("cuda"))
    out = [("plan", {}), ("split", dict(num_splits=splits))]
    for factor in split_factors:
        n = min(MAX_SPLITS, splits * factor)
        suffix = f" x{factor}" if factor != 1 else ""
        if factor != 1:
            out.append((f"split{suffix}", dict(num_splits=n)))
        out += [(f"split {c.block_n},{c.num_warps},{c.num_stages}{suffix}", dict(num_splits=n, config=c))
                for c in configs]
    for per_sm, c in BALANCED if balanced else ():
        name = f"bal x{per_sm}" + (f" {c.block_n},{c.num_warps},{c.num_stages}" if c else "")
        out.append((name, dict(num_programs=-(-per_sm * num_sms // NUM_KV_HEADS), config=c)))
    return out


def sweep_cases(args):
    """(kv dtype name, context, batch, two input sets, their mean K/V bytes) over the --kv-dtypes, --contexts and
    --batches of `args` (a context is a token count, 'mixed' or 'padded': see fp8_decode.inputs)."""
    for kv_name in args.kv_dtypes.split(","):
        kv_dtype = getattr(torch, kv_name)
        for context in args.contexts.split(","):
            context = context if context in ("mixed", "padded") else int(context)
            for batch in map(int, args.batches.split(",")):
                cases = [inputs(batch, context, kv_dtype, seed=seed) for seed in (0, 1)]
                yield kv_name, context, batch, cases, sum(case[-1] for case in cases) / len(cases)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="1,2,4,8,16,32,48,64,96,128,256")
    p.add_argument("--contexts", default="1200,mixed,padded",
                   help="tokens per sequence, 'mixed' (100-2048) or 'padded' (mixed, the last third of rows 0)")
    p.add_argument("--kv-dtypes", default="bfloat16,float8_e4m3fn")
    p.add_argument("--flush", action="store_true", help="also time main's default with do_bench (L2 flushed)")
    p.add_argument("--configs", help="split-kernel tile configs to time, 'B,W,S B,W,S' (default: "
                   + " ".join(f"{c.block_n},{c.num_warps},{c.num_stages}" for c in SPLIT_CONFIGS) + ")")
    p.add_argument("--split-factors", default="1", help="also time each config with F times main's split count")
    p.add_argument("--no-balanced", action="store_true", help="leave out the balanced schedule")
    p.add_argument("--json")
    args = p.parse_args()
    configs = ([DecodeConfig(*map(int, c.split(","))) for c in args.configs.split()] if args.configs
               else SPLIT_CONFIGS)
    split_factors = [int(f) for f in args.split_factors.split(",")]
    bw = copy_bandwidth()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}, {num_sms} SMs, copy bandwidth {bw / 1e9:.0f} GB/s; "
          "fraction of it at which K/V are read")
    rows = []
    for kv_name, context, batch, cases, kv_bytes in sweep_cases(args):
        row = dict(kv_dtype=kv_name, context=context, batch=batch,
                   default_splits=choose_num_splits(batch, NUM_KV_HEADS, torch.device("cuda")))
        if args.flush:
            row["split flush"] = round(kv_bytes / bench(decode_call(cases[0])) / bw, 3)
        for name, kwargs in variants(batch, num_sms, configs, split_factors, not args.no_balanced):
            try:
                seconds = graph_seconds([decode_call(case, **kwargs) for case in cases])
                row[name] = round(kv_bytes / seconds / bw, 3)
            except Exception as e:  # a config that does not compile: say so, keep sweeping
                row[name] = f"error {type(e).__name__}"
        rows.append(row)
        best = max((k for k in row if isinstance(row[k], float) and k != "split flush"), key=row.get)
        print(f"{kv_name} ctx {context} batch {batch}: split {row['split']} "
              f"plan {row['plan']} best {best} {row[best]}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_GBps=bw / 1e9, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
