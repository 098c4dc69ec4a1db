"""Where the seed workload's wall time goes: steps grouped by kind and batch size (GPU only).

    python benchmarks/profile_steps.py --config ../shared/models/qwen3-0.6b/config.json
"""
import argparse
import os
import time
from collections import defaultdict

from nanovllm import LLM, SamplingParams
from nanovllm.commands.bench import seed_workload


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--sync", action="store_true")
    args = p.parse_args()
    llm = LLM(os.path.dirname(os.path.abspath(args.config)), backend="cuda", load_format="dummy",
              skip_tokenizer_init=True, async_scheduling=not args.sync)
    prompts, max_tokens = seed_workload()
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in max_tokens]
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)
    engine = llm.engine
    records, last = [], [time.perf_counter()]
    launch = engine._launch

    def timed_launch(batch, prev=None):
        step = launch(batch, prev)
        now = time.perf_counter()
        n = batch.num_tokens if batch.is_prefill else len(batch.seqs)
        records.append(("prefill" if batch.is_prefill else "decode", n, now - last[0]))
        last[0] = now
        return step
    engine._launch = timed_launch
    if os.environ.get("TWICE"):
        llm.generate(prompts, params, use_tqdm=False)
        records.clear()
    last[0] = start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    total = time.perf_counter() - start
    buckets = defaultdict(lambda: [0, 0.0])
    for kind, n, dt in records:
        key = (kind, 0 if kind == "prefill" else min(256, 1 << (n - 1).bit_length()))
        buckets[key][0] += 1
        buckets[key][1] += dt
    print(f"total {total:.2f} s, {len(records)} steps")
    print("prefill steps (tokens, ms):", [(n, round(dt * 1000, 1)) for kind, n, dt in records if kind == "prefill"])
    print(f"{'kind':>8} {'batch<=':>8} {'steps':>6} {'seconds':>8} {'ms/step':>8}")
    for (kind, b), (count, secs) in sorted(buckets.items()):
        print(f"{kind:>8} {b:>8} {count:>6} {secs:>8.3f} {secs / count * 1000:>8.3f}")


if __name__ == "__main__":
    main()
