"""The seed workload sampled with Qwen3's generation_config filters (temperature 0.6, top_k 20, top_p 0.95) on cuda:
the sampler's candidate path (`core/sampling/topk_candidates.py`) against the reference's vocabulary sort, one
engine, the two alternated (GPU only). A first run fills the prefix cache, so the timed runs are decode (and the
sampler) with equal prefix hits.

    python benchmarks/filtered_sampling.py --config ../shared/models/qwen3-0.6b/config.json [--rounds 2]
"""
import argparse
import os
import time

from nanovllm import LLM, SamplingParams
from nanovllm.backends.cuda import sampler
from nanovllm.commands.bench import seed_workload


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    llm = LLM(os.path.dirname(os.path.abspath(args.config)), backend="cuda", load_format="dummy",
              skip_tokenizer_init=True)
    prompts, max_tokens = seed_workload()
    params = [SamplingParams(temperature=0.6, top_k=20, top_p=0.95, ignore_eos=True, max_tokens=m) for m in max_tokens]
    num_tokens = sum(max_tokens)
    llm.generate(prompts, params, use_tqdm=False)  # warm: every run below finds the prompts in the prefix cache
    candidates = sampler.MAX_CANDIDATES
    for r in range(args.rounds):
        for name, bound in (("reference sort", 0), ("candidates", candidates)):
            sampler.MAX_CANDIDATES = bound
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            print(f"round {r + 1}, {name}: {seconds:.2f} s = {num_tokens / seconds:,.0f} tokens/s", flush=True)
    llm.close()


if __name__ == "__main__":
    main()
