"""cpu_ref against Hugging Face transformers on small random models of every architecture: identical greedy
tokens, close logits."""
import pytest
import torch

from nanovllm import LLM, SamplingParams
from tests.conftest import random_prompts
from tests.e2e.hf_reference import hf_greedy, hf_last_logits, load_hf

MODELS = ["tiny_qwen3", "tiny_qwen2", "tiny_llama", "tiny_llama3_rope", "tiny_llama_biased"]


@pytest.mark.parametrize("model_fixture", MODELS)
def test_greedy_tokens_equal_hf(model_fixture, request):
    path = request.getfixturevalue(model_fixture)
    hf = load_hf(path)
    prompts = random_prompts(6, hf.config.vocab_size, (1, 300), seed=1)
    llm = LLM(path, backend="cpu_ref", num_kvcache_blocks=512)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        assert out["token_ids"] == hf_greedy(hf, prompt, 12)
        assert out["prompt_token_ids"] == prompt


@pytest.mark.parametrize("model_fixture", MODELS)
def test_prefill_logits_match_hf(model_fixture, request):
    path = request.getfixturevalue(model_fixture)
    hf = load_hf(path)
    prompts = random_prompts(4, hf.config.vocab_size, (1, 200), seed=2)
    llm = LLM(path, backend="cpu_ref", num_kvcache_blocks=256)
    runner = llm.engine.runner
    logits = prefill_logits(llm, prompts)
    for prompt, ours in zip(prompts, logits):
        ref = hf_last_logits(hf, prompt)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert runner.num_blocks == 256


def prefill_logits(llm, prompts):
    """Logits of each prompt's last token, from one batched prefill step of the engine."""
    engine = llm.engine
    seqs = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=1)) for p in prompts]
    batch = engine.scheduler.schedule()
    assert batch.is_prefill and batch.seqs == seqs
    input_ids, positions, meta, _ = engine.runner.prepare(batch)
    logits = engine.runner.execute(input_ids, positions, meta)
    engine.scheduler.postprocess(batch, [0] * len(seqs))  # max_tokens=1: every sequence finishes
    assert not engine.has_unfinished()
    return logits
