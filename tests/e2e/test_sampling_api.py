"""The rest of vLLM's sampling API through the engine: n (one prefill, shared blocks, derived seeds), prompt
logprobs (equal to Hugging Face's log_softmax, with chunked prefill and after a prefix-cache hit), penalties and
model defaults from generation_config.json."""
import json
import shutil

import pytest
import torch

from nanovllm import LLM, SamplingParams
from tests.e2e.hf_reference import load_hf


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=128, max_model_len=256)


def prompt_of(length: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 500, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_n_samples_equal_separate_requests_with_derived_seeds_after_one_prefill(llm):
    prompt = prompt_of(40)
    engine = llm.engine
    bs = engine.scheduler.block_manager.block_size
    prefill_before, hits_before = engine.stats.num_prefill_tokens, engine.scheduler.block_manager.num_prefix_hit_tokens
    params = SamplingParams(1.0, 8, True, n=4, seed=11, logprobs=0)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    full_blocks = (len(prompt) - 1) // bs * bs
    # the prompt once, then only each other sample's last partial block: its full blocks are shared cache hits
    assert engine.stats.num_prefill_tokens - prefill_before == len(prompt) + 3 * (len(prompt) - full_blocks)
    assert engine.scheduler.block_manager.num_prefix_hit_tokens - hits_before == 3 * full_blocks
    assert [o["index"] for o in out["outputs"]] == [0, 1, 2, 3]
    assert out["token_ids"] == out["outputs"][0]["token_ids"] and out["text"] == out["outputs"][0]["text"]
    assert len({tuple(o["token_ids"]) for o in out["outputs"]}) > 1, "the samples are all the same"
    for i, sample in enumerate(out["outputs"]):
        seed = params.sample_seed(i)
        assert seed == 11 + i
        alone = llm.generate([prompt], SamplingParams(1.0, 8, True, seed=seed, logprobs=0), use_tqdm=False)[0]
        assert sample["token_ids"] == alone["token_ids"]
        assert sample["cumulative_logprob"] == pytest.approx(
            sum(lp[t] for t, lp in zip(alone["token_ids"], alone["logprobs"])), abs=1e-4)
    assert engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_blocks


def test_n_with_greedy_stop_at_first_token_and_streaming(llm):
    prompt = prompt_of(20, seed=1)
    out = llm.generate([prompt], SamplingParams(0, 1, True, n=3), use_tqdm=False)[0]
    assert len({tuple(o["token_ids"]) for o in out["outputs"]}) == 1 and len(out["outputs"]) == 3
    pieces = list(llm.stream([prompt], SamplingParams(0, 3, True, n=2)))
    assert sorted({(p.index, p.sample_index) for p in pieces}) == [(0, 0), (0, 1)]
    assert sum(p.finished for p in pieces) == 2


def hf_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)  # [P, V]: row p predicts p + 1


def check_prompt_logprobs(result, prompt, reference, n):
    lps = result["prompt_logprobs"]
    assert len(lps) == len(prompt) and lps[0] is None
    for p in range(1, len(prompt)):
        entry, row = lps[p], reference[p - 1]
        assert prompt[p] in entry and len(entry) in (n, n + 1)
        assert entry[prompt[p]] == pytest.approx(row[prompt[p]].item(), abs=1e-4)
        top = row.topk(n)
        for token, value in zip(top.indices.tolist(), top.values.tolist()):
            assert entry[token] == pytest.approx(value, abs=1e-4)


def test_prompt_logprobs_equal_hf_with_chunked_prefill_and_a_prefix_hit(tiny_qwen3):
    chunked = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=64, max_model_len=128, max_num_seqs=8,
                  max_num_batched_tokens=24)
    prompt = prompt_of(70, seed=2)
    reference = hf_prompt_logprobs(load_hf(tiny_qwen3), prompt)
    first = chunked.generate([prompt], SamplingParams(0, 2, prompt_logprobs=3), use_tqdm=False)[0]
    check_prompt_logprobs(first, prompt, reference, 3)
    bm = chunked.engine.scheduler.block_manager
    hits = bm.num_prefix_hit_tokens
    assert chunked.generate([prompt], SamplingParams(0, 2), use_tqdm=False)[0]["prompt_logprobs"] is None
    assert bm.num_prefix_hit_tokens > hits, "the prompt's blocks were not cached"
    hits = bm.num_prefix_hit_tokens
    again = chunked.generate([prompt, prompt_of(30, seed=3)], SamplingParams(0, 2, prompt_logprobs=0),
                             use_tqdm=False)
    assert bm.num_prefix_hit_tokens == hits, "a request asking for prompt logprobs took prefix-cache hits"
    check_prompt_logprobs(again[0], prompt, reference, 0)
    assert again[0]["token_ids"] == first["token_ids"]


