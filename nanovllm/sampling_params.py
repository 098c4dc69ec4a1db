"""SamplingParams: how one request is sampled and when it stops (vLLM's names and meanings)."""
import math
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """Per-request sampling settings. Every invalid value raises ValueError naming the field.

    temperature: 0 means greedy; top_k: 0 or -1 means off; top_p in (0, 1]; min_p in [0, 1];
    seed: a per-request seed (same seed, same tokens, whatever else is in the batch);
    stop: strings that end generation (excluded from the text); logprobs: N alternatives per step.
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
        def bad(name, value, allowed):
            raise ValueError(f"SamplingParams.{name}={value!r} is invalid: {allowed}")

        for name in ("temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                bad(name, value, "expected a number")
            if math.isnan(value):
                bad(name, value, "NaN is not allowed")
        if self.temperature < 0 or math.isinf(self.temperature):
            bad("temperature", self.temperature, "must be >= 0 and finite (0 means greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            bad("min_p", self.min_p, "must be in [0, 1]")
        for name in ("top_k", "max_tokens", "min_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                bad(name, value, "expected an integer")
        if self.top_k < -1:
            bad("top_k", self.top_k, "must be -1 or 0 (off) or a positive integer")
        if self.max_tokens < 1:
            bad("max_tokens", self.max_tokens, "must be >= 1")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            bad("min_tokens", self.min_tokens, f"must be in [0, max_tokens={self.max_tokens}]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", self.seed, "expected an integer or None")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int) or self.logprobs < 0):
            bad("logprobs", self.logprobs, "expected None or an integer >= 0")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            bad("stop", self.stop, "expected non-empty strings")
        self.stop_strings = tuple(stop)
        ids = list(self.stop_token_ids or [])
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
            bad("stop_token_ids", self.stop_token_ids, "expected non-negative integers")
        self.stop_token_ids = ids
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1
