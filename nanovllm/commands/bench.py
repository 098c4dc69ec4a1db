"""Throughput benchmark on the seed workload, with the workload's floor measured on the same device.

Workload (nano-vllm's bench): random.seed(0); 256 prompts of randint(100, 1024) token ids drawn by
randint(0, 10000); max_tokens=randint(100, 1024) each; temperature 0.6; ignore_eos; one warm-up first.

Floor = bytes the workload must move / measured copy bandwidth + prefill matrix FLOPs / measured bf16
matmul rate. Bytes: the weights once per decode step over the longest request's steps, every decoded
token reading its whole context's K/V (1 byte a value with an FP8 KV cache), and every token's K/V written
once. Efficiency = floor / time.
"""
import argparse
import json
import platform
import random
import time
from collections.abc import Callable

import torch

from nanovllm.checkpoint.folder import config_folder
from nanovllm.core.logging import get_logger
from nanovllm.models.decoder import head_dim_of

logger = get_logger(__name__)


def seed_workload(num_seqs=256, max_input_len=1024, max_output_len=1024, seed=0):
    random.seed(seed)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(min(100, max_input_len), max_input_len))] for _ in range(num_seqs)]
    max_tokens = [random.randint(min(100, max_output_len), max_output_len) for _ in range(num_seqs)]
    return prompts, max_tokens


