"""Every invalid SamplingParams value raises ValueError naming the field and what is allowed."""
import math

import pytest

from nanovllm.sampling_params import SamplingParams

INVALID = [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "hot"),
    ("temperature", True), ("top_p", 0.0), ("top_p", 1.5), ("top_p", -1), ("top_p", math.nan), ("top_p", None),
    ("min_p", -0.01), ("min_p", 1.01), ("min_p", math.nan), ("top_k", -2), ("top_k", 2.5), ("top_k", True),
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 3.0), ("min_tokens", -1), ("min_tokens", 1.5),
    ("seed", 1.5), ("seed", "42"), ("seed", True), ("seed", 2**64), ("logprobs", -1), ("logprobs", 2.0),
    ("logprobs", True), ("ignore_eos", 1), ("ignore_eos", "no"), ("stop", ""), ("stop", [""]), ("stop", 5),
    ("stop", ["ok", 3]), ("stop_token_ids", [-1]), ("stop_token_ids", 7), ("stop_token_ids", [1.0]),
    ("stop_token_ids", [True]),
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
