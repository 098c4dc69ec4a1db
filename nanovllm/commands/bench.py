"""`nanovllm bench`: throughput (and time to first token) on a random workload, with the workload's floor
measured on the same device.

Workload (nano-vllm's bench): random.seed(0); `--num-prompts` prompts of randint(min(100, N), N) token ids for
N = `--input-len`, drawn by randint(0, 10000); max_tokens=randint(min(100, M), M) for M = `--output-len`
(`--fixed-lengths`: exactly N and M); temperature 0.6; ignore_eos; one warm-up first. Defaults: 256 prompts,
1024, 1024 on an accelerator; 16 prompts, 128, 64 on a CPU.

Floor = bytes the workload must move / measured copy bandwidth + prefill matrix FLOPs / measured bf16
matmul rate. Bytes: the weights once per decode step over the longest request's steps, every decoded
token reading its whole context's K/V (1 byte a value with an FP8 KV cache), and every token's K/V written
once. Efficiency = floor / time.
`--no-floor` skips its measurement (large buffers copied and a matmul timed: seconds, more on a busy CPU).
"""
import argparse
import json
import os
import platform
import random
import time
from collections.abc import Callable

import torch

from nanovllm.checkpoint.folder import config_folder
from nanovllm.commands.arguments import (add_backend_option_argument, add_threads_argument, backend_options,
                                         positive_int)
from nanovllm.core.logging import get_logger
from nanovllm.models.decoder import head_dim_of

logger = get_logger(__name__)


WORKLOADS = {"accelerator": (256, 1024, 1024), "cpu": (16, 128, 64)}  # num_prompts, input_len, output_len


def seed_workload(num_seqs=256, max_input_len=1024, max_output_len=1024, seed=0, fixed_lengths=False,
                  vocab_size=10001):
    """(prompts as token-id lists, max_tokens per prompt); ids below 10000 (and below a smaller vocabulary)."""
    random.seed(seed)

    def length(n: int) -> int:
        return n if fixed_lengths else random.randint(min(100, n), n)
    top = min(10000, vocab_size - 1)
    prompts = [[random.randint(0, top) for _ in range(length(max_input_len))] for _ in range(num_seqs)]
    max_tokens = [length(max_output_len) for _ in range(num_seqs)]
    return prompts, max_tokens


def timed_generate(llm, prompts, params, progress: bool = True) -> dict:
    """Run one generate; output tokens, seconds, time to first token (of the batch: the earliest
    RequestOutput.metrics.first_token_time, when the engine committed that token) and the rates. Without
    `progress` nothing is streamed step by step (`use_tqdm=False`, as nano-vllm's bench calls it): each request
    reports its end only."""
    start, clock = time.perf_counter(), time.monotonic()
    outputs = llm.generate(prompts, params, use_tqdm=progress)
    seconds = time.perf_counter() - start
    num_output = sum(len(o["token_ids"]) for o in outputs)
    ttft = min(o.metrics.first_token_time for o in outputs) - clock
    return {"output_tokens": num_output, "seconds": round(seconds, 3), "tokens_per_s": round(num_output / seconds, 1),
            "ttft_s": round(ttft, 3),
            "decode_tokens_per_s": round((num_output - len(prompts)) / max(seconds - ttft, 1e-9), 1)}


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


def copy_bandwidth(device: torch.device, sync: Callable[[], None], nbytes: int | None = None) -> float:
    """Bytes/s of a large device-to-device copy (two buffers of `nbytes`: 2 GiB on an accelerator, 512 MiB on a
    CPU, far beyond its caches), counting bytes read plus bytes written."""
    nbytes = nbytes or (512 << 20 if device.type == "cpu" else 2 << 30)
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


def check_arguments(args) -> None:
    """What argparse cannot see, checked before the model loads (a bench can run for minutes)."""
    if args.model and args.config:
        raise ValueError("give one of --model or --config (random weights of a config's shape), not both")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            raise ValueError(f"--json {args.json}: the folder {folder} does not exist; create it or choose another "
                             f"file")


def run(args) -> dict:
    from nanovllm import LLM, SamplingParams
    check_arguments(args)
    model = args.model or (config_folder(None, args.config) if args.config else None)  # None: the default model
    options = dict(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                   max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
                   async_scheduling=not args.sync)
    if args.no_compile:
        options["compile"] = False
    if args.config:
        options.update(load_format="dummy", skip_tokenizer_init=True)
    for name in ("num_kvcache_blocks", "dtype", "threads", "kernels", "kernel_plan", "verify_kernels", "kv_cache_dtype",
                 "kv_cache_scale"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    options.update(backend_options(args))
    llm = LLM(model, backend=args.backend, **options)
    device = llm.engine.runner.device
    defaults = WORKLOADS["cpu" if device.type == "cpu" else "accelerator"]
    num_prompts, input_len, output_len = (given or default for given, default in
                                          zip((args.num_prompts, args.input_len, args.output_len), defaults))
    prompts, max_tokens = seed_workload(num_prompts, input_len, output_len, fixed_lengths=args.fixed_lengths,
                                        vocab_size=llm.config.hf_config.vocab_size)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in max_tokens]
    llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    logger.info("bench: %d prompts of %s tokens, %s output tokens each", num_prompts,
                input_len if args.fixed_lengths else f"{min(100, input_len)}-{input_len}",
                output_len if args.fixed_lengths else f"{min(100, output_len)}-{output_len}")
    timing = timed_generate(llm, prompts, params, progress=not args.no_progress)
    runner = llm.engine.runner
    result = {"backend": llm.engine.backend.name, "device": llm.engine.backend.device_name(device),
              "model": llm.config.model, "dtype": str(runner.dtype).removeprefix("torch."),
              "threads": torch.get_num_threads(), "num_prompts": num_prompts, "input_len": input_len,
              "output_len": output_len, "fixed_lengths": args.fixed_lengths, **timing}
    if not args.no_floor:
        result.update(measure_floor(llm, prompts, max_tokens, timing["seconds"]))
    result.update({
        "torch": torch.__version__, "python": platform.python_version(),
        "kernels": {op: f"{c.impl.backend}/{c.impl.name}" for op, c in llm.engine.kernel_plan.choices.items()
                    if llm.engine.kernel_plan.calls(op)},  # the kernels that ran (a fused op's parts, or it)
        "kv_cache_dtype": str(runner.kv_dtype).removeprefix("torch."),
        "enforce_eager": args.enforce_eager, "compile": not args.no_compile, "async_scheduling": not args.sync,
        "backend_options": llm.config.backend_options,
    })
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


