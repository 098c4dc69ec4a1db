"""FP8 KV cache accuracy: a model-dtype KV cache against FP8 ones, per FP8 format and scale method.

    python benchmarks/kv_accuracy.py                                   # SmolLM2 on cpu_ref (float32 model)
    python benchmarks/kv_accuracy.py --backend cuda --config shared-models/qwen3-0.6b/config.json

Prompts: text prompts for a checkpoint with a tokenizer; seeded random token ids (with --config, random
weights). Prints one line per (kv_cache_dtype, kv_cache_scale) and appends JSON lines with --json.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep on a shared CPU

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

from nanovllm import LLM  # noqa: E402
from nanovllm.testing.kv_accuracy import compare_kv_caches  # noqa: E402

TEXT_PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Explain why the sky is blue in one paragraph.",
    "List three uses of a paperclip:",
    "Once upon a time, in a small village,",
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="cpu_ref")
    p.add_argument("--config", help="a config.json: random weights of that shape")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=6)
    p.add_argument("--dtypes", default="fp8_e4m3,fp8_e5m2")
    p.add_argument("--scales", default="per_tensor,per_head,unit")
    p.add_argument("--eager", action="store_true", help="no graphs or torch.compile: faster start-up, same math")
    p.add_argument("--json")
    args = p.parse_args()
    options = dict(backend=args.backend, max_model_len=1024, max_num_batched_tokens=2048, max_num_seqs=16,
                   enforce_eager=args.eager)
    if args.eager:
        options["compile"] = False
    options["num_kvcache_blocks"] = 256  # two engines share the device: no memory-fraction budgets
    model = None
    if args.config:
        model = os.path.dirname(os.path.abspath(args.config))
        options.update(load_format="dummy", skip_tokenizer_init=True)
    reference = LLM(model, **options)
    if args.config:
        rng = random.Random(0)
        prompts = [[rng.randrange(10000) for _ in range(rng.randint(50, 300))] for _ in range(args.num_prompts)]
    else:
        prompts = [reference.tokenizer.encode(t) for t in TEXT_PROMPTS[:args.num_prompts]]
    for dtype in args.dtypes.split(","):
        for scale in args.scales.split(","):
            start = time.perf_counter()
            candidate = LLM(model, kv_cache_dtype=dtype, kv_cache_scale=scale, **options)
            result = compare_kv_caches(reference, candidate, prompts, args.max_tokens)
            print(f"{dtype:9s} {scale:10s} {result} ({time.perf_counter() - start:.0f} s)", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(dict(model=model or "SmolLM2-135M", backend=args.backend, kv_cache_dtype=dtype,
                                            kv_cache_scale=scale, **vars(result))) + "\n")
            del candidate


if __name__ == "__main__":
    main()
