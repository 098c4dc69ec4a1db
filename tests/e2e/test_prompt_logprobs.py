"""Prompt logprobs (core/sampling/prompt_logprobs.py, what /v1/completions echo+logprobs returns): each prompt token's
log-probability and the top N equal log_softmax of Hugging Face's logits, on one rank and under TP=2; a prompt
already in the prefix cache is scored the same."""
import asyncio

import pytest
import torch

from nanovllm import AsyncLLM, LLM, SamplingParams
from tests.conftest import random_prompts
from tests.e2e.hf_reference import load_hf
from tests.e2e.test_tensor_parallel import OPTIONS, no_leaks  # noqa: F401 (a fixture)

TOP = 3


def prompt_logprobs(llm, prompt: list[int]):
    async def run():
        pieces = [p async for p in AsyncLLM(llm=llm).generate_async(
            prompt, SamplingParams(temperature=0, max_tokens=1), prompt_logprobs=TOP)]
        return pieces[0].prompt_logprobs
    return asyncio.run(run())


@torch.no_grad()
def hf_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    return model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)  # [len, V]: row i predicts i + 1


def check(entries, reference: torch.Tensor, prompt: list[int]) -> None:
    assert len(entries) == len(prompt) and entries[0] is None
    for i, entry in enumerate(entries[1:]):
        row = reference[i]
        assert abs(entry[prompt[i + 1]] - row[prompt[i + 1]].item()) < 1e-4
        top_ids = row.topk(TOP).indices.tolist()
        assert list(entry)[:TOP] == top_ids
        assert all(abs(entry[t] - row[t].item()) < 1e-4 for t in top_ids)


@pytest.mark.parametrize("tensor_parallel_size", [1, 2])
def test_prompt_logprobs_equal_hf(tiny_qwen3, tensor_parallel_size, no_leaks):  # noqa: F811
    prompts = random_prompts(3, 512, (2, 90), seed=41)
    model = load_hf(tiny_qwen3)
    with LLM(tiny_qwen3, num_kvcache_blocks=64, tensor_parallel_size=tensor_parallel_size, **OPTIONS) as llm:
        llm.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False)  # the prompts are in the prefix cache
        for prompt in prompts:
            check(prompt_logprobs(llm, prompt), hf_prompt_logprobs(model, prompt), prompt)
