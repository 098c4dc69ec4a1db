"""StructuredOutputs: the constraint a structured request's output must satisfy (vLLM's guided-decoding shape).

Only the description lives here (no xgrammar import): `nanovllm/core/sampling/structured.py` compiles it when the request
is submitted, and a constraint that cannot be compiled is refused then, before any work.
"""
import json
from dataclasses import dataclass

from nanovllm.text import check_text

KINDS = ("json", "regex", "choice", "grammar", "json_object")
IGNORED_VLLM_KEYS = {"backend", "whitespace_pattern", "disable_fallback", "disable_any_whitespace",
                     "disable_additional_properties"}  # vLLM options about its own backends: nothing to do here


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one of:

    json         a JSON schema (dict, or its JSON text): the output is a JSON value valid under it
    regex        a regular expression the whole output matches
    choice       a list of strings: the output is one of them
    grammar      an EBNF grammar (GBNF / xgrammar syntax, with a `root` rule)
    json_object  True: any JSON object
    """
    json: dict | str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self):
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"SamplingParams.structured must set exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(given) or 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError(f"structured json must be a JSON schema as a dict or a JSON string; got "
                             f"{type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured {name} must be a non-empty string; got {value!r}")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice or any(
                    not isinstance(c, str) for c in self.choice):
                raise ValueError(f"structured choice must be a non-empty list of strings; got {self.choice!r}")
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.json_object not in (None, True, False):
            raise ValueError(f"structured json_object must be True; got {self.json_object!r}")
        texts = {"json": [self.json] if isinstance(self.json, str) else [], "regex": [self.regex or ""],
                 "grammar": [self.grammar or ""], "choice": list(self.choice or ())}
        for kind, values in texts.items():
            for value in values:
                check_text(f"structured {kind}", value)

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str]:
        """A hashable description: (kind, canonical text), the compiled-grammar cache key."""
        value = getattr(self, self.kind)
        if self.kind == "json" and isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        elif self.kind == "choice":
            value = json.dumps(list(value))
        return self.kind, str(value)

    @classmethod
    def coerce(cls, value, field_name: str = "structured") -> "StructuredOutputs | None":
        """None, a StructuredOutputs, or a dict of its fields (vLLM's guided_decoding / structured_outputs
        shape, extra vLLM-only keys such as `backend` ignored) -> StructuredOutputs or None."""
        if value is None or isinstance(value, cls):
            return value
        if hasattr(value, "__dataclass_fields__") or hasattr(value, "__dict__") and not isinstance(value, dict):
            value = {k: getattr(value, k, None) for k in KINDS}
        if not isinstance(value, dict):
            raise ValueError(f"SamplingParams.{field_name} must be a StructuredOutputs or a dict with one of "
                             f"{', '.join(KINDS)}; got {type(value).__name__}")
        unknown = sorted(set(value) - set(KINDS) - IGNORED_VLLM_KEYS)
        if unknown:
            raise ValueError(f"SamplingParams.{field_name} has unknown key(s) {', '.join(unknown)}; known: "
                             f"{', '.join(KINDS)}")
        return cls(**{k: value.get(k) for k in KINDS})
