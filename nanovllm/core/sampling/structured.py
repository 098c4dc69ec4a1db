"""Structured output through xgrammar: compile a request's constraint once, then mask each step's logits.

A constraint is compiled when the request is submitted (a schema, regex or grammar that cannot be compiled is
a ValueError before any work) and cached by its text. Each sample of the request gets its own grammar matcher;
before a step samples, the matcher's token bitmask sets every token the constraint forbids to -inf, and when the
step's token reaches the host the matcher accepts it. That host round trip is why a batch holding a structured
request is not pipelined (the scheduler commits a step before launching the next).

JSON is compact (no free whitespace), so a sampled output cannot wander in whitespace. Install with
`pip install 'nanovllm[structured]'`.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict

import torch

from nanovllm.core.logging import get_logger
from nanovllm.structured_outputs import StructuredOutputs

logger = get_logger(__name__)
# Compiled grammars kept, least recently used dropped first: a server meets a new schema or regex per client, and
# each compiled grammar holds token masks over the whole vocabulary (megabytes for a large one).
MAX_CACHED_GRAMMARS = 128


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:
        raise ValueError("structured output needs xgrammar: pip install 'nanovllm[structured]'") from e
    return xgrammar


class StructuredCompiler:
    """Compiles StructuredOutputs for one tokenizer and vocabulary (the model's logits width)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int]):
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, sorted(stop_token_ids)
        self._compiler = None
        self._cache: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._lock = threading.Lock()  # callers' threads submit (and so compile) at once

    def compile(self, spec: StructuredOutputs):
        """The compiled grammar of `spec`; ValueError naming the constraint when it cannot be compiled."""
        key = spec.key()
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
            xgr = _xgrammar()
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids or None)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)  # ours is bounded
        try:
            compiled = self._compile(spec)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"SamplingParams.structured {spec.kind} cannot be compiled: {_reason(e)} "
                             f"(fix the {spec.kind}, or drop the constraint)") from None
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: StructuredOutputs):
        c = self._compiler
        if spec.kind == "json":
            schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
            _check_schema(schema)
            return c.compile_json_schema(schema, any_whitespace=False)
        if spec.kind == "json_object":
            return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if spec.kind == "regex":
            return c.compile_regex(spec.regex)
        if spec.kind == "choice":
            alternatives = " | ".join(json.dumps(choice) for choice in spec.choice)
            return c.compile_grammar(f"root ::= {alternatives}")
        return c.compile_grammar(spec.grammar)

    def new_state(self, spec: StructuredOutputs) -> "StructuredState":
        return StructuredState(_xgrammar().GrammarMatcher(self.compile(spec)))


def _reason(error: Exception) -> str:
    """The first line of xgrammar's message, without its "[time] file.cc:line: " prefix."""
    lines = str(error).strip().splitlines()
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", lines[0]) if lines else type(error).__name__


def _check_schema(schema: str) -> None:
    """Refuse text that is not a JSON object, and schemas that jsonschema (when installed) rejects."""
    try:
        value = json.loads(schema)
    except json.JSONDecodeError as e:
        raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"a JSON schema is an object; got {type(value).__name__}")
    try:
        import jsonschema
    except ImportError:
        return
    try:
        jsonschema.validators.validator_for(value).check_schema(value)
    except jsonschema.SchemaError as e:
        raise ValueError(f"invalid JSON schema: {e.message}") from None


class StructuredState:
    """One sample's grammar matcher."""

    def __init__(self, matcher):
        self.matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; False when the constraint forbids it (which the mask should prevent)."""
        return bool(self.matcher.accept_token(token_id))

    @property
    def is_terminated(self) -> bool:
        return bool(self.matcher.is_terminated())


def apply_structured_masks(logits: torch.Tensor, seqs) -> None:
    """Set to -inf, in place, what each structured request's grammar forbids next (rows of other requests are
    left alone); a step without structured requests does nothing."""
    rows = [i for i, s in enumerate(seqs) if s.structured is not None and not s.structured.is_terminated]
    if not rows:
        return
    xgr = _xgrammar()
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[-1])
    for row in rows:
        seqs[row].structured.matcher.fill_next_token_bitmask(bitmask, row)
    backend = "auto" if logits.device.type in ("cpu", "cuda") else "torch_native"
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows,
                                    backend=backend)


def structured_stop(seq, token_id: int) -> bool:
    """Advance seq's grammar past its new token; True when the constrained output is complete (and when the token
    was refused, which the mask prevents: the output then ends rather than break the constraint)."""
    if not seq.structured.accept(token_id):
        logger.error("structured output: token %d was not allowed by the grammar of sequence %d; ending it",
                     token_id, seq.seq_id)
        return True
    return seq.structured.is_terminated
