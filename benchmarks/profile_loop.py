"""Host-side profile of the engine loop (GPU only): which CUDA API calls block, per decode step.

    python benchmarks/profile_loop.py --config ../shared/models/qwen3-0.6b/config.json [--sync]
"""
import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

from nanovllm import LLM, SamplingParams


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--sync", action="store_true")
    args = p.parse_args()
    llm = LLM(os.path.dirname(os.path.abspath(args.config)), backend="cuda", load_format="dummy",
              skip_tokenizer_init=True, max_model_len=2048, async_scheduling=not args.sync)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 10000, (300,), generator=g).tolist() for _ in range(64)]
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=100)
    llm.generate(prompts, params, use_tqdm=False)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))


if __name__ == "__main__":
    main()
