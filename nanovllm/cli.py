"""The `nanovllm` command: one module per subcommand in nanovllm/commands/."""
import argparse
import os
import sys


def version_line() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        ours = version("nanovllm")
    except PackageNotFoundError:  # run from a source tree that is not installed
        ours = "unknown (not installed)"
    import torch
    return f"nanovllm {ours} (torch {torch.__version__}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    from nanovllm.commands import backends, batch, bench, generate, serve, tune
    from nanovllm.commands.arguments import HelpFormatter, add_kernel_arguments, add_kv_cache_arguments
    parser = argparse.ArgumentParser(prog="nanovllm", description="Offline LLM inference with pluggable backends")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True)

    def add_parser(name: str, help: str):
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                              formatter_class=HelpFormatter)
    g = add_parser("generate", help="generate text for prompts")
    generate.add_arguments(g)
    g.set_defaults(fn=generate.main)
    b = add_parser("backends", help="list backends, their availability and the kernels per op")
    backends.add_arguments(b)
    b.set_defaults(fn=backends.main)
    t = add_parser("bench", help="throughput and time to first token on a random workload, with its measured floor")
    bench.add_arguments(t)
    add_kernel_arguments(t)
    add_kv_cache_arguments(t)
    t.set_defaults(fn=bench.main)
    u = add_parser("tune", help="time every usable kernel per op at a model's shapes; write the winners to "
                                "the user's plugins.toml")
    tune.add_arguments(u)
    u.set_defaults(fn=tune.main)
    s = add_parser("serve", help="serve a model over the OpenAI HTTP API (completions, chat, tokenize, metrics)")
    serve.add_arguments(s)
    s.set_defaults(fn=serve.main)
    c = add_parser("batch", help="generate for every row of a JSONL file, on Ray with --replicas N > 1")
    batch.add_arguments(c)
    c.set_defaults(fn=batch.main)
    return parser


def backend_option_hint(unknown: list[str], argv: list[str]) -> str:
    """For a backend's option given as a flag (vLLM's --gpu-memory-utilization 0.8): how to give it here."""
    from nanovllm.core.plugins import load_plugins
    known = {name for backend in load_plugins().backends.values() for name in backend.options}
    for arg in unknown:
        flag, _, value = arg.partition("=")
        name = flag.lstrip("-").replace("-", "_")
        if arg.startswith("--") and name in known:
            after = argv.index(arg) + 1  # its value may have been taken as a positional argument
            value = value or (argv[after] if after < len(argv) else "VALUE")
            return f"; {name} is a backend option: give it as --backend-option {name}={value}"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{backend_option_hint(unknown, argv)}")
    try:
        return args.fn(args)
    except KeyboardInterrupt:  # Ctrl-C: the engine already aborted the call's requests
        print("nanovllm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (`nanovllm generate ... | head -1`)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the exit's flush of stdout does not fail again
        return 1
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"nanovllm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
