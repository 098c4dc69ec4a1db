"""`nanovllm backends`: list backends, their availability and the kernels per op; or print one kernel plan."""
import argparse
import logging


SHAPE_DEFAULTS = {"head_dim": 128, "num_heads": 16, "num_kv_heads": 8}  # the listing's query, without --plan


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--head-dim", type=int, metavar="N", help="head dim of the query the kernels are resolved for "
                                                            "(default: 128; with --plan: the model's)")
    b.add_argument("--num-heads", type=int, metavar="N", help="query heads (default: 16; with --plan: the model's)")
    b.add_argument("--num-kv-heads", type=int, metavar="N", help="KV heads (default: 8; with --plan: the model's)")
    b.add_argument("--kernels", help="'reference' or op=name,op=name: resolve as a run with this switch would "
                                     "(default: NANOVLLM_KERNELS, else plugins.toml and priorities)")
    b.add_argument("--kv-cache-dtype", choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
                   help="resolve the kernels for this KV cache dtype (default auto: the model dtype)")
    b.add_argument("--plan", action="store_true", help="print the kernel plan of one backend (--backend, else the "
                                                       "first available) for a model's shapes, or for --head-dim, "
                                                       "--num-heads and --num-kv-heads")
    b.add_argument("--model", help="with --plan: a checkpoint folder whose shapes the plan is resolved for (default: "
                                   "the model generate uses without --model)")
    b.add_argument("--backend", help="with --plan: the backend (default: the first available); without: list only "
                                     "this backend (default: all)")
    b.add_argument("--save-plan", metavar="FILE", help="with --plan: write the plan as TOML (default: not written)")
    b.add_argument("--kernel-plan", metavar="FILE", help="with --plan: check that a saved plan can be replayed "
                                                         "(default: none)")


def kv_cache_dtype(args):
    from nanovllm.core.kv_quant import KV_CACHE_DTYPES
    return KV_CACHE_DTYPES[getattr(args, "kv_cache_dtype", None) or "auto"]


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
    for flag in ("model", "save_plan", "kernel_plan"):
        option = "--" + flag.replace("_", "-")
        if getattr(args, flag) is not None:
            raise ValueError(f"{option} needs --plan: nanovllm backends --plan {option} ...")
    if args.backend is not None and args.backend not in plugins.backends:
        plugins.select(args.backend)  # raises: unknown backend, with suggestions and the known ones
    shape = {name: getattr(args, name) or default for name, default in SHAPE_DEFAULTS.items()}
    for name, backend in plugins.backends.items():
        if args.backend is not None and name != args.backend:
            continue
        ok, reason = backend_availability(backend)
        print(f"{name} (plugin {plugins.plugin_of_backend[name]}): {'available' if ok else 'unavailable: ' + reason}")
        query = KernelQuery(backend.device_type, backend.default_dtype, shape["head_dim"], shape["num_heads"],
                            shape["num_kv_heads"], backend.default_block_size, kv_cache_dtype(args))
        for option, spec in backend.options.items():
            print(f"  option {option} (default {spec.default}): {spec.help}")
        print("  kernels:")  # the table's first line names the query
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
    """The kernel plan one engine would run: for a model's shapes (--model, else the default model generate runs)
    or, when any of them is given, for --head-dim/--num-heads/--num-kv-heads."""
    from nanovllm.core.kernel_plan_io import save_plan
    from nanovllm.core.registry import KernelQuery
    from nanovllm.core.startup import resolve, resolve_kernels
    by_shape = any(getattr(args, name) is not None for name in SHAPE_DEFAULTS)
    if args.model and by_shape:
        raise ValueError("--model and --head-dim/--num-heads/--num-kv-heads both give the shapes: give one of them")
    if not by_shape:
        if args.model is None:
            from nanovllm.checkpoint.default_model import default_model_path
            args.model = default_model_path()
        from transformers import AutoConfig

        from nanovllm.core.config import EngineConfig
        from nanovllm.checkpoint.folder import check_model_folder
        check_model_folder(args.model)
        config = EngineConfig(model=args.model, backend=args.backend, hf_config=AutoConfig.from_pretrained(args.model),
                              kernels=kernels, kernel_plan=args.kernel_plan,
                              kv_cache_dtype=getattr(args, "kv_cache_dtype", None) or "auto")
        plan = resolve(config, plugins).plan
    else:
        if args.kernel_plan:
            raise ValueError("--kernel-plan with --plan needs --model: a plan is checked against a model's shapes")
        backend = plugins.select(args.backend)
        shape = {name: getattr(args, name) or default for name, default in SHAPE_DEFAULTS.items()}
        query = KernelQuery(backend.device_type, backend.default_dtype, shape["head_dim"], shape["num_heads"],
                            shape["num_kv_heads"], backend.default_block_size, kv_cache_dtype(args))
        plan = resolve_kernels(plugins, backend.name, query, kernels)
    q = plan.query
    print(f"kernel plan for backend {plan.backend} ({q.device_type}, {q.describe()}"
          f"{', model ' + args.model if args.model else ''}):")
    print(plan.table())
    if args.save_plan:
        print(f"written to {save_plan(plan, args.save_plan)}")
    return 0
