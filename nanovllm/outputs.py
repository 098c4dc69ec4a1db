"""What LLM returns: one RequestOutput per request from `generate`/`chat`, and StreamOutput pieces from `stream`.

RequestOutput and CompletionOutput are dicts (nano-vllm's shape: `out["text"]`, `out["token_ids"]`) whose keys also
read as attributes, so vLLM's shape works as well: `out.prompt`, `out.outputs[0].text`, `out.request_id`.
"""
import copy
from dataclasses import dataclass

from nanovllm.core.detokenizer import decode
from nanovllm.core.sampling.logprobs import Logprob  # noqa: F401  (vLLM's name: logprob entries are these)
from nanovllm.core.sequence import Sequence


@dataclass
class StreamOutput:
    """What one engine step added to request `index`: the new text, the new token ids (and their logprobs when
    asked). `finished` is True on the request's last piece, which also carries its finish_reason."""
    index: int
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None
    request_id: str | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None  # on a request's first piece, when asked for
    first_token_time: float | None = None  # time.monotonic() at the sample's first token (on pieces from then on)
    sample_index: int = 0  # which of the request's n samples (SamplingParams.n) this piece belongs to
    stop_reason: int | str | None = None  # on the last piece: as CompletionOutput.stop_reason
    num_cached_tokens: int | None = None  # on the last piece: prompt tokens the prefix cache served


def delta_num_cached_tokens(delta) -> int | None:
    """Prompt tokens the prefix cache served, on a sample's finished delta; None on the others."""
    return delta.seq.num_cached_tokens if delta.finished and delta.seq is not None else None


def delta_stop_reason(delta) -> int | str | None:
    """stop_reason of an engine-loop delta: set on a sample's finished delta, None on the others (and on aborts)."""
    return stop_reason(delta.seq) if delta.finished and delta.seq is not None else None


def output_text(seq: Sequence, tokenizer) -> str:
    """The output's text: without a stop string and what follows, and without a stop token's text (both kept with
    SamplingParams.include_stop_str_in_output)."""
    if seq.detokenizer is not None:
        return seq.detokenizer.text
    if tokenizer is None or not seq.params.detokenize:  # skip_tokenizer_init, or token ids only asked for
        return ""
    ids = seq.output_token_ids
    if isinstance(seq.stop_reason, int) and not seq.params.include_stop_str_in_output:
        ids = ids[:-1]
    return decode(tokenizer, ids, seq.params.skip_special_tokens)


class _KeysAsAttributes(dict):
    """A dict whose keys also read and assign as attributes (`out.text = ...` sets out["text"])."""
    __slots__ = ()

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no attribute or key {name!r} (it has: "
                                 f"{', '.join(self)})") from None

    def __setattr__(self, name: str, value) -> None:
        if name in self:
            self[name] = value
            return
        try:
            super().__setattr__(name, value)  # a slot (request_id)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__} has no key {name!r} to assign (it has: {', '.join(self)});"
                                 f" add one with out[{name!r}] = ...") from None

    def __dir__(self):
        return [*super().__dir__(), *self]

    def copy(self):
        """A shallow copy of the same type (dict.copy would return a plain dict)."""
        return copy.copy(self)

    def __reduce__(self):
        """Pickled (any protocol, also 0 and 1, which refuse slotted classes by default) and copied as its type, its
        items and its attributes."""
        attributes = {name: getattr(self, name) for cls in type(self).__mro__ for name in getattr(cls, "__slots__", ())
                      if hasattr(self, name)}
        return _rebuild, (type(self), dict(self), attributes)


def _rebuild(cls, items: dict, attributes: dict):
    out = cls.__new__(cls)
    dict.update(out, items)
    for name, value in attributes.items():
        object.__setattr__(out, name, value)
    return out


class CompletionOutput(_KeysAsAttributes):
    """One sample of a request: index, text, token_ids, finish_reason, stop_reason, logprobs, cumulative_logprob
    (see completion_output); as vLLM's CompletionOutput, also as a dict."""
    __slots__ = ()

    def finished(self) -> bool:
        """Whether the sample has ended (vLLM's method)."""
        return self["finish_reason"] is not None


