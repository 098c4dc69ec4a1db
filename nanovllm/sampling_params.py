"""SamplingParams: how one request is sampled and when it stops (vLLM's names and meanings)."""
import math
from dataclasses import dataclass, field

SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts


@dataclass
class SamplingParams:
    """Per-request sampling settings. Every invalid value raises ValueError naming the field and its range.

    temperature  >= 0, 0 means greedy (default 1.0)
    top_k        keep the k most likely tokens; 0 or -1 means off (default 0)
    top_p        keep the smallest set of most likely tokens whose mass reaches top_p, in (0, 1] (default 1.0)
    min_p        drop tokens less likely than min_p times the most likely one, in [0, 1] (default 0.0)
    seed         per-request seed: the same seed gives the same tokens whatever else is in the batch (default None)
    max_tokens   the most output tokens, >= 1 (default 64)
    min_tokens   EOS, stop tokens and stop strings are not honoured (EOS and stop tokens not even sampled) until
                 this many tokens are generated, in [0, max_tokens] (default 0)
    ignore_eos   keep generating after EOS (default False)
    stop         strings that end generation; they are excluded from the text (default None)
    stop_token_ids  token ids that end generation; their text is excluded (default None)
    logprobs     N >= 0: return the sampled token's log-probability and the top N alternatives at each step
                 (default None: none)

    The filters apply in this order: temperature, top-k, top-p (on the top-k survivors), min-p.
    """
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 64
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    logprobs: int | None = None
    stop_strings: tuple[str, ...] = field(init=False, repr=False, default=())

    def __post_init__(self):
        self._check_numbers()
        self._check_integers()
        if not isinstance(self.ignore_eos, bool):
            _invalid("ignore_eos", self.ignore_eos, "expected True or False")
        self.stop_strings = _stop_strings(self.stop)
        self.stop_token_ids = _stop_token_ids(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0

    def _check_numbers(self) -> None:
        ranges = {"temperature": "a finite number >= 0 (0 means greedy)", "top_p": "a number in (0, 1]",
                  "min_p": "a number in [0, 1]"}
        for name, allowed in ranges.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                _invalid(name, value, f"expected {allowed}")
        if not 0 <= self.temperature < math.inf:
            _invalid("temperature", self.temperature, f"expected {ranges['temperature']}")
        if not 0 < self.top_p <= 1:
            _invalid("top_p", self.top_p, f"expected {ranges['top_p']} (1 means off)")
        if not 0 <= self.min_p <= 1:
            _invalid("min_p", self.min_p, f"expected {ranges['min_p']} (0 means off)")

    def _check_integers(self) -> None:
        for name in ("top_k", "max_tokens", "min_tokens"):
            if not _is_int(getattr(self, name)):
                _invalid(name, getattr(self, name), "expected an integer")
        if self.top_k < -1:
            _invalid("top_k", self.top_k, "expected a positive integer, or 0 or -1 for off")
        if self.max_tokens < 1:
            _invalid("max_tokens", self.max_tokens, "expected an integer >= 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            _invalid("min_tokens", self.min_tokens, f"expected an integer in [0, max_tokens={self.max_tokens}]")
        if self.seed is not None and not (_is_int(self.seed) and SEED_RANGE[0] <= self.seed < SEED_RANGE[1]):
            _invalid("seed", self.seed, "expected None or an integer in [-2**63, 2**64)")
        if self.logprobs is not None and not (_is_int(self.logprobs) and self.logprobs >= 0):
            _invalid("logprobs", self.logprobs, "expected None or an integer >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _invalid(name: str, value, allowed: str):
    raise ValueError(f"SamplingParams.{name}={value!r} is invalid: {allowed}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _stop_strings(stop) -> tuple[str, ...]:
    if stop is None or isinstance(stop, str):
        stop = [] if stop is None else [stop]
    if not isinstance(stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in stop):
        _invalid("stop", stop, "expected None, a non-empty string or a list of non-empty strings")
    return tuple(stop)


def _stop_token_ids(ids) -> list[int]:
    ids = [] if ids is None else ids
    if not isinstance(ids, (list, tuple)) or any(not _is_int(t) or t < 0 for t in ids):
        _invalid("stop_token_ids", ids, "expected None or a list of integers >= 0")
    return list(ids)
