"""LLM.beam_search (nanovllm/beam_search.py): against a beam search written here over Hugging Face's logits, greedy
at beam width 1, the ranking rules on scripted log-probabilities, and bad parameters."""
import math
import time
from types import SimpleNamespace

import pytest
import torch

from nanovllm import LLM, BeamSearchParams, SamplingParams
from nanovllm.beam_search import beam_search
from tests.conftest import random_prompts
from tests.e2e.hf_reference import load_hf


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(tiny_qwen3, backend="cpu_ref", dtype="float32", num_kvcache_blocks=256, max_model_len=256)


@torch.no_grad()
def hf_beam_search(model, prompt: list[int], width: int, max_tokens: int, eos: set[int], length_penalty: float):
    """The same search, written plainly: every beam's full log-softmax from HF, its top 2 x width as candidates."""
    def score(tokens, cum):
        return cum / ((len(tokens) - (tokens[-1] in eos)) ** length_penalty)
    live, finished = [(list(prompt), 0.0)], []
    for _ in range(max_tokens):
        candidates = []
        for tokens, cum in live:
            logprobs = torch.log_softmax(model(torch.tensor([tokens])).logits[0, -1].double(), -1)
            top = logprobs.topk(2 * width)
            candidates += [(tokens + [t], cum + lp) for lp, t in zip(top.values.tolist(), top.indices.tolist())]
        candidates.sort(key=lambda b: score(*b), reverse=True)
        finished += [b for b in candidates if b[0][-1] in eos]
        live = [b for b in candidates if b[0][-1] not in eos][:width]
    return sorted(finished + live, key=lambda b: score(*b), reverse=True)[:width]


@pytest.mark.parametrize("width,length_penalty", [(3, 1.0), (2, 0.5)])
def test_beams_match_a_search_over_hf_logits(llm, tiny_qwen3, width, length_penalty):
    prompts = random_prompts(2, 512, (4, 12), seed=11)
    eos = llm.engine.scheduler.eos_token_ids
    results = llm.beam_search(prompts, BeamSearchParams(beam_width=width, max_tokens=5,
                                                        length_penalty=length_penalty, include_stop_str_in_output=True))
    model = load_hf(tiny_qwen3)
    for prompt, result in zip(prompts, results):
        want = hf_beam_search(model, prompt, width, 5, eos, length_penalty)
        assert [b.tokens for b in result.sequences] == [tokens for tokens, _ in want]
        for beam, (_, cum) in zip(result.sequences, want):
            assert beam.cum_logprob == pytest.approx(cum, abs=1e-4)
            assert len(beam.logprobs) == len(beam.tokens) - len(prompt)
            assert beam.finish_reason in ("stop", "length") and beam.text is not None
            assert beam.text == llm.get_tokenizer().decode(beam.tokens)  # the prompt's text included, as vLLM


def test_width_one_without_eos_is_greedy(llm):
    prompts = random_prompts(3, 512, (3, 20), seed=12)
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    beams = llm.beam_search(prompts, BeamSearchParams(beam_width=1, max_tokens=8, ignore_eos=True))
    for prompt, g, b in zip(prompts, greedy, beams):
        (beam,) = b.sequences
        assert beam.tokens == prompt + g["token_ids"] and beam.finish_reason == "length"


def scripted_llm(table: dict[int, dict[int, float]], max_model_len: int = 64):
    """A stand-in LLM whose next-token log-probabilities depend only on the last token (token 0 is EOS)."""
    def generate(prompts, params, use_tqdm, texts):
        assert all(p.max_tokens == 1 and p.logprobs == 4 for p in params)  # 2 x beam width 2
        return [{"outputs": [{"logprobs": [table[p[-1]]]}]} for p in prompts]
    return SimpleNamespace(engine=SimpleNamespace(scheduler=SimpleNamespace(eos_token_ids={0})),
                           config=SimpleNamespace(max_model_len=max_model_len), tokenizer=None, _generate=generate)


