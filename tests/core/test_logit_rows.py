"""Prefill steps pad the rows the LM head reads to a row count it ran at start-up (`model_runner.padded_rows`), and
hand on only the real rows: on the cpu_ref engine with the sizes a graph capture would have set."""
import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.core.model_runner import padded_rows
from tests.conftest import random_prompts

SIZES = [1, 2, 4, 8, 16, 32]


@pytest.mark.parametrize("n, want", [(0, 0), (1, 1), (3, 4), (9, 16), (16, 16), (17, 32), (33, 33)])
def test_rows_are_padded_with_the_last_one_to_the_next_size(n, want):
    rows = torch.arange(5, 5 + n)
    padded = padded_rows(rows, SIZES)
    assert padded.shape == (want,)
    assert padded[:n].tolist() == rows.tolist() and set(padded[n:].tolist()) <= {4 + n}
    assert padded_rows(rows, []) is rows


@pytest.fixture(scope="module")
def engines(tiny_qwen3):
    plain = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=256, max_model_len=512)
    padded = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=256, max_model_len=512)
    padded.engine.runner.logit_row_sizes = SIZES
    seen = []
    head = padded.engine.runner.model.lm_head
    forward = head.forward
    head.forward = lambda hidden: seen.append(hidden.shape[0]) or forward(hidden)
    return plain, padded, seen


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2),
    SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=1),
], ids=["logprobs", "prompt_logprobs"])
def test_padded_rows_change_no_token_or_logprob(engines, params):
    plain, padded, seen = engines
    seen.clear()
    prompts = random_prompts(3, 500, (2, 6), seed=11)  # 3 sampled rows (+ up to 15 prompt rows): padded
    want = plain.generate(prompts, params, use_tqdm=False)
    got = padded.generate(prompts, params, use_tqdm=False)
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in want]
    for key in ("logprobs", "prompt_logprobs"):  # a product over more rows may sum in another order: ~1e-7 apart
        for a, b in zip(got, want):
            assert len(a.get(key) or []) == len(b.get(key) or [])
            for x, y in zip(a.get(key) or [], b.get(key) or []):
                assert (x is None) == (y is None)
                if x is not None:
                    assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-5 for t in x)
    assert seen and all(n in SIZES for n in seen)  # every LM head call (prefill and eager decode) ran padded
    assert 4 in seen  # the three sequences' rows (each decode step, the plain prefill) ran as four