def measure_floor(llm, prompts, max_tokens, seconds: float) -> dict:
    backend, device = llm.engine.backend, llm.engine.runner.device

    def sync():
        backend.synchronize(device)
    runner = llm.engine.runner
    floor = workload_floor(llm.config.hf_config, prompts, max_tokens, runner.dtype.itemsize, runner.kv_dtype.itemsize)
    logger.info("bench: measuring the floor on %s: copy bandwidth, then a matmul rate (skip with --no-floor)",
                device)
    start = time.perf_counter()
    bandwidth = copy_bandwidth(device, sync)
    logger.info("bench: copy bandwidth %.3f TB/s (%.1f s); timing a matmul", bandwidth / 1e12,
                time.perf_counter() - start)
    flops = matmul_rate(device, sync)
    floor_s = floor["bytes"] / bandwidth + floor["prefill_flops"] / flops
    logger.info("bench: matmul %.2f TFLOP/s; floor measured in %.1f s", flops / 1e12, time.perf_counter() - start)
    return {"floor_bytes_TB": round(floor["bytes"] / 1e12, 2), "copy_bandwidth_TBps": round(bandwidth / 1e12, 3),
            "prefill_TFLOP": round(floor["prefill_flops"] / 1e12, 1), "matmul_TFLOPps": round(flops / 1e12, 1),
            "floor_s": round(floor_s, 3), "efficiency": round(floor_s / seconds, 3)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", help="the backend (default: the first available in plugins.toml's order)")
    p.add_argument("--model", help="a Hugging Face checkpoint folder (default: the model generate uses, "
                                   "SmolLM2-135M-Instruct)")
    p.add_argument("--config", metavar="CONFIG_JSON", help="a model's config.json: random weights of that shape, "
                                                           "no checkpoint needed (default: none, use --model)")
    p.add_argument("--num-prompts", "--num-seqs", type=positive_int, metavar="N",
                   help="prompts in the workload (default: 256 on an accelerator, 16 on a CPU)")
    p.add_argument("--input-len", "--max-input-len", type=positive_int, metavar="N",
                   help="prompt length: drawn from [min(100, N), N] (default: 1024 on an accelerator, 128 on a CPU)")
    p.add_argument("--output-len", "--max-output-len", type=positive_int, metavar="N",
                   help="output tokens per prompt: drawn from [min(100, N), N] (default: 1024 on an accelerator, "
                        "64 on a CPU)")
    p.add_argument("--fixed-lengths", action="store_true", help="every prompt exactly --input-len tokens and every "
                                                                "output exactly --output-len tokens")
    p.add_argument("--max-model-len", type=int, default=4096, metavar="N", help="longest prompt + output in tokens")
    p.add_argument("--max-num-seqs", type=int, default=256, metavar="N", help="most requests in one step")
    p.add_argument("--max-num-batched-tokens", type=int, default=16384, metavar="N", help="most tokens in one step")
    p.add_argument("--num-kvcache-blocks", type=int, metavar="N", help="KV cache size in blocks (default: the "
                                                                       "backend sizes it)")
    p.add_argument("--dtype", help="float32, float16, bfloat16 or auto: the checkpoint's (default: the backend's)")
    add_threads_argument(p)
    p.add_argument("--enforce-eager", action="store_true", help="no device graphs (CUDA graphs)")
    p.add_argument("--no-compile", action="store_true", help="do not fuse elementwise layers with torch.compile")
    p.add_argument("--sync", action="store_true", help="no pipelined decode (async_scheduling=False)")
    p.add_argument("--no-floor", action="store_true", help="skip measuring the workload's floor (copy bandwidth and "
                                                           "matmul rate)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar: the call then streams nothing per "
                   "step (as nano-vllm's bench); the time to first token comes from the outputs' metrics")
    p.add_argument("--via-server", action="store_true",
                   help="also send the workload as concurrent HTTP requests to a local server on the same engine "
                        "(needs the serve extra) and report its throughput and the ratio to the offline one")
    p.add_argument("--json", metavar="FILE", help="append the result as a JSON line to this file (default: none)")
    add_backend_option_argument(p)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    line = (f"{result['device']} / {result['backend']} ({result['dtype']}, {result['threads']} threads): "
            f"{result['output_tokens']} output tokens in {result['seconds']:.2f} s = {result['tokens_per_s']:.1f} "
            f"tok/s; time to first token {result['ttft_s']:.3f} s")
    if "floor_s" in result:
        line += (f"; floor {result['floor_s']:.2f} s ({result['floor_bytes_TB']} TB at {result['copy_bandwidth_TBps']}"
                 f" TB/s + {result['prefill_TFLOP']} TFLOP at {result['matmul_TFLOPps']} TFLOP/s); efficiency "
                 f"{result['efficiency']:.3f}")
    print(line)
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
