"""Every invalid SamplingParams value raises ValueError naming the field and what is allowed."""
import math

import pytest

from nanovllm.sampling_params import SamplingParams
from nanovllm.structured_outputs import StructuredOutputs

INVALID = [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "hot"),
    ("temperature", True), ("top_p", 0.0), ("top_p", 1.5), ("top_p", -1), ("top_p", math.nan), ("top_p", "1"),
    ("min_p", -0.01), ("min_p", 1.01), ("min_p", math.nan), ("top_k", -2), ("top_k", 2.5), ("top_k", True),
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 3.0), ("min_tokens", -1), ("min_tokens", 1.5),
    ("seed", 1.5), ("seed", "42"), ("seed", True), ("seed", 2**64), ("logprobs", -1), ("logprobs", 2.0),
    ("logprobs", True), ("ignore_eos", 1), ("ignore_eos", "no"), ("stop", ""), ("stop", [""]), ("stop", 5),
    ("stop", ["ok", 3]), ("stop_token_ids", [-1]), ("stop_token_ids", 7), ("stop_token_ids", [1.0]),
    ("stop_token_ids", [True]), ("n", 0), ("n", 1.0), ("top_k", 10**30), ("prompt_logprobs", -1),
    ("presence_penalty", 2.5), ("presence_penalty", math.nan), ("frequency_penalty", -3),
    ("repetition_penalty", 0), ("repetition_penalty", math.inf), ("repetition_penalty", -1.0),
    ("logit_bias", {5: 101}), ("logit_bias", {-1: 1.0}), ("logit_bias", [1, 2]), ("logit_bias", {"x": 1}),
    ("allowed_token_ids", []), ("allowed_token_ids", [1, -2]), ("bad_words", [""]), ("bad_words", [[]]),
    ("bad_words", [[1, "a"]]),
]


@pytest.mark.parametrize("name,value", INVALID)
def test_invalid_value_names_the_field(name, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name}=.* is invalid: expected"):
        SamplingParams(**{name: value})


def test_min_tokens_above_max_tokens_names_both():
    with pytest.raises(ValueError, match=r"min_tokens=5 is invalid: .*max_tokens=4"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.seed, p.max_tokens, p.min_tokens, p.ignore_eos,
            p.stop, p.stop_token_ids, p.logprobs) == (1.0, 0, 1.0, 0.0, None, 64, 0, False, None, [], None)
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop="###").stop_strings == ("###",)
    assert SamplingParams(stop=["a", "b"], stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy and not SamplingParams().greedy
    assert SamplingParams(seed=-3, logprobs=0, min_tokens=64).seed == -3


def test_first_three_are_positional_the_rest_keyword_only():
    p = SamplingParams(0.6, 256, True)
    assert (p.temperature, p.max_tokens, p.ignore_eos, p.top_k) == (0.6, 256, True, 0)
    with pytest.raises(TypeError):
        SamplingParams(0.6, 256, True, 5)


@pytest.mark.parametrize("name,value", [("temperature", math.nan), ("top_k", 10**30), ("n", 0),
                                        ("repetition_penalty", 0.0), ("logit_bias", {1: 500})])
def test_reassigned_fields_are_checked_again(name, value):
    p = SamplingParams()
    setattr(p, name, value)
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name}=.* is invalid"):
        p.validate()


def test_unset_fields_take_model_defaults_and_set_ones_win():
    defaults = {"temperature": 0.3, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1}
    p = SamplingParams(top_k=5).with_model_defaults(defaults)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.3, 0.9, 5, 1.1)
    explicit = SamplingParams(temperature=1.0, top_p=1.0)
    assert explicit.with_model_defaults(defaults).temperature == 1.0
    reassigned = SamplingParams()
    reassigned.temperature = 0.0
    assert reassigned.with_model_defaults(defaults).temperature == 0.0
    assert SamplingParams().temperature == 1.0, "without model defaults the neutral value applies"


def test_logit_bias_string_keys_and_guided_decoding_alias():
    p = SamplingParams(logit_bias={"7": -1}, guided_decoding={"regex": "[ab]+"})
    assert p.logit_bias == {7: -1.0} and p.structured.regex == "[ab]+" and p.guided_decoding is None


def test_vllm_structured_outputs_names():
    """vLLM >= 0.10.2 writes SamplingParams(structured_outputs=StructuredOutputsParams(...)), older vLLM
    guided_decoding=GuidedDecodingParams(...): both land in `structured`; two of the three names at once are refused,
    and a bad value names the field it came in."""
    from nanovllm.sampling_params import GuidedDecodingParams, StructuredOutputsParams
    p = SamplingParams(structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    assert p.structured == StructuredOutputs(choice=("yes", "no")) and p.structured_outputs is None
    assert SamplingParams(guided_decoding=GuidedDecodingParams(regex="[0-9]+")).structured.regex == "[0-9]+"
    assert SamplingParams(structured_outputs={"json_object": True}).structured.kind == "json_object"
    with pytest.raises(ValueError, match="structured and structured_outputs are the same setting"):
        SamplingParams(structured={"regex": "a"}, structured_outputs={"regex": "b"})
    with pytest.raises(ValueError, match="structured_outputs and guided_decoding are the same setting"):
        SamplingParams(structured_outputs={"regex": "a"}, guided_decoding={"regex": "b"})
    with pytest.raises(ValueError, match="SamplingParams.structured_outputs has unknown key"):
        SamplingParams(structured_outputs={"regexp": "a"})
    reassigned = SamplingParams()
    reassigned.structured_outputs = {"regex": "x+"}
    reassigned.validate()
    assert reassigned.structured.regex == "x+" and reassigned.structured_outputs is None
    with pytest.raises(ValueError, match="exactly one of"):
        SamplingParams(structured={"regex": "a", "choice": ["b"]})
    with pytest.raises(ValueError, match="unknown key"):
        SamplingParams(structured={"regexp": "a"})


def test_sample_seeds_are_seed_plus_index_wrapped():
    assert [SamplingParams(seed=5).sample_seed(i) for i in range(3)] == [5, 6, 7]
    assert SamplingParams(seed=2**64 - 1).sample_seed(1) == 0
    assert SamplingParams().sample_seed(2) is None


@pytest.mark.parametrize("name, value, where", [
    ("stop", ["ok", "a\ud800"], "stop"), ("bad_words", ["\udcff"], "bad_words"),
    ("structured", {"choice": ["yes", "n\ud800"]}, "choice"), ("structured", {"regex": "\ud800+"}, "regex"),
    ("structured", {"grammar": "root ::= \"\ud800\""}, "grammar"), ("structured", {"json": "{\"\ud800\": 1}"}, "json"),
])
def test_text_fields_with_an_unpaired_surrogate_are_refused(name, value, where):
    """A bad JSON escape (\\ud800) in a stop string, bad word or constraint reached the tokenizer or the grammar
    compiler: a bad word failed with a TypeError naming nothing (HTTP 500), a stop string or choice never matched."""
    with pytest.raises(ValueError, match=rf"{where}.*unpaired surrogate"):
        SamplingParams(**{name: value})
