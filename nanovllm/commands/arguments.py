"""Command-line options shared by the subcommands that build an engine (generate, bench)."""
import argparse


def engine_options(args) -> dict:
    options = {}
    for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "num_kvcache_blocks",
                 "kvcache_block_size", "tensor_parallel_size", "device", "dtype"):
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
    add_kernel_arguments(p)
