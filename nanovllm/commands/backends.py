"""`nanovllm backends`: list backends, their availability and the kernels per op; or print one kernel plan."""
import argparse
import logging


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--head-dim", type=int, default=128, help="head dim of the query the kernels are resolved for")
    b.add_argument("--num-heads", type=int, default=16)
    b.add_argument("--num-kv-heads", type=int, default=8)
    b.add_argument("--kernels", help="'reference' or op=name,op=name: resolve as a run with this switch would")
    b.add_argument("--plan", action="store_true", help="print the kernel plan of one backend (--backend, else the "
                                                       "first available) for --model's shapes")
    b.add_argument("--model", help="with --plan: a checkpoint folder whose shapes the plan is resolved for")
    b.add_argument("--backend", help="with --plan: the backend (default: first available)")
    b.add_argument("--save-plan", metavar="FILE", help="with --plan: write the plan as TOML")
    b.add_argument("--kernel-plan", metavar="FILE", help="with --plan --model: check that a saved plan can be replayed")


def main(args) -> int:
    import os

    from nanovllm.core.config import parse_kernels
    from nanovllm.core.plugins import backend_availability, load_plugins
    from nanovllm.core.registry import KernelQuery
    from nanovllm.core.startup import resolve_kernels
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
                            args.num_kv_heads, backend.default_block_size)
        print(f"  kernels for {str(query.dtype).removeprefix('torch.')}, head_dim {query.head_dim}, "
              f"{query.num_heads}/{query.num_kv_heads} heads, block size {query.block_size}:")
        registry_logger = logging.getLogger("nanovllm.core.registry")
        level = registry_logger.level
        registry_logger.setLevel(logging.ERROR)  # a listing: the table already shows every fallback and reason
        try:
            print(resolve_kernels(plugins, name, query, kernels).table())
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
    from nanovllm.core.startup import resolve, resolve_kernels
    if args.model:
        from transformers import AutoConfig

        from nanovllm.core.config import EngineConfig
        from nanovllm.checkpoint.folder import check_model_folder
        check_model_folder(args.model)
        config = EngineConfig(model=args.model, backend=args.backend, hf_config=AutoConfig.from_pretrained(args.model),
                              kernels=kernels, kernel_plan=args.kernel_plan)
        plan = resolve(config, plugins).plan
    else:
        if args.kernel_plan:
            raise ValueError("--kernel-plan with --plan needs --model: a plan is checked against a model's shapes")
        backend = plugins.select(args.backend)
        query = KernelQuery(backend.device_type, backend.default_dtype, args.head_dim, args.num_heads,
                            args.num_kv_heads, backend.default_block_size)
        plan = resolve_kernels(plugins, backend.name, query, kernels)
    q = plan.query
    print(f"kernel plan for backend {plan.backend} ({q.device_type}, {str(q.dtype).removeprefix('torch.')}, "
          f"head_dim {q.head_dim}, {q.num_heads}/{q.num_kv_heads} heads, block size {q.block_size}"
          f"{', model ' + args.model if args.model else ''}):")
    print(plan.table())
    if args.save_plan:
        print(f"written to {save_plan(plan, args.save_plan)}")
    return 0
