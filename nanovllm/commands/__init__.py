"""The `nanovllm` subcommands beyond generate and backends: bench (the seed benchmark) and tune."""
