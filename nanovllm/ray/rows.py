"""Rows in, rows out: what one dataset row asks for, and the columns its answer adds.

A row holds one of `prompt` (text), `messages` (a chat: [{"role", "content"}, ...]) or `prompt_token_ids`,
plus optional sampling fields named as in SamplingParams (`temperature`, `max_tokens`, `seed`, ...) either as
columns or in a `sampling_params` dict column. The answer adds `generated_text`, `token_ids`, `finish_reason`,
`num_prompt_tokens`, `num_generated_tokens` and `error` (None, or why this row was refused) to the row's own
columns. Nothing here imports Ray: the in-process `nanovllm batch` runs the same functions.
"""
from dataclasses import fields

from nanovllm.sampling_params import SamplingParams

PROMPT_COLUMNS = ("prompt", "messages", "prompt_token_ids")
SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams) if f.init)
# SamplingParams fields whose results the output columns cannot hold (one text per row, no logprobs)
UNSERVED_FIELDS = {"n": "a row gives one output: repeat the row (with different seeds) for more samples",
                   "logprobs": "the output columns hold no logprobs: use LLM.generate for them",
                   "prompt_logprobs": "the output columns hold no logprobs: use LLM.generate for them"}
OUTPUT_COLUMNS = ("generated_text", "token_ids", "finish_reason", "num_prompt_tokens", "num_generated_tokens",
                  "error")


class RowError(ValueError):
    """A row that cannot be generated; its message goes to the row's `error` column."""


def row_sampling_params(row: dict, defaults: dict) -> SamplingParams:
    """The row's SamplingParams: `defaults`, then the row's `sampling_params` dict, then its own sampling columns.
    A None value (an absent field in a column other rows fill) means "not given"."""
    nested = row.get("sampling_params") or {}
    if not isinstance(nested, dict):
        raise RowError(f"sampling_params must be a dict of SamplingParams fields; got {type(nested).__name__}")
    chosen = {**defaults, **{k: v for k, v in nested.items() if v is not None}}
    chosen.update({k: row[k] for k in SAMPLING_FIELDS if row.get(k) is not None})
    unknown = sorted(set(chosen) - set(SAMPLING_FIELDS))
    if unknown:
        raise RowError(f"unknown sampling field(s) {', '.join(unknown)}; known: {', '.join(SAMPLING_FIELDS)}")
    for name, why in UNSERVED_FIELDS.items():
        if chosen.get(name) not in (None, 1 if name == "n" else None):
            raise RowError(f"{name}={chosen[name]!r} is not supported in a batch row: {why}")
    try:
        return SamplingParams(**chosen)
    except ValueError as e:
        raise RowError(str(e)) from None


def row_prompt(row: dict, llm) -> str | list[int]:
    """The prompt to hand to LLM.generate: the text, the token ids, or the chat rendered by the chat template.
    Emptiness, length and vocabulary are checked by LLM.generate itself."""
    given = [c for c in PROMPT_COLUMNS if row.get(c) is not None]
    if len(given) != 1:
        raise RowError(f"a row needs exactly one of {', '.join(PROMPT_COLUMNS)}; "
                       f"this one has {', '.join(given) if given else 'none'}")
    column = given[0]
    value = row[column]
    if column == "prompt":
        if not isinstance(value, str):
            raise RowError(f"prompt must be text; got {type(value).__name__} (token ids go in prompt_token_ids)")
        return value
    if column == "prompt_token_ids":
        return list(value) if isinstance(value, (list, tuple)) else value
    try:
        return llm.apply_chat_template([list(value)] if isinstance(value, (list, tuple)) else value)[0]
    except ValueError as e:
        raise RowError(str(e)) from None


def generate_rows(llm, rows: list[dict], defaults: dict | None = None) -> list[dict]:
    """Every row with its output columns added, in order. Valid rows are generated together in one
    LLM.generate call (the engine's continuous batching); a row the LLM refuses gets `error` instead."""
    requests: dict[int, tuple] = {}
    errors: dict[int, str] = {}
    for i, row in enumerate(rows):
        try:
            requests[i] = (row_prompt(row, llm), row_sampling_params(row, defaults or {}))
        except RowError as e:
            errors[i] = str(e)
    outputs = _generate_refusing_rows(llm, list(requests.items()), errors)
    return [{**row, **(output_columns(outputs[i]) if i in outputs else error_columns(errors[i]))}
            for i, row in enumerate(rows)]


def _generate_refusing_rows(llm, requests: list[tuple[int, tuple]], errors: dict[int, str]) -> dict[int, dict]:
    """LLM.generate over the requests. It checks a whole call before queuing anything and refuses it if one
    prompt is bad, so a refused call is split in halves until the bad rows stand alone: no row is generated
    twice, and the good rows still run together."""
    if not requests:
        return {}
    prompts = [prompt for _, (prompt, _) in requests]
    params = [p for _, (_, p) in requests]
    try:
        results = llm.generate(prompts, params, use_tqdm=False)
    except ValueError as e:
        if len(requests) == 1:
            errors[requests[0][0]] = str(e).replace("prompts[0]", "the prompt")
            return {}
        half = len(requests) // 2
        return {**_generate_refusing_rows(llm, requests[:half], errors),
                **_generate_refusing_rows(llm, requests[half:], errors)}
    return {i: out for (i, _), out in zip(requests, results)}


def output_columns(out: dict) -> dict:
    return {"generated_text": out["text"], "token_ids": list(out["token_ids"]), "finish_reason": out["finish_reason"],
            "num_prompt_tokens": len(out["prompt_token_ids"]), "num_generated_tokens": len(out["token_ids"]),
            "error": None}


def error_columns(message: str) -> dict:
    return {"generated_text": None, "token_ids": [], "finish_reason": None, "num_prompt_tokens": 0,
            "num_generated_tokens": 0, "error": message}
