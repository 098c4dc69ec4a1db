"""The progress bar counts output tokens: its total shrinks as requests stop early, and ends equal to its
count, which is the number of output tokens produced."""
import pytest

from nanovllm import LLM, SamplingParams
from nanovllm import llm as llm_module
from nanovllm.core.progress import GenerationProgress
from tests.conftest import random_prompts


def test_advance_counts_output_tokens_and_shrinks_the_total():
    progress = GenerationProgress(planned_output_tokens=30, num_requests=3, num_prompt_tokens=12, use_tqdm=False)
    progress.advance(prompt_tokens=12)
    progress.advance(output_tokens=3)
    progress.advance(output_tokens=3, finished_unused=[8])  # one request stopped after 2 of its 10 tokens
    progress.advance(output_tokens=4, finished_unused=[0, 6])
    progress.close()
    assert (progress.count, progress.total, progress.num_finished) == (10, 16, 3)


@pytest.mark.parametrize("async_scheduling, use_tqdm", [(True, True), (False, True), (True, False)])
def test_bar_total_and_final_count_are_the_output_tokens(tiny_qwen3, monkeypatch, async_scheduling, use_tqdm):
    bars = []

    class Recorded(GenerationProgress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(llm_module, "GenerationProgress", Recorded)
    llm = LLM(tiny_qwen3, backend="cpu", num_kvcache_blocks=64, max_model_len=128, async_scheduling=async_scheduling)
    prompts = random_prompts(5, 512, (3, 40), seed=3)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    first = llm.generate(prompts[:1], greedy, use_tqdm=False)[0]["token_ids"]
    # a request that stops at its 4th token, one clamped by max_model_len, and three running to max_tokens
    stopping = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[first[3]], ignore_eos=True)
    long_prompt = random_prompts(1, 512, (120, 120), seed=4)[0]
    params = [stopping, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), greedy, greedy, greedy]
    outputs = llm.generate([prompts[0], long_prompt, *prompts[2:]], params, use_tqdm=use_tqdm)
    produced = sum(len(o["token_ids"]) for o in outputs)
    assert len(outputs[0]["token_ids"]) < 12 and len(outputs[1]["token_ids"]) == 128 - 120
    bar = bars[-1]
    assert bar.count == bar.total == produced
    assert bar.num_finished == 5 and bar.num_prefilled == bar.num_prompt_tokens
