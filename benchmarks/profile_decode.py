"""Where one decode step's time goes (GPU only): host phases, graph replay, sampler, and top kernels.

Plain steps (temperature only) sample inside the decode graph: "forward" then includes the sampler and "sample"
is ~0; the profile's last line sums the sampler's kernels per step.

    python benchmarks/profile_decode.py --config ../shared/models/qwen3-0.6b/config.json --batch 256 --context 1024
"""
import argparse
import os
import time

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.commands.arguments import add_backend_option_argument, backend_options


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--kv-cache-dtype", default="auto")
    add_backend_option_argument(p)
    args = p.parse_args()
    llm = LLM(os.path.dirname(os.path.abspath(args.config)), backend="cuda", load_format="dummy",
              skip_tokenizer_init=True, max_model_len=4096, max_num_seqs=args.batch,
              kv_cache_dtype=args.kv_cache_dtype, **backend_options(args))
    engine, runner, sched = llm.engine, llm.engine.runner, llm.engine.scheduler
    g = torch.Generator().manual_seed(0)
    for _ in range(args.batch):
        engine.add_request(torch.randint(0, 10000, (args.context,), generator=g).tolist(),
                           SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=10_000))
    while any(s.num_output_tokens == 0 for s in sched.running) or sched.waiting:
        engine.step()
    torch.cuda.synchronize()
    phases = {k: 0.0 for k in ("schedule", "prepare", "forward", "sample", "wait", "commit")}
    for _ in range(args.steps):
        t0 = time.perf_counter()
        batch = sched.schedule()
        t1 = time.perf_counter()
        ids, pos, meta, _ = runner.prepare(batch)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        params = runner.graph_sampling(batch, ids, meta)
        if params is not None:
            tokens = runner.graphs.run_and_sample(ids, pos, meta, params)
        else:
            logits = runner.execute(ids, pos, meta)
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        if params is None:
            tokens = runner.sampler(logits, runner.sampling.tensors(batch.seqs))
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        host = tokens.tolist()
        t5 = time.perf_counter()
        sched.postprocess(batch, host)
        t6 = time.perf_counter()
        for k, a, b in zip(phases, (t0, t1, t2, t3, t4, t5), (t1, t2, t3, t4, t5, t6)):
            phases[k] += (b - a) * 1000 / args.steps
    print(f"decode step at batch {len(batch.seqs)}, context ~{args.context}: "
          + ", ".join(f"{k} {v:.3f} ms" for k, v in phases.items()))
    t = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    print(f"synchronous engine.step: {(time.perf_counter() - t) * 1000 / args.steps:.3f} ms/step")
    from torch.profiler import ProfilerActivity, profile
    kv_bytes = []  # K/V bytes the decode kernels read in the profiled steps (context lengths as each step runs)
    cache = runner.attention_layers[0].k_cache
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            kv_bytes.append(sum(s.num_computed_tokens + 1 for s in sched.running))
            engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=60))
    names = ("_slice_stats_kernel", "_pick_kernel", "_slice_best_kernel", "randint", "distribution_elementwise")
    sampler_us = sum(e.device_time_total for e in prof.key_averages() if any(n in e.key for n in names)) / 3
    print(f"sampler kernels: {sampler_us:.1f} us a step ({'inside' if runner.graphs.samples else 'after'} the graph)")
    decode = [e for e in prof.key_averages() if "decode" in e.key and "kernel" in e.key and "combine" not in e.key]
    if decode:
        from benchmarks.kernels_cuda import copy_bandwidth
        hf = llm.config.hf_config
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        per_token = 2 * hf.num_key_value_heads * head_dim * cache.element_size()
        us = sum(e.device_time_total for e in decode) / (3 * len(runner.attention_layers))  # one layer's call
        read = sum(kv_bytes) * per_token / 3  # one layer's reads
        bw = copy_bandwidth()
        print(f"decode attention kernel ({', '.join(e.key for e in decode)}): {us:.1f} us a layer, "
              f"{read / 1e6:.0f} MB of {cache.dtype} K/V: {read / us / 1e3:.0f} GB/s = {read / us / 1e3 / (bw / 1e9):.3f}"
              f" of copy bandwidth ({bw / 1e9:.0f} GB/s)")


if __name__ == "__main__":
    main()
