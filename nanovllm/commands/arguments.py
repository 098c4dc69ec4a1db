"""Command-line options shared by the subcommands that build an engine (generate, bench), and the help
formatter every subcommand uses: each option's help ends with its default."""
import argparse


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already names its default; an on/off flag's
    default is "off"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.default is None:
            return text
        default = "off" if action.default is False else "%(default)s"
        return f"{text} (default: {default})"


def int_in(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high] (no upper bound when high is None); a usage error naming the
    value otherwise."""
    expected = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer: expected {expected}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is invalid: expected {expected}")
        return value
    return parse


positive_int = int_in(1)


def engine_options(args) -> dict:
    options = {}
    for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "num_kvcache_blocks",
                 "kvcache_block_size", "kv_cache_dtype", "kv_cache_scale", "tensor_parallel_size", "device", "dtype",
                 "threads"):
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    if getattr(args, "enforce_eager", False):
        options["enforce_eager"] = True
    if getattr(args, "enable_prefix_caching", None) is not None:
        options["enable_prefix_caching"] = args.enable_prefix_caching
    for name in ("kernels", "kernel_plan", "verify_kernels"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    options.update(backend_options(args))
    return options


def backend_options(args) -> dict:
    """The `--backend-option NAME=VALUE` pairs as LLM options; VALUE is read as an int, else a float, else text."""
    options = {}
    for pair in getattr(args, "backend_option", None) or ():
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--backend-option {pair!r}: expected NAME=VALUE, e.g. gpu_memory_utilization=0.8")
        for cast in (int, float, str):
            try:
                options[name] = cast(text)
                break
            except ValueError:
                pass
    return options


def add_backend_option_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend-option", action="append", metavar="NAME=VALUE",
                   help="an option its backend declares (`nanovllm backends` lists them), e.g. "
                        "gpu_memory_utilization=0.8; repeatable (default: none)")


def add_kernel_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernels", help="'reference' for every op's cpu_ref kernel, or op=name,op=name "
                                     "(default: NANOVLLM_KERNELS, else plugins.toml and priorities)")
    p.add_argument("--kernel-plan", metavar="FILE", help="replay a saved kernel plan; fails if it cannot be honoured "
                                                         "(default: none, resolve afresh)")
    p.add_argument("--verify-kernels", type=int, metavar="N",
                   help="recompute one call in N of each op with its reference and demote a kernel that differs "
                        "(default: NANOVLLM_VERIFY_KERNELS, else off)")


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default: OMP_NUM_THREADS, else on the cpu backend the cores other "
                        "work leaves free, else torch's)")


def add_kv_cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
                   help="auto: the model dtype; fp8 (= fp8_e4m3) or fp8_e5m2: half the KV bytes (default: auto)")
    p.add_argument("--kv-cache-scale", choices=["per_head", "per_tensor", "unit"],
                   help="FP8 only: how K/V are scaled into FP8 (default per_head, calibrated at start-up)")


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", help="cuda, mps, cpu, cpu_ref or a plugin's backend (default: the first available "
                                     "in plugins.toml's order)")
    p.add_argument("--device", help="device for the backend, e.g. cpu to run the mps backend's code on CPU tensors "
                                    "(default: the backend's)")
    p.add_argument("--dtype", help="float32, float16, bfloat16 or auto: the checkpoint's (default: the backend's)")
    p.add_argument("--max-model-len", type=int, metavar="N",
                   help="longest prompt + output in tokens (default: 4096, at most the model's)")
    p.add_argument("--max-num-seqs", type=int, metavar="N", help="most requests in one step (default: 256)")
    p.add_argument("--max-num-batched-tokens", type=int, metavar="N", help="most tokens in one step (default: 16384)")
    p.add_argument("--num-kvcache-blocks", type=int, metavar="N", help="KV cache size in blocks (default: the "
                                                                       "backend sizes it)")
    p.add_argument("--kvcache-block-size", type=int, metavar="N", help="tokens per KV block (default: the backend's)")
    p.add_argument("--tensor-parallel-size", type=int, metavar="N", help="ranks to split the model over (default: 1)")
    add_kv_cache_arguments(p)
    add_threads_argument(p)
    p.add_argument("--enforce-eager", action="store_true", help="no device graphs (CUDA graphs)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="share the KV blocks of equal prompt prefixes (default: on; --no-enable-prefix-caching "
                        "computes every prompt in full, e.g. to time cold prefills)")
    add_kernel_arguments(p)
    add_backend_option_argument(p)
