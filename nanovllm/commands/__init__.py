"""The `nanovllm` subcommands, one module each: generate, backends, bench, tune, batch (JSONL in, JSONL out)."""
