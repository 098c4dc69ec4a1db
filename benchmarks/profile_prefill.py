"""Where a full-size prefill step's time goes (GPU only): wall time per step and the top kernels by GPU time.

    python benchmarks/profile_prefill.py --config ../shared/models/qwen3-0.6b/config.json [--seqs 16 --len 1024]

The seed workload's prefill is steps of max_num_batched_tokens (16,384) tokens from ~1k-token prompts; this
runs such steps on fresh prompts (no prefix-cache hits), synchronised, then profiles one.
"""
import argparse
import os
import time

import torch

from nanovllm import LLM, SamplingParams


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--backend", default="cuda")
    p.add_argument("--host", action="store_true", help="also profile the host side of one step's launch (cProfile): "
                   "what enqueueing a prefill step costs the CPU")
    p.add_argument("--host-split", action="store_true", help="also time the host side of each launch part (no "
                   "profiler: perf_counter around the runner's and the layers' calls), summed over a step")
    args = p.parse_args()
    llm = LLM(os.path.dirname(os.path.abspath(args.config)), backend=args.backend, load_format="dummy",
              skip_tokenizer_init=True, max_model_len=4096)
    engine = llm.engine
    sync = torch.cuda.synchronize if args.backend == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    vocab = min(100_000, llm.config.hf_config.vocab_size)

    def prefill_step():
        [engine.add_request(torch.randint(0, vocab, (args.len,), generator=g).tolist(),
                            SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=1))
         for _ in range(args.seqs)]
        sync()
        start = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        sync()
        seconds = time.perf_counter() - start
        return seconds

    times = [prefill_step() for _ in range(args.steps)]
    print(f"prefill of {args.seqs} x {args.len} tokens: " + ", ".join(f"{t * 1000:.1f}" for t in times) + " ms")
    if args.host_split:
        host_split(engine, prefill_step)
    if args.host:
        import cProfile
        import pstats
        launch, spent = engine.runner.launch, []

        def timed(batch, prev=None):
            start = time.perf_counter()
            with cProfile.Profile() as host:
                step = launch(batch, prev)
            spent.append((time.perf_counter() - start, batch.num_tokens, host))
            return step
        engine.runner.launch = timed
        prefill_step()
        engine.runner.launch = launch
        seconds, tokens, host = max(spent, key=lambda x: x[1])
        print(f"host time of launching the {tokens}-token step: {seconds * 1000:.1f} ms (profiled)")
        pstats.Stats(host).sort_stats("tottime").print_stats(25)
        pstats.Stats(host).sort_stats("cumulative").print_stats(30)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        prefill_step()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=60))


def host_split(engine, prefill_step):
    """Host milliseconds of each part of one prefill step's launch (benchmarks/host_split.py), and the caching
    allocator's device calls in the step."""
    from benchmarks.host_split import HostSplit
    split = HostSplit(engine.runner)
    keys = ("num_alloc_retries", "num_device_alloc", "num_device_free")
    stats = torch.cuda.memory_stats if torch.cuda.is_available() else dict
    before = {k: stats().get(k, 0) for k in keys}
    seconds = prefill_step()
    after = stats()
    print(f"host split of one prefill step ({seconds * 1000:.1f} ms wall), ms summed over its calls:")
    split.print("prefill")
    print("caching allocator in the step:", {k: after.get(k, 0) - before[k] for k in keys})


if __name__ == "__main__":
    main()
