"""Where the seed workload's wall time goes: steps grouped by kind and batch size (GPU only).

    python benchmarks/profile_steps.py --config ../shared/models/qwen3-0.6b/config.json [--kv-cache-dtype fp8]

Per bucket: wall time per step (from one launch's return to the next), and from CUDA events on the stream the
GPU time per step (from the end of the step's host preparation to the end of its sampler) and the GPU's idle
time before the step (from the previous step's end to this step's start: the host was late). A bucket whose
idle time is not ~0 is host-bound. The call's time is then split into the steps' GPU windows, the GPU's idle time
before the first step (checking and admitting the requests, preparing the first step), between steps, and after
the last. Then the largest idle gaps one by one, and the garbage collector's pauses
during the run (count and milliseconds per generation).
"""
import argparse
import gc
import os
import time
import traceback
import warnings
from collections import Counter, defaultdict

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.commands.arguments import add_backend_option_argument, backend_options
from nanovllm.commands.bench import seed_workload


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--sync", action="store_true")
    p.add_argument("--sync-check", action="store_true", help="report where the timed run makes host syncs "
                   "(torch.cuda.set_sync_debug_mode), counted by the innermost nanovllm frame")
    p.add_argument("--host-split", action="store_true", help="also sum the host time of each launch part per kind "
                   "of step (benchmarks/host_split.py)")
    p.add_argument("--first-times", action="store_true", help="name the steps that compiled a Triton variant or "
                   "torch.compile graph, or allocated device or pinned host memory (nanovllm.backends.cuda.compiled): "
                   "each stalls")
    p.add_argument("--trace-steps", default="", help="comma-separated step indices to run alone (synchronised) "
                   "under torch.profiler: each one's host calls and GPU kernels by time")
    p.add_argument("--phases", action="store_true", help="time the engine loop's phases of each turn (schedule, "
                   "launch, wait for the step in flight, commit, publish, the loop's own work) and print them around "
                   "each idle gap over 1 ms and after the last launch")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--no-logit-padding", action="store_true", help="prefill steps run the LM head at their own "
                   "sampled row count, not padded to a captured size (model_runner.padded_rows): for A/B runs")
    add_backend_option_argument(p)
    args = p.parse_args()
    llm = LLM(os.path.dirname(os.path.abspath(args.config)), backend="cuda", load_format="dummy",
              skip_tokenizer_init=True, async_scheduling=not args.sync, kv_cache_dtype=args.kv_cache_dtype,
              **backend_options(args))
    if args.no_logit_padding:
        llm.engine.runner.logit_row_sizes = []
    prompts, max_tokens = seed_workload()
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in max_tokens]
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)
    engine = llm.engine
    records, last, prepared = [], [time.perf_counter()], []
    phases = []  # --phases: (steps launched when it began, phase, start s, end s)
    launch, prepare = engine._launch, engine.runner.prepare

    def event():
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def timed_prepare(batch, *pending):
        inputs = prepare(batch, *pending)
        prepared.append(event())  # the step's device work starts here (its input copies were just enqueued)
        return inputs

    firsts = []  # (step index, kind, batch or tokens, what changed)

    def state():
        from torch._dynamo.utils import counters
        from nanovllm.backends.cuda.compiled import compiled_variants
        host = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
        return dict(compiled_variants(), dynamo_graphs=counters["stats"]["unique_graphs"],
                    device_allocs=torch.cuda.memory_stats().get("num_device_alloc", 0),
                    pinned_allocs=host.get("num_host_alloc", 0),
                    pinned_alloc_us=int(host.get("host_alloc_time.total", 0)))

    traced = {int(i) for i in args.trace_steps.split(",") if i}
    traces = []  # (step index, kind, batch or tokens, profiler)

    def timed_launch(batch, prev=None):
        step_id = (len(records), "prefill" if batch.is_prefill else "decode",  # index, kind, tokens or batch
                   batch.num_tokens if batch.is_prefill else len(batch.seqs))
        before = state() if args.first_times else None
        profiler = None
        if step_id[0] in traced:
            torch.cuda.synchronize()
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                          torch.profiler.ProfilerActivity.CUDA])
            profiler.start()
        begin = time.perf_counter()
        step = launch(batch, prev)
        end = event()
        if profiler is not None:
            torch.cuda.synchronize()
            profiler.stop()
            traces.append((*step_id, profiler))
        if before is not None:
            changed = {k: v - before.get(k, 0) for k, v in state().items() if v != before.get(k, 0)}
            if changed:
                firsts.append((*step_id, changed))
        now = time.perf_counter()
        if args.phases:
            phases.append((step_id[0], "launch", begin, now))
        records.append((*step_id[1:], now - last[0], prepared.pop(), end, now - begin))
        last[0] = now
        return step
    engine._launch, engine.runner.prepare = timed_launch, timed_prepare
    if args.phases:
        def timed(name, fn):
            def wrapper(*a, **k):
                begin = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    phases.append((len(records), name, begin, time.perf_counter()))
            return wrapper
        engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
        engine.runner.wait = timed("wait", engine.runner.wait)
        engine.scheduler.commit = timed("commit", engine.scheduler.commit)
        engine.pipelined_step = timed("turn", engine.pipelined_step)
        llm._requests = timed("requests", llm._requests)  # the caller's checks
        llm.loop._add = timed("add", llm.loop._add)  # the loop thread's admission
        llm.loop._publish = timed("publish", llm.loop._publish)  # the loop thread's deltas to the caller
        engine.runner.prepare = timed("prepare", engine.runner.prepare)
    if os.environ.get("TWICE"):  # measure the process's second run: what its first pays once is then paid
        llm.generate(prompts, params, use_tqdm=False)
        llm.reset_prefix_cache()  # the same prompts would hit the prefix cache
        records.clear()
        phases.clear()
        firsts.clear()
        traces.clear()
    if args.host_split:
        from benchmarks.host_split import HostSplit
        split = HostSplit(engine.runner)
    pauses = defaultdict(list)  # generation -> pause seconds
    collections_at = defaultdict(list)  # steps launched before the collection -> [(generation, ms)]

    def on_gc(phase, info, t0=[0.0]):
        if phase == "start":
            t0[0] = time.perf_counter()
        else:
            pauses[info["generation"]].append(time.perf_counter() - t0[0])
            collections_at[len(records)].append((info["generation"], round(pauses[info["generation"]][-1] * 1e3, 2)))
    gc.callbacks.append(on_gc)
    syncs = Counter()
    if args.sync_check:
        shown = warnings.showwarning

        def on_warning(message, category, filename, lineno, file=None, line=None):
            frames = [f for f in traceback.extract_stack() if "/nanovllm/" in f.filename]
            where = f"{frames[-1].filename.split('/nanovllm/')[-1]}:{frames[-1].lineno} {frames[-1].name}" \
                if frames else f"{filename}:{lineno}"
            syncs[where] += 1
        warnings.showwarning = on_warning
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
    memory_keys = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")
    memory_before = {k: torch.cuda.memory_stats().get(k, 0) for k in memory_keys}
    before_call = event()  # the GPU is idle: this event completes at once, at the call's start
    last[0] = start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    total = time.perf_counter() - start
    after_call = event()
    memory_after = torch.cuda.memory_stats()
    # cudaMalloc/cudaFree inside a step (an allocator retry frees cached blocks) block the host until the GPU is idle
    print("caching allocator during the run:", {k: memory_after.get(k, 0) - memory_before[k] for k in memory_keys})
    gc.callbacks.remove(on_gc)
    if args.sync_check:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = shown
        print("host syncs in the timed run (innermost nanovllm frame: count):")
        for where, count in syncs.most_common(15):
            print(f"  {count:>6}  {where}")
    torch.cuda.synchronize()
    buckets = defaultdict(lambda: [0, 0.0, 0.0, 0.0, 0.0])
    for i, (kind, n, dt, begin, end, host) in enumerate(records):
        key = (kind, 0 if kind == "prefill" else min(256, 1 << (n - 1).bit_length()))
        bucket = buckets[key]
        bucket[0] += 1
        bucket[1] += dt
        bucket[2] += begin.elapsed_time(end) / 1000
        bucket[3] += records[i - 1][4].elapsed_time(begin) / 1000 if i else 0.0
        bucket[4] += host
    print(f"total {total:.2f} s, {len(records)} steps")
    print("prefill steps (tokens, ms):", [(r[1], round(r[2] * 1000, 1)) for r in records if r[0] == "prefill"])
    print("prefill steps (gpu ms, launch ms):", [(round(r[3].elapsed_time(r[4]), 1), round(r[5] * 1000, 1))
                                                  for r in records if r[0] == "prefill"])
    print(f"{'kind':>8} {'batch<=':>8} {'steps':>6} {'seconds':>8} {'ms/step':>8} {'gpu ms':>8} {'idle ms':>8} "
          f"{'launch ms':>9}")
    for (kind, b), (count, secs, gpu, idle, host) in sorted(buckets.items()):
        print(f"{kind:>8} {b:>8} {count:>6} {secs:>8.3f} {secs / count * 1000:>8.3f} {gpu / count * 1000:>8.3f} "
              f"{idle / count * 1000:>8.3f} {host / count * 1000:>9.3f}")
    idle = sorted(((records[i - 1][4].elapsed_time(r[3]), i) for i, r in enumerate(records) if i), reverse=True)
    print("largest idle gaps (ms, step index, kind, batch or tokens):",
          [(round(ms, 2), i, records[i][0], records[i][1]) for ms, i in idle[:12]])
    print(f"idle in total {sum(ms for ms, _ in idle):.1f} ms; gaps over 1 ms: {sum(ms > 1 for ms, _ in idle)}")
    print("garbage collections (generation, ms) between the two launches before each gap over 1 ms:",
          {i: collections_at.get(i - 1, []) + collections_at.get(i, []) for ms, i in idle if ms > 1})
    gpu_s = sum(r[3].elapsed_time(r[4]) for r in records) / 1000
    print(f"the call's {total:.3f} s: GPU {gpu_s:.3f} s (steps' windows), idle before the first step "
          f"{before_call.elapsed_time(records[0][3]):.1f} ms (the requests' checks and admission, the first "
          f"prepare), between steps {sum(ms for ms, _ in idle):.1f} ms, after the last "
          f"{records[-1][4].elapsed_time(after_call):.1f} ms")
    if args.phases:
        print("phases before the first step's GPU work (phase, ms from the call's start, ms):",
              [(name, round((begin - start) * 1e3, 3), round((end - begin) * 1e3, 3))
               for n, name, begin, end in phases if n == 0 and name != "turn"])
        ended = before_call.elapsed_time(records[-1][4])  # GPU clock, 0 at the call's start (the GPU was idle)
        print(f"after the last launch: its GPU work ended {ended:.3f} ms from the call's start (GPU clock), the call "
              f"returned at {total * 1e3:.3f} ms (host); phases (steps launched, phase, ms from the call's start, ms):")
        for n, name, begin, end in phases:
            if n >= len(records) - 1:
                print(f"   {n:>5} {name:>8} {(begin - start) * 1e3:>10.3f} {(end - begin) * 1e3:>8.3f}")
        for ms, i in idle:
            if ms > 1:
                print(f"phases around the {ms:.2f} ms gap before step {i} (steps launched, phase, ms from the "
                      f"call's start, ms):")
                for n, name, begin, end in phases:
                    if i - 3 <= n <= i + 1:
                        print(f"   {n:>5} {name:>8} {(begin - start) * 1e3:>10.3f} {(end - begin) * 1e3:>8.3f}")
    if args.host_split:
        split.print("prefill")
        split.print("decode")
    if args.first_times:
        print(f"steps that compiled or allocated ({len(firsts)}; step index, kind, batch or tokens, +what):")
        for first in firsts:
            print("  ", *first)
    for index, kind, n, profiler in traces:
        events = profiler.key_averages()
        print(f"step {index} ({kind}, {n}), alone under the profiler: host calls by self time, then GPU kernels")
        print(events.table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60))
        print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
    print("garbage collector during the run:", {g: f"{len(p)} pauses, {sum(p) * 1000:.1f} ms (max {max(p) * 1000:.1f})"
                                              for g, p in sorted(pauses.items())})


if __name__ == "__main__":
    main()