def test_eos_finishes_a_beam_and_ranking_uses_the_length_penalty():
    log = math.log
    table = {5: {0: log(0.5), 6: log(0.3), 7: log(0.2)},   # after the prompt: EOS is the likeliest
             6: {8: log(0.9), 0: log(0.1)}, 7: {8: log(0.6), 0: log(0.4)}, 8: {8: log(0.99), 0: log(0.01)}}
    (out,) = beam_search(scripted_llm(table), [[5]], BeamSearchParams(beam_width=2, max_tokens=3))
    # finished at once: [5, 0] scores log(.5) / 1 = -0.69; [5, 6, 8, 8]: log(.3 * .9 * .99) / 4 = -0.33
    assert [b.tokens for b in out.sequences] == [[5, 6, 8, 8], [5, 7, 8, 8]]
    assert [b.finish_reason for b in out.sequences] == ["length", "length"]
    assert out.sequences[0].cum_logprob == pytest.approx(log(0.3 * 0.9 * 0.99))
    # without length normalisation the short finished beam wins, returned without its EOS by default
    (out,) = beam_search(scripted_llm(table), [[5]], BeamSearchParams(beam_width=2, max_tokens=3, length_penalty=0))
    assert out.sequences[0].tokens == [5] and out.sequences[0].finish_reason == "stop"
    (out,) = beam_search(scripted_llm(table), [[5]], BeamSearchParams(beam_width=2, max_tokens=3, length_penalty=0,
                                                                      include_stop_str_in_output=True))
    assert out.sequences[0].tokens == [5, 0]
    # max_model_len stops a beam as "length" before it would not fit another token
    (out,) = beam_search(scripted_llm(table, max_model_len=2), [[5]], BeamSearchParams(beam_width=2, max_tokens=3))
    assert all(len(b.tokens) <= 2 for b in out.sequences)


@pytest.mark.parametrize("kwargs, match", [
    (dict(beam_width=0, max_tokens=4), "beam_width=0 is invalid"),
    (dict(beam_width=2, max_tokens=1.5), "max_tokens=1.5 is invalid"),
    (dict(beam_width=2, max_tokens=4, temperature=-1), "temperature=-1 is invalid"),
    (dict(beam_width=2, max_tokens=4, length_penalty=float("nan")), "length_penalty=nan is invalid"),
    (dict(beam_width=2, max_tokens=4, ignore_eos=1), "ignore_eos=1 is invalid"),
])
def test_bad_beam_search_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BeamSearchParams(**kwargs)


def test_beam_search_refuses_sampling_params_and_bad_prompts(llm):
    with pytest.raises(ValueError, match="takes a BeamSearchParams"):
        llm.beam_search([[1, 2]], SamplingParams())
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        llm.beam_search([[1, 10**6]], BeamSearchParams(beam_width=2, max_tokens=2))


def test_async_beam_search_equals_the_offline_one(llm):
    """AsyncLLM.beam_search (vLLM's EngineClient.beam_search): one final RequestOutput whose outputs are the beams
    of LLM.beam_search, output tokens and text only; a cancelled search leaves no request behind."""
    import asyncio

    from nanovllm import AsyncLLM
    async_llm = AsyncLLM(llm=llm)
    prompt = random_prompts(1, 512, (6, 6), seed=13)[0]
    params = BeamSearchParams(beam_width=3, max_tokens=4)
    (want,) = llm.beam_search([prompt], params)

    async def search():
        return [out async for out in async_llm.beam_search(prompt, "beam-a", params)]
    (got,) = asyncio.run(search())
    assert got.finished and got.prompt_token_ids == prompt and got.request_id == "beam-a"
    assert [o.token_ids for o in got.outputs] == [b.tokens[len(prompt):] for b in want.sequences]
    assert [o.cumulative_logprob for o in got.outputs] == pytest.approx([b.cum_logprob for b in want.sequences])
    assert [o.text for o in got.outputs] == [llm.tokenizer.decode(b.tokens[len(prompt):]) for b in want.sequences]

    async def cancelled():  # 200 steps of 4 beams: seconds; cancelled mid-way
        long = BeamSearchParams(beam_width=4, max_tokens=200)
        task = asyncio.create_task(anext(async_llm.beam_search(prompt, "beam-b", long)))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(cancelled())
    for _ in range(200):  # the aborts return at once; the loop frees the blocks before its next step
        if llm.loop.run(lambda e: not e.has_work() and e.scheduler.block_manager.num_free_blocks == 256):
            break
        time.sleep(0.02)
    else:
        raise AssertionError("the cancelled search left requests or KV blocks behind")
