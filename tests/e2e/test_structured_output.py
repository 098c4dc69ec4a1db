"""Structured output through xgrammar: every sampled output satisfies its constraint, and a constraint that
cannot be compiled is a ValueError before any work."""
import json
import re

import jsonschema
import pytest

from nanovllm import LLM, SamplingParams, StructuredOutputs

# a string pattern rather than maxLength: xgrammar 0.2.9's maxLength rule lets raw control characters into strings
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
          "required": ["name", "age", "ok", "color"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=256, max_model_len=256)


def test_fifty_sampled_outputs_under_a_json_schema_all_validate(llm):
    params = [SamplingParams(1.0, 120, seed=i, structured={"json": SCHEMA}) for i in range(50)]
    outputs = llm.generate(["x"] * 50, params, use_tqdm=False)
    for out in outputs:
        assert out["finish_reason"] == "stop", out["text"]
        jsonschema.validate(json.loads(out["text"]), SCHEMA)
    assert len({o["text"] for o in outputs}) > 10, "sampling under the schema gave few distinct outputs"


def test_regex_choice_and_grammar_in_a_batch_with_a_plain_request(llm):
    regex = r"[a-c]{3}-\d{2}"
    params = [SamplingParams(1.0, 40, seed=i, structured=StructuredOutputs(regex=regex)) for i in range(4)]
    params.append(SamplingParams(1.0, 10, True, seed=9))
    params.append(SamplingParams(1.0, 20, seed=3, guided_decoding={"choice": ["yes", "no", "maybe"]}))
    params.append(SamplingParams(1.0, 40, seed=4, structured={"grammar": 'root ::= "(" [0-9]+ ")" | "none"'}))
    outputs = llm.generate(["x"] * len(params), params, use_tqdm=False)
    for out in outputs[:4]:
        assert re.fullmatch(regex, out["text"]), out["text"]
    assert len(outputs[4]["token_ids"]) == 10, "the plain request was constrained"
    assert outputs[5]["text"] in ("yes", "no", "maybe")
    assert re.fullmatch(r"\(\d+\)|none", outputs[6]["text"]), outputs[6]["text"]


@pytest.mark.parametrize("structured,match", [
    ({"json": {"type": "nonsense"}}, "json cannot be compiled: invalid JSON schema"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"regex": "(["}, "regex cannot be compiled"),
    ({"grammar": "root ::= undefined_rule"}, "grammar cannot be compiled"),
])
def test_a_constraint_that_cannot_compile_is_refused_before_any_work(llm, structured, match):
    prefill_tokens = llm.engine.stats.num_prefill_tokens
    with pytest.raises(ValueError, match=match):
        llm.generate(["x", "y"], [SamplingParams(), SamplingParams(structured=structured)], use_tqdm=False)
    assert not llm.engine.has_unfinished() and llm.engine.stats.num_prefill_tokens == prefill_tokens


def test_compiled_grammars_are_cached_within_a_bound(llm, monkeypatch):
    """A server sees a new schema or regex per client: the cache of compiled grammars (and xgrammar's own) grew
    without bound, holding every constraint ever seen. Now it keeps the most recently used ones."""
    from nanovllm.core.sampling import structured
    monkeypatch.setattr(structured, "MAX_CACHED_GRAMMARS", 8)
    compiler = structured.StructuredCompiler(llm.tokenizer, llm.config.hf_config.vocab_size, {0})
    specs = [StructuredOutputs(regex=f"a{{{i}}}b") for i in range(1, 30)]
    first = compiler.compile(specs[0])
    for spec in specs[1:]:
        compiler.compile(spec)
        assert compiler.compile(specs[0]) is first  # in use: kept
    assert len(compiler._cache) == 8
    assert compiler.compile(specs[-1]) is compiler.compile(specs[-1])
    assert compiler._compiler is not None and compiler.compile(specs[1]) is not None  # evicted: compiled again
