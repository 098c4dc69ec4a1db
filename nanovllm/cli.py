"""The `nanovllm` command: one module per subcommand in nanovllm/commands/."""
import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from nanovllm.commands import backends, batch, bench, generate, serve, tune
    from nanovllm.commands.arguments import add_kernel_arguments, add_kv_cache_arguments
    parser = argparse.ArgumentParser(prog="nanovllm", description="Offline LLM inference with pluggable backends")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for prompts")
    generate.add_arguments(g)
    g.set_defaults(fn=generate.main)
    b = sub.add_parser("backends", help="list backends, their availability and the kernels per op")
    backends.add_arguments(b)
    b.set_defaults(fn=backends.main)
    t = sub.add_parser("bench", help="the seed throughput benchmark with its measured floor")
    bench.add_arguments(t)
    add_kernel_arguments(t)
    add_kv_cache_arguments(t)
    t.set_defaults(fn=bench.main)
    u = sub.add_parser("tune", help="time every usable kernel per op at a model's shapes; write the winners to "
                                    "the user's plugins.toml")
    tune.add_arguments(u)
    u.set_defaults(fn=tune.main)
    s = sub.add_parser("serve", help="serve a model over the OpenAI HTTP API (completions, chat, tokenize, metrics)")
    serve.add_arguments(s)
    s.set_defaults(fn=serve.main)
    c = sub.add_parser("batch", help="generate for every row of a JSONL file, on Ray with --replicas N > 1")
    batch.add_arguments(c)
    c.set_defaults(fn=batch.main)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"nanovllm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
