"""SamplingParams: how one request is sampled and when it stops (vLLM's names and meanings)."""
import copy
import enum
import math
from dataclasses import KW_ONLY, dataclass, field

from nanovllm.structured_outputs import StructuredOutputs
from nanovllm.text import check_text

SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts
MAX_TOP_K = 2**31 - 1
# Fields a model's generation_config.json may set when the user did not: their neutral values when neither does.
MODEL_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


STRUCTURED_NAMES = ("structured", "structured_outputs", "guided_decoding")  # ours, then vLLM's two
StructuredOutputsParams = GuidedDecodingParams = StructuredOutputs  # vLLM's names for it (vllm.sampling_params)


class RequestOutputKind(enum.IntEnum):
    """What each output of AsyncLLM.generate holds (vLLM's): every sample's whole output so far (CUMULATIVE), only
    what the step added to the sample that advanced (DELTA), or one output at the end (FINAL_ONLY). LLM.generate and
    LLM.stream do not read it."""
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    """Per-request sampling settings. Every invalid value raises ValueError naming the field and its range, when the
    object is built and again when a request is submitted (fields can be reassigned in between).

    The first three may be given by position, as in nano-vllm: `SamplingParams(0.6, 256)` is temperature 0.6 and
    max_tokens 256; the rest are keyword-only.

    temperature  >= 0, 0 means greedy (default: the model's generation_config.json, else 1.0)
    max_tokens   the most output tokens, >= 1 (default 64)
    ignore_eos   keep generating after EOS (default False)
    n            samples of the prompt, >= 1 (default 1); the prompt is prefilled once and its KV blocks shared
    top_k        keep the k most likely tokens; 0 or -1 means off (default: the model's, else 0)
    top_p        keep the smallest set of most likely tokens whose mass reaches top_p, in (0, 1] (default: the
                 model's, else 1.0)
    min_p        drop tokens less likely than min_p times the most likely one, in [0, 1] (default: the model's,
                 else 0.0)
    seed         per-request seed: the same seed gives the same tokens whatever else is in the batch (default
                 None). Sample i of a request with n > 1 uses seed + i (wrapped into the seed range).
    min_tokens   EOS, stop tokens and stop strings are not honoured (EOS and stop tokens not even sampled) until
                 this many tokens are generated, in [0, max_tokens] (default 0)
    stop         strings that end generation; they are excluded from the text (default None)
    stop_token_ids  token ids that end generation; their text is excluded (default None)
    include_stop_str_in_output  keep the stop string (or the stop token's text) that ended the output in its text
                 (vLLM; default False)
    skip_special_tokens  leave special tokens' text out of the output text (vLLM; default True)
    truncate_prompt_tokens  k >= 1: keep only the prompt's last k tokens (vLLM; default None: the whole prompt)
    detokenize   False: token ids only, the output text stays "" (vLLM; default True; stop strings need it)
    output_kind  a RequestOutputKind (or its value 0, 1, 2): what AsyncLLM.generate yields (vLLM; default
                 CUMULATIVE)
    logprobs     N >= 0: return the sampled token's log-probability and the top N alternatives at each step
                 (default None: none)
    prompt_logprobs  N >= 0: the log-probability of every prompt token (None for the first) and the top N at each
                 position (default None: none)
    presence_penalty   subtracted once from every token already in the output, in [-2, 2] (OpenAI; default 0)
    frequency_penalty  subtracted per occurrence of a token in the output, in [-2, 2] (OpenAI; default 0)
    repetition_penalty  > 0; a token already in the prompt or output has its logit divided by it when positive,
                 multiplied when negative (HF / vLLM; 1 = off; default: the model's, else 1.0)
    logit_bias   {token id: bias in [-100, 100]} added to the logits (default None)
    allowed_token_ids  only these token ids can be sampled (default None: all)
    bad_words    words never completed: a string (tokenized with and without a leading space) or a list of token
                 ids; the last token is banned whenever the output ends with the ones before it (default None)
    structured   a StructuredOutputs, or a dict with one of json / regex / choice / grammar / json_object: the
                 output is constrained to it (default None). vLLM's names are aliases: `structured_outputs`
                 (vLLM >= 0.10.2, with `StructuredOutputsParams`) and `guided_decoding` (`GuidedDecodingParams`).

    Order on the logits: logit_bias, allowed_token_ids and bad_words; then the repetition, frequency and presence
    penalties; then min_tokens suppression and the structured-output mask; then temperature, top-k, top-p (on the
    top-k survivors), min-p.
    """
    temperature: float | None = None
    max_tokens: int = 64
    ignore_eos: bool = False
    _: KW_ONLY
    n: int = 1
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str | list[int]] | None = None
    structured: StructuredOutputs | dict | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    detokenize: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputs | dict | None = None
    guided_decoding: StructuredOutputs | dict | None = None
    stop_strings: tuple[str, ...] = field(init=False, repr=False, default=())
    unset: frozenset[str] = field(init=False, repr=False, default=frozenset())

    def __post_init__(self):
        self.unset = frozenset(name for name in MODEL_DEFAULTS if getattr(self, name) is None)
        for name in self.unset:
            setattr(self, name, MODEL_DEFAULTS[name])
        self.validate()

    def validate(self) -> None:
        """Check every field (ValueError naming the first bad one) and normalise the derived ones; idempotent."""
        self._check_numbers()
        self._check_integers()
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "detokenize"):
            if not isinstance(getattr(self, name), bool):
                _invalid(name, getattr(self, name), "expected True or False")
        if (isinstance(self.output_kind, bool) or not isinstance(self.output_kind, int)
                or self.output_kind not in set(RequestOutputKind)):
            _invalid("output_kind", self.output_kind, "expected a RequestOutputKind: CUMULATIVE (0), DELTA (1) or "
                                                      "FINAL_ONLY (2)")
        self.output_kind = RequestOutputKind(self.output_kind)
        self.stop_strings = _stop_strings(self.stop)
        if self.stop_strings and not self.detokenize:
            raise ValueError("SamplingParams.stop needs detokenize=True: stop strings are matched in the output text; "
                             "use stop_token_ids, or drop detokenize=False")
        self.stop_token_ids = _token_ids("stop_token_ids", self.stop_token_ids, allow_empty=True)
        if self.top_k == -1:
            self.top_k = 0
        self.logit_bias = _logit_bias(self.logit_bias)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _token_ids("allowed_token_ids", self.allowed_token_ids, allow_empty=False)
        self.bad_words = _bad_words(self.bad_words)
        given = [name for name in STRUCTURED_NAMES if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"SamplingParams.{' and '.join(given)} are the same setting (structured_outputs and "
                             f"guided_decoding are vLLM's names for structured): give one")
        name = given[0] if given else "structured"
        value = getattr(self, name)
        self.structured_outputs = self.guided_decoding = None
        self.structured = StructuredOutputs.coerce(value, name)

    def _check_numbers(self) -> None:
        ranges = {"temperature": "a finite number >= 0 (0 means greedy)", "top_p": "a number in (0, 1] (1 means off)",
                  "min_p": "a number in [0, 1] (0 means off)", "presence_penalty": "a number in [-2, 2]",
                  "frequency_penalty": "a number in [-2, 2]",
                  "repetition_penalty": "a finite number > 0 (1 means off)"}
        for name, allowed in ranges.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                _invalid(name, value, f"expected {allowed}")
        checks = {"temperature": 0 <= self.temperature < math.inf, "top_p": 0 < self.top_p <= 1,
                  "min_p": 0 <= self.min_p <= 1, "presence_penalty": -2 <= self.presence_penalty <= 2,
                  "frequency_penalty": -2 <= self.frequency_penalty <= 2,
                  "repetition_penalty": 0 < self.repetition_penalty < math.inf}
        for name, ok in checks.items():
            if not ok:
                _invalid(name, getattr(self, name), f"expected {ranges[name]}")

    def _check_integers(self) -> None:
        for name in ("n", "top_k", "max_tokens", "min_tokens"):
            if not _is_int(getattr(self, name)):
                _invalid(name, getattr(self, name), "expected an integer")
        if self.n < 1:
            _invalid("n", self.n, "expected an integer >= 1")
        if not -1 <= self.top_k <= MAX_TOP_K:
            _invalid("top_k", self.top_k, "expected a positive integer (at most the vocabulary size), or 0 or -1 "
                                          "for off")
        if self.max_tokens < 1:
            _invalid("max_tokens", self.max_tokens, "expected an integer >= 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            _invalid("min_tokens", self.min_tokens, f"expected an integer in [0, max_tokens={self.max_tokens}]")
        if self.seed is not None and not (_is_int(self.seed) and SEED_RANGE[0] <= self.seed < SEED_RANGE[1]):
            _invalid("seed", self.seed, "expected None or an integer in [-2**63, 2**64)")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and value >= 0):
                _invalid(name, value, "expected None or an integer >= 0")
        if self.truncate_prompt_tokens is not None and not (_is_int(self.truncate_prompt_tokens)
                                                            and self.truncate_prompt_tokens >= 1):
            _invalid("truncate_prompt_tokens", self.truncate_prompt_tokens,
                     "expected None or an integer >= 1 (the prompt tokens to keep, from its end)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def needs_logits_processing(self) -> bool:
        """Whether the logits of this request need the penalties / bias / allowed / bad-words pass."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
                    or self.logit_bias or self.allowed_token_ids is not None or self.bad_words)

    def with_model_defaults(self, defaults: dict) -> "SamplingParams":
        """A copy whose fields left unset (None at construction, and not reassigned since) take `defaults`
        (a model's generation_config.json values); self is returned unchanged when nothing applies."""
        applied = {name: value for name, value in defaults.items()
                   if name in self.unset and getattr(self, name) == MODEL_DEFAULTS[name]}
        if not applied:
            return self
        params = copy.copy(self)
        for name, value in applied.items():
            setattr(params, name, value)
        params.validate()
        return params

    def clone(self) -> "SamplingParams":
        """A validated copy sharing no list or dict with self: what a submitted request keeps, so that reassigning
        or mutating the caller's object afterwards (for its next call, or from another thread) changes nothing
        that runs. ValueError as `validate`."""
        params = copy.copy(self)
        params.validate()  # rebuilds stop_strings, the token-id lists, logit_bias and bad_words
        return params

    def sample_seed(self, index: int) -> int | None:
        """The seed of sample `index` of an n > 1 request: seed + index, wrapped into [-2**63, 2**64)."""
        if self.seed is None:
            return None
        seed = self.seed + index
        return seed - 2**64 if seed >= SEED_RANGE[1] else seed


def _invalid(name: str, value, allowed: str):
    raise ValueError(f"SamplingParams.{name}={value!r} is invalid: {allowed}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _stop_strings(stop) -> tuple[str, ...]:
    if stop is None or isinstance(stop, str):
        stop = [] if stop is None else [stop]
    if not isinstance(stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in stop):
        _invalid("stop", stop, "expected None, a non-empty string or a list of non-empty strings")
    for i, s in enumerate(stop):
        check_text(f"SamplingParams.stop[{i}]", s)
    return tuple(stop)


def _token_ids(name: str, ids, allow_empty: bool) -> list[int]:
    ids = [] if ids is None else ids
    if not isinstance(ids, (list, tuple)) or any(not _is_int(t) or t < 0 for t in ids) or not (ids or allow_empty):
        _invalid(name, ids, f"expected None or a{'' if allow_empty else ' non-empty'} list of integers >= 0")
    return list(ids)


def _logit_bias(bias) -> dict[int, float] | None:
    if bias is None:
        return None
    if not isinstance(bias, dict):
        _invalid("logit_bias", bias, "expected None or a dict {token id: bias in [-100, 100]}")
    out = {}
    for token, value in bias.items():
        if isinstance(token, str) and token.isdigit():  # JSON object keys (the OpenAI wire format) are strings
            token = int(token)
        if not _is_int(token) or token < 0:
            _invalid("logit_bias", bias, f"expected token-id keys (integers >= 0); got key {token!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            _invalid("logit_bias", bias, f"expected biases in [-100, 100]; token {token} has {value!r}")
        out[token] = float(value)
    return out or None


def _bad_words(words) -> list[str | list[int]] | None:
    if words is None:
        return None
    if isinstance(words, str):
        words = [words]
    ok = isinstance(words, (list, tuple)) and all(
        (isinstance(w, str) and w) or (isinstance(w, (list, tuple)) and w and all(_is_int(t) and t >= 0 for t in w))
        for w in words)
    if not ok:
        _invalid("bad_words", words, "expected None or a list of non-empty strings or non-empty token-id lists")
    for i, w in enumerate(words):
        if isinstance(w, str):
            check_text(f"SamplingParams.bad_words[{i}]", w)
    return [w if isinstance(w, str) else list(w) for w in words] or None


@dataclass
class BeamSearchParams:
    """LLM.beam_search's settings (vLLM's): keep the beam_width best beams each step for up to max_tokens steps.

    beam_width   beams kept, >= 1
    max_tokens   the most output tokens, >= 1
    ignore_eos   keep extending beams past EOS (default False: a beam that samples EOS is finished)
    temperature  >= 0 (default 0): the candidates are each step's top 2 x beam_width tokens, plus the sampled one
                 when it is not among them
    length_penalty  a beam's score is cum_logprob / len(tokens) ** length_penalty (prompt included; default 1.0)
    include_stop_str_in_output  keep the EOS token at the end of a finished beam's tokens (default False)
    """
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"BeamSearchParams.{name}={value!r} is invalid: expected an integer >= 1")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BeamSearchParams.{name}={getattr(self, name)!r} is invalid: expected True or False")
        for name, low in (("temperature", 0.0), ("length_penalty", -math.inf)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < low:
                raise ValueError(f"BeamSearchParams.{name}={value!r} is invalid: expected a finite number"
                                 f"{' >= 0' if low == 0 else ''}")