def _timed(fn, sync: Callable[[], None], repeats: int) -> float:
    """Median seconds of fn() on the device (`sync` waits for it), after a warm-up."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device, sync: Callable[[], None], nbytes: int = 2 << 30) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = _timed(lambda: dst.copy_(src), sync, 10)
    return 2 * nbytes / seconds


def matmul_rate(device: torch.device, sync: Callable[[], None], n: int = 8192) -> float:
    """FLOP/s of a large bf16 matrix product (float32 on CPU, where bf16 is emulated)."""
    on_cpu = device.type == "cpu"
    dtype = torch.float32 if on_cpu else torch.bfloat16
    n = 1024 if on_cpu else n
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n ** 3 / _timed(lambda: a @ b, sync, 10)


def workload_floor(hf, prompts, max_tokens, dtype_bytes: int = 2, kv_dtype_bytes: int | None = None) -> dict:
    """Bytes and prefill FLOPs of the workload; K/V bytes counted at `kv_dtype_bytes` (1 for an FP8 cache)."""
    layers, kv_heads, heads = hf.num_hidden_layers, hf.num_key_value_heads, hf.num_attention_heads
    head_dim = head_dim_of(hf)
    hidden, inter, vocab = hf.hidden_size, hf.intermediate_size, hf.vocab_size
    layer_params = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden + 3 * hidden * inter
    matmul_params = layers * layer_params
    embed_params = vocab * hidden * (1 if getattr(hf, "tie_word_embeddings", False) else 2)
    weight_bytes = (matmul_params + embed_params) * dtype_bytes
    kv_bytes_per_token = 2 * layers * kv_heads * head_dim * (kv_dtype_bytes or dtype_bytes)
    context_reads = sum(len(p) * m + m * (m - 1) // 2 + m for p, m in zip(prompts, max_tokens))
    total_tokens = sum(len(p) + m for p, m in zip(prompts, max_tokens))
    bytes_moved = weight_bytes * max(max_tokens) + kv_bytes_per_token * (context_reads + total_tokens)
    attn_flops = sum(4 * layers * heads * head_dim * len(p) * (len(p) + 1) // 2 for p in prompts)
    prefill_flops = 2 * matmul_params * sum(len(p) for p in prompts) + attn_flops
    return {"bytes": bytes_moved, "prefill_flops": prefill_flops, "weight_bytes": weight_bytes}


def run(args) -> dict:
    from nanovllm import LLM, SamplingParams
    model = args.model or config_folder(None, args.config)
    options = dict(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                   max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
                   async_scheduling=not args.sync)
    if args.no_compile:
        options["compile"] = False
    if args.config:
        options.update(load_format="dummy", skip_tokenizer_init=True)
    if args.num_kvcache_blocks:
        options["num_kvcache_blocks"] = args.num_kvcache_blocks
    for name in ("kernels", "kernel_plan", "verify_kernels", "kv_cache_dtype", "kv_cache_scale"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    llm = LLM(model, backend=args.backend, **options)
    prompts, max_tokens = seed_workload(args.num_seqs, args.max_input_len, args.max_output_len)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in max_tokens]
    llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    backend, device = llm.engine.backend, llm.engine.runner.device

    def sync():
        backend.synchronize(device)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=not args.no_progress)
    seconds = time.perf_counter() - start
    num_output = sum(len(o["token_ids"]) for o in outputs)
    runner = llm.engine.runner
    floor = workload_floor(llm.config.hf_config, prompts, max_tokens, runner.dtype.itemsize, runner.kv_dtype.itemsize)
    bandwidth, flops = copy_bandwidth(device, sync), matmul_rate(device, sync)
    floor_s = floor["bytes"] / bandwidth + floor["prefill_flops"] / flops
    result = {
        "backend": backend.name, "device": backend.device_name(device), "model": model,
        "output_tokens": num_output, "seconds": round(seconds, 3), "tokens_per_s": round(num_output / seconds, 1),
        "floor_bytes_TB": round(floor["bytes"] / 1e12, 2), "copy_bandwidth_TBps": round(bandwidth / 1e12, 3),
        "prefill_TFLOP": round(floor["prefill_flops"] / 1e12, 1), "matmul_TFLOPps": round(flops / 1e12, 1),
        "floor_s": round(floor_s, 3), "efficiency": round(floor_s / seconds, 3),
        "torch": torch.__version__, "python": platform.python_version(),
        "kernels": {op: f"{c.impl.backend}/{c.impl.name}" for op, c in llm.engine.kernel_plan.choices.items()},
        "kv_cache_dtype": str(runner.kv_dtype).removeprefix("torch."),
        "enforce_eager": args.enforce_eager, "compile": not args.no_compile, "async_scheduling": not args.sync,
    }
    try:
        import triton
        result["triton"] = triton.__version__
    except ImportError:
        pass
    if args.via_server:
        from nanovllm.entrypoints.bench_via_server import run_via_server
        served = run_via_server(llm, prompts, max_tokens)
        result.update({"via_server_" + k: v for k, v in served.items()})
        result["via_server_ratio"] = round(served["tokens_per_s"] / result["tokens_per_s"], 3)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend")
    p.add_argument("--model", help="a checkpoint folder")
    p.add_argument("--config", help="a config.json: random weights of that shape (e.g. ../shared/models/qwen3-0.6b/config.json)")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--max-output-len", type=int, default=1024)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--num-kvcache-blocks", type=int)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="do not fuse elementwise layers with torch.compile")
    p.add_argument("--sync", action="store_true", help="no pipelined decode (async_scheduling=False)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--via-server", action="store_true",
                   help="also send the workload as concurrent HTTP requests to a local server on the same engine "
                        "(needs the serve extra) and report its throughput and the ratio to the offline one")
    p.add_argument("--json", help="append the result as a JSON line to this file")


def main(args: argparse.Namespace) -> int:
    if not args.model and not args.config:  # before any work: the message names both ways
        raise ValueError("give --model (a checkpoint folder) or --config (a config.json for random weights)")
    result = run(args)
    print(f"{result['device']} / {result['backend']}: {result['output_tokens']} output tokens in {result['seconds']:.2f} s "
          f"= {result['tokens_per_s']:.0f} tok/s; floor {result['floor_s']:.2f} s "
          f"({result['floor_bytes_TB']} TB at {result['copy_bandwidth_TBps']} TB/s + {result['prefill_TFLOP']} TFLOP "
          f"at {result['matmul_TFLOPps']} TFLOP/s); efficiency {result['efficiency']:.3f}")
    if args.via_server:
        print(f"via the HTTP server ({result['via_server_requests']} concurrent requests): "
              f"{result['via_server_output_tokens']} output tokens in {result['via_server_seconds']:.2f} s = "
              f"{result['via_server_tokens_per_s']:.0f} tok/s; {result['via_server_ratio']:.3f} of offline")
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    return 0