@dataclass
class RequestMetrics:
    """When a request arrived, had its first output token and finished (vLLM's RequestOutput.metrics fields of
    these names), in time.monotonic() seconds: `first_token_time - arrival_time` is its time to first token.
    `first_token_time` is when the engine committed the earliest first token of its samples (None if none was
    made, e.g. aborted first)."""
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None

    def saw_first_token(self, when: float | None) -> None:
        """Keep the earliest first-token time of the request's samples."""
        if when is not None and (self.first_token_time is None or when < self.first_token_time):
            self.first_token_time = when


class RequestOutput(_KeysAsAttributes):
    """One request's result (see request_output): prompt, prompt_token_ids, prompt_logprobs, outputs (its
    CompletionOutputs), finished, and the first sample's fields as flat keys; as vLLM's RequestOutput, also as a
    dict. `request_id`, `num_cached_tokens` (prompt tokens the prefix cache served) and `metrics` (its
    RequestMetrics, when the call timed it) are attributes only, so two runs of the same request compare equal."""
    __slots__ = ("request_id", "num_cached_tokens", "metrics")

    def __init__(self, *args, request_id: str | None = None, num_cached_tokens: int | None = None,
                 metrics: RequestMetrics | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.request_id, self.num_cached_tokens, self.metrics = request_id, num_cached_tokens, metrics


def stop_reason(seq: Sequence):
    """As vLLM: the stop string or the stop_token_ids entry that ended the sample; None when it ended otherwise
    (EOS, also when listed in stop_token_ids, as vLLM checks it first; max_tokens, max_model_len, a completed
    structured output)."""
    return None if seq.stopped_by_eos else seq.stop_reason


def completion_output(seq: Sequence, tokenizer) -> CompletionOutput:
    """One sample: {index, text, token_ids, finish_reason, stop_reason, logprobs, cumulative_logprob}. logprobs is
    None unless the request asked, else one {token id: logprob} per output token (the top N, then the sampled
    token), and cumulative_logprob is then the sum of the sampled tokens' log-probabilities (None otherwise)."""
    asked = seq.params.logprobs is not None
    cumulative = sum(step[t] for t, step in zip(seq.output_token_ids, seq.logprobs)) if asked else None
    return CompletionOutput(index=seq.sample_index, text=output_text(seq, tokenizer),
                            token_ids=seq.output_token_ids, finish_reason=seq.finish_reason,
                            stop_reason=stop_reason(seq), logprobs=seq.logprobs if asked else None,
                            cumulative_logprob=cumulative)


def request_output(seq: Sequence, tokenizer, request_id: str | None = None, prompt: str | None = None,
                   metrics: RequestMetrics | None = None) -> RequestOutput:
    """One request (`seq` is its first sample): {prompt, prompt_token_ids, prompt_logprobs, outputs, finished}
    (and the attributes request_id, num_cached_tokens) where `outputs` lists its n samples (see
    completion_output), plus the first sample's text, token_ids, finish_reason, stop_reason, logprobs and
    cumulative_logprob as flat keys (the shape before n existed). `prompt` is the prompt's text when it was given
    as text (else None); prompt_logprobs is None unless asked, else one entry per prompt token: None for the
    first, then {token id: logprob} (the top N, then the prompt token)."""
    return build_request_output(
        [completion_output(sample, tokenizer) for sample in seq.group], request_id, seq.num_cached_tokens,
        prompt=prompt, prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens],
        prompt_logprobs=seq.prompt_logprobs if seq.params.prompt_logprobs is not None else None, finished=True,
        metrics=metrics)


def build_request_output(outputs: list[CompletionOutput], request_id: str | None, num_cached_tokens: int | None,
                         metrics: RequestMetrics | None = None, **fields) -> RequestOutput:
    """A RequestOutput of these samples and `fields` (prompt, prompt_token_ids, prompt_logprobs, finished), with
    the first sample's fields as flat keys."""
    flat = {k: v for k, v in outputs[0].items() if k != "index"}
    return RequestOutput(**flat, **fields, outputs=outputs, request_id=request_id,
                         num_cached_tokens=num_cached_tokens, metrics=metrics)