def repeated_4grams(ids: list[int]) -> int:
    grams = [tuple(ids[i:i + 4]) for i in range(len(ids) - 3)]
    return len(grams) - len(set(grams))


def test_repetition_penalty_breaks_the_greedy_loop_of_the_embedded_model(smollm2):
    llm = LLM(smollm2, backend="cpu_ref", max_model_len=128, num_kvcache_blocks=16)
    prompt = "I like apples. I like apples. I like"
    looping = llm.generate(prompt, SamplingParams(0, 40, True), use_tqdm=False)[0]
    penalised = llm.generate(prompt, SamplingParams(0, 40, True, repetition_penalty=1.3), use_tqdm=False)[0]
    assert repeated_4grams(looping["token_ids"]) >= 15, looping["text"]
    assert repeated_4grams(penalised["token_ids"]) <= 2, penalised["text"]


def test_model_defaults_fill_unset_fields_only(tiny_qwen3, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_qwen3, folder)
    with open(folder / "generation_config.json", "w") as f:
        json.dump({"temperature": 0.0, "top_k": 5, "eos_token_id": [7, 9]}, f)
    llm = LLM(str(folder), backend="cpu_ref", num_kvcache_blocks=32, max_model_len=128)
    assert llm.engine.model_defaults == {"temperature": 0.0, "top_k": 5}
    assert {7, 9} <= llm.engine.scheduler.eos_token_ids
    prompt = prompt_of(10, seed=4)
    default = llm.generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    greedy = llm.generate([prompt], SamplingParams(0.0, 6, True), use_tqdm=False)[0]
    assert default["token_ids"] == greedy["token_ids"], "the model's temperature=0 was not applied"
    seq = llm.engine.add_request(prompt, SamplingParams(temperature=0.5))
    assert (seq.params.temperature, seq.params.top_k) == (0.5, 5)
    llm.engine.abort([seq])
    plain = LLM(str(folder), backend="cpu_ref", num_kvcache_blocks=32, max_model_len=128, generation_config="none")
    assert plain.engine.model_defaults == {}
    # vLLM's get_default_sampling_params: the model's values set explicitly, the rest neutral
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.top_p) == (0.0, 5, 1.0) and not defaults.unset & {"top_k"}
    assert plain.get_default_sampling_params() == SamplingParams()
    with pytest.raises(FileNotFoundError, match="generation_config"):
        LLM(str(folder), backend="cpu_ref", num_kvcache_blocks=32, generation_config=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("params,match", [
    (SamplingParams(logit_bias={100_000: 1.0}), "logit_bias has 100000"),
    (SamplingParams(top_k=100_000), "top_k=100000 is invalid"),
    (SamplingParams(allowed_token_ids=[1, 99_999]), "allowed_token_ids has 99999"),
    (SamplingParams(prompt_logprobs=100_000), "prompt_logprobs=100000 is invalid"),
])
def test_vocabulary_bounds_are_checked_at_submission(llm, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate([[1, 2, 3]], params, use_tqdm=False)


def test_fields_reassigned_after_construction_are_refused_at_submission(llm):
    params = SamplingParams()
    params.temperature = float("nan")
    with pytest.raises(ValueError, match="temperature=nan is invalid"):
        llm.generate([[1, 2, 3]], params, use_tqdm=False)
    assert not llm.engine.has_unfinished()


def test_logit_bias_and_allowed_ids_steer_the_engine(llm):
    prompt = prompt_of(12, seed=5)
    forced = llm.generate([prompt], SamplingParams(1.0, 6, True, logit_bias={42: 100}), use_tqdm=False)[0]
    assert forced["token_ids"] == [42] * 6
    allowed = llm.generate([prompt] * 3, SamplingParams(1.0, 8, True, allowed_token_ids=[5, 6, 7]),
                           use_tqdm=False)
    assert all(set(o["token_ids"]) <= {5, 6, 7} for o in allowed)
    banned = llm.generate([prompt], SamplingParams(0, 8, True, bad_words=[[forced["token_ids"][0]]],
                                                   logit_bias={42: 100, 43: 99}), use_tqdm=False)[0]
    assert banned["token_ids"] == [43] * 8


def test_closing_a_stream_of_n_samples_aborts_all_and_frees_their_blocks(llm):
    pieces = llm.stream([prompt_of(40, seed=6)], SamplingParams(1.0, 50, True, n=3, seed=2))
    first = next(pieces)
    assert first.index == 0
    pieces.close()
    bm = llm.engine.scheduler.block_manager
    assert llm.loop.run(lambda engine: not engine.has_work())
    assert bm.num_free_blocks == bm.num_blocks
