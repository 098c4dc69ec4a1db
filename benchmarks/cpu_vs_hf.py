"""nanovllm's cpu backend against Hugging Face transformers' `generate` on the embedded model (SmolLM2-135M),
in one process: same threads, same prompts, the two alternated round by round so that a machine shared with
other work slows both alike. Ratios are taken per round; the table shows medians.

Workloads (the prompts of `nanovllm bench --fixed-lengths`, temperature 0.6 with top-k and top-p off in both
engines, every request to its length):
  latency     1 prompt of 128 tokens, 128 output tokens: time to first token and output tokens/s
  throughput  16 prompts of 128 tokens, 64 output tokens each: output tokens/s

    python benchmarks/cpu_vs_hf.py [--rounds 3] [--threads N] [--hf-dtype auto|float32|bfloat16]

nanovllm runs in its backend's default dtype (bfloat16 on CPUs with AVX-512 BF16 or AMX); transformers in the
dtype `from_pretrained` picks by default ("auto": the checkpoint's, bfloat16) unless --hf-dtype says otherwise.
"""
import argparse
import os
import platform
import statistics
import sys
import time

import nanovllm  # noqa: E402,F401  (first: its OpenMP settings, set before torch loads, apply to both engines)
import torch  # noqa: E402

WORKLOADS = {"latency": (1, 128, 128), "throughput": (16, 128, 64)}  # prompts, input len, output len


def hf_generate(model, prompts: list[list[int]], output_len: int) -> dict:
    """transformers' generate on equal-length prompts; the time of its first new token from a streamer."""
    ids = torch.tensor(prompts)
    first = []

    class FirstToken:
        calls = 0

        def put(self, value):
            FirstToken.calls += 1
            if FirstToken.calls == 2:  # the first call hands over the prompt
                first.append(time.perf_counter())

        def end(self):
            pass

    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.6, top_k=0,
                             top_p=1.0, max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=0,
                             streamer=FirstToken())
    seconds = time.perf_counter() - start
    num_output = (out.shape[1] - ids.shape[1]) * len(prompts)
    return {"output_tokens": num_output, "seconds": seconds, "tokens_per_s": num_output / seconds,
            "ttft_s": first[0] - start}


def main() -> int:
    from transformers import AutoModelForCausalLM

    from nanovllm import LLM, SamplingParams
    from nanovllm.backends.cpu.threads import choose_threads
    from nanovllm.commands.bench import seed_workload, timed_generate
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds per workload (default: 3)")
    p.add_argument("--threads", type=int, help="threads for both (default: what the cpu backend would choose)")
    p.add_argument("--hf-dtype", default="auto", help="transformers' dtype (default: auto, its own default)")
    p.add_argument("--dtype", help="nanovllm's dtype (default: the cpu backend's)")
    args = p.parse_args()
    threads, why = choose_threads(args.threads)
    torch.set_num_threads(threads)
    start = time.perf_counter()
    llm = LLM(backend="cpu", threads=threads, dtype=args.dtype, max_model_len=512, max_num_seqs=16)
    ours_load = time.perf_counter() - start
    start = time.perf_counter()
    hf_dtype = args.hf_dtype if args.hf_dtype == "auto" else getattr(torch, args.hf_dtype)
    hf = AutoModelForCausalLM.from_pretrained(llm.config.model, dtype=hf_dtype).eval()
    hf_load = time.perf_counter() - start
    print(f"# {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} usable cores, "
          f"load average {os.getloadavg()[0]:.1f}; {threads} threads ({why}); torch {torch.__version__}; "
          f"nanovllm cpu {str(llm.engine.runner.dtype).removeprefix('torch.')} (load {ours_load:.1f} s), "
          f"transformers {str(hf.dtype).removeprefix('torch.')} (load {hf_load:.1f} s)", flush=True)
    llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up, as bench does
    hf_generate(hf, [[1, 2, 3, 4]], 8)
    rows = []
    for name, (num_prompts, input_len, output_len) in WORKLOADS.items():
        ours, theirs = [], []
        for round_index in range(args.rounds):
            # fresh prompts each round (seed 0 is bench's): no prefix-cache hits from an earlier round
            prompts, max_tokens = seed_workload(num_prompts, input_len, output_len, seed=round_index,
                                                fixed_lengths=True, vocab_size=llm.config.hf_config.vocab_size)
            # the same filters as transformers' call below (top-k and top-p off), not the model's defaults
            params = [SamplingParams(temperature=0.6, top_p=1.0, top_k=0, ignore_eos=True, max_tokens=m)
                      for m in max_tokens]
            ours.append(timed_generate(llm, prompts, params, progress=False))
            theirs.append(hf_generate(hf, prompts, output_len))
            print(f"{name} round {round_index + 1}: nanovllm {ours[-1]['tokens_per_s']:.1f} tok/s (TTFT "
                  f"{ours[-1]['ttft_s']:.3f} s), transformers {theirs[-1]['tokens_per_s']:.1f} tok/s (TTFT "
                  f"{theirs[-1]['ttft_s']:.3f} s), load average {os.getloadavg()[0]:.1f}", flush=True)
        med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
        ratio = statistics.median(o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(ours, theirs))
        rows.append(f"| {name}: {num_prompts} x {output_len} tokens (prompts of {input_len}) | "
                    f"{med(ours, 'tokens_per_s'):.1f} | {med(ours, 'ttft_s'):.3f} | {med(theirs, 'tokens_per_s'):.1f} | "
                    f"{med(theirs, 'ttft_s'):.3f} | **{ratio:.2f}x** |")
    print("\n| workload | nanovllm tok/s | nanovllm TTFT s | transformers tok/s | transformers TTFT s | ratio |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
