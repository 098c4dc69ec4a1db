"""`nanovllm batch INPUT.jsonl OUTPUT.jsonl`: generate for every row of a JSONL file, in order.

Each input line is a JSON object with `prompt`, `messages` or `prompt_token_ids` and optional sampling fields
(nanovllm/ray/rows.py); each output line is that object plus `generated_text`, `token_ids`, `finish_reason`,
`num_prompt_tokens`, `num_generated_tokens` and `error`. With `--replicas` > 1 or `--address`, the rows go to
a pool of engine replicas on Ray Data (a local Ray, or the cluster at --address); otherwise one LLM in this
process generates them, `--batch-size` rows at a time.
"""
import argparse
import json
import sys
import time
from collections.abc import Iterator

from tqdm import tqdm

from nanovllm.commands.arguments import add_engine_arguments, engine_options, positive_int
from nanovllm.core.logging import get_logger
from nanovllm.ray.rows import OUTPUT_COLUMNS

logger = get_logger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="JSONL file: one JSON object per line (prompt | messages | prompt_token_ids, "
                                 "plus optional sampling fields such as max_tokens, temperature, seed)")
    p.add_argument("output", help="JSONL file to write: each input object with the output fields added, in order")
    p.add_argument("--model", help="a Hugging Face checkpoint folder, readable on every node (default: the "
                                   "embedded SmolLM2-135M-Instruct)")
    p.add_argument("--replicas", type=positive_int, default=1, help="engine replicas on Ray (default 1: no Ray unless "
                                                           "--address is given)")
    p.add_argument("--address", help="a Ray cluster's address (e.g. ray://head:10001 or auto); runs on Ray "
                                     "(default: none: a local Ray with --replicas > 1, else no Ray)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="rows per LLM.generate call (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="the temperature of rows without one "
                                                                  "(default: 0, greedy)")
    p.add_argument("--max-tokens", type=int, default=64, help="the max_tokens of rows without one (default: 64)")
    add_engine_arguments(p)


def main(args) -> int:
    rows = read_jsonl(args.input)
    defaults = {"temperature": args.temperature, "max_tokens": args.max_tokens}
    options = engine_options(args)
    on_ray = args.replicas > 1 or args.address is not None
    results = (on_ray_rows if on_ray else in_process_rows)(rows, args, options, defaults)
    num_errors = write_jsonl(args.output, rows, results)
    print(f"{len(rows)} rows written to {args.output}" + (f", {num_errors} with an error" if num_errors else ""),
          file=sys.stderr)
    return 0


def read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {number} is not JSON ({e}); give one JSON object per line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {number} is a {type(row).__name__}, not a JSON object")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no rows; give one JSON object per line")
    return rows


def in_process_rows(rows: list[dict], args, options: dict, defaults: dict) -> Iterator[dict]:
    from nanovllm import LLM
    from nanovllm.ray.rows import generate_rows
    with LLM(args.model, backend=args.backend, **options) as llm:
        for start in range(0, len(rows), args.batch_size):
            yield from generate_rows(llm, rows[start:start + args.batch_size], defaults)


def on_ray_rows(rows: list[dict], args, options: dict, defaults: dict) -> Iterator[dict]:
    """The rows through a processor of --replicas replicas, in input order. Every row is given every column
    (None where it had none) so Ray can build typed blocks; write_jsonl drops what the input row lacked."""
    from nanovllm.ray import ProcessorConfig, build_processor
    from nanovllm.ray.deps import require_ray
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        # "local": a Ray of our own, never a cluster some other process happens to run on this machine
        ray.init(address=args.address or "local", include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    columns = list(dict.fromkeys(k for row in rows for k in row))
    processor = build_processor(ProcessorConfig(model=args.model, backend=args.backend, engine_options=options,
                                                sampling_params=defaults, concurrency=args.replicas,
                                                batch_size=args.batch_size))
    try:
        dataset = processor(ray.data.from_items([{c: row.get(c) for c in columns} for row in rows]))
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            yield from batch.to_pylist()
    finally:
        processor.release()
        if started:
            ray.shutdown()


def write_jsonl(path: str, rows: list[dict], results: Iterator[dict]) -> int:
    """Write each input row with its output fields, showing rows done and generated tokens/s; the number of rows
    with an error."""
    num_tokens = num_errors = 0
    start = time.perf_counter()
    num_written = 0
    with open(path, "w", encoding="utf-8") as f, tqdm(total=len(rows), unit="row", desc="batch",
                                                      file=sys.stderr, dynamic_ncols=True) as bar:
        for row, result in zip(rows, results):
            num_written += 1
            out = {**row, **{c: result[c] for c in OUTPUT_COLUMNS}}
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
            num_tokens += result["num_generated_tokens"]
            num_errors += result["error"] is not None
            bar.set_postfix_str(f"{num_tokens / max(time.perf_counter() - start, 1e-9):.1f} tokens/s", refresh=False)
            bar.update(1)
    if num_written != len(rows):
        raise RuntimeError(f"only {num_written} of {len(rows)} rows came back; {path} is incomplete")
    return num_errors
