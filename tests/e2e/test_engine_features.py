"""Prefix caching, chunked prefill and preemption give the same greedy tokens as an unconstrained run."""
import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.core.decode_record import DecodeRecord
from tests.conftest import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(tiny_qwen3):
    return random_prompts(8, 512, (1, 120), seed=3)


@pytest.fixture(scope="module")
def reference(tiny_qwen3, prompts):
    llm = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=512, kvcache_block_size=16, max_model_len=512)
    return [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_prefix_cache_hits_and_same_tokens(tiny_qwen3):
    prefix = random_prompts(1, 512, (40, 40), seed=4)[0]
    tails = random_prompts(4, 512, (3, 30), seed=5)
    prompts = [prefix + t for t in tails]
    llm = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=256, kvcache_block_size=16, max_model_len=512)
    llm.generate(prompts[:1], GREEDY, use_tqdm=False)  # computes, then caches, the shared prefix's blocks
    bm = llm.engine.scheduler.block_manager
    hits_before = bm.num_prefix_hit_tokens
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert bm.num_prefix_hit_tokens - hits_before >= 4 * 32, "each prompt shares two full blocks with the first"
    # the reference: a fresh engine prefilling all prompts in one step, where no block is cached yet
    uncached = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=256, kvcache_block_size=16, max_model_len=512)
    expected = uncached.generate(prompts, GREEDY, use_tqdm=False)
    assert uncached.engine.scheduler.block_manager.num_prefix_hit_tokens == 0
    assert [o["token_ids"] for o in outputs] == [o["token_ids"] for o in expected]


def test_fully_cached_prompt_twice(tiny_qwen3):
    prompt = random_prompts(1, 512, (48, 48), seed=6)[0]  # exactly 3 blocks of 16
    llm = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=64, kvcache_block_size=16, max_model_len=512)
    first = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    hits = llm.engine.scheduler.block_manager.num_prefix_hit_tokens
    second = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert llm.engine.scheduler.block_manager.num_prefix_hit_tokens - hits == 32
    assert first["token_ids"] == second["token_ids"]


@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("max_tokens", [1, 2])
def test_request_finished_at_its_prefill_step_leaves_its_blocks_cached(tiny_qwen3, max_tokens, async_scheduling):
    """max_tokens=1 (a log-likelihood request, as lm-eval sends them) ends at the prefill step; its full blocks
    are still entered in the prefix cache, so the same ~600-token context sent again is served from it."""
    prompt = random_prompts(1, 512, (600, 600), seed=8)[0]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=128, kvcache_block_size=16, max_model_len=1024,
              async_scheduling=async_scheduling)
    first = llm.generate([prompt], params, use_tqdm=False)[0]
    bm = llm.engine.scheduler.block_manager
    hits = bm.num_prefix_hit_tokens
    second = llm.generate([prompt], params, use_tqdm=False)[0]
    assert bm.num_prefix_hit_tokens - hits == 592  # 37 full blocks; the last token is always computed
    assert first["token_ids"] == second["token_ids"]
    bm.check_invariants([])


def test_chunked_prefill_same_tokens(tiny_qwen3, prompts, reference):
    llm = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=512, kvcache_block_size=16, max_model_len=512,
              max_num_batched_tokens=40, max_num_seqs=8)
    assert [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == reference


def test_preemption_same_tokens(tiny_qwen3, prompts, reference):
    llm = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=18, kvcache_block_size=16, max_model_len=256)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o["token_ids"] for o in outputs] == reference
    assert llm.engine.scheduler.block_manager.num_free_blocks == 18


def test_pipelined_steps_equal_synchronous_steps(tiny_qwen3, prompts):
    """Launching step N+1 before step N's tokens are committed changes nothing, stops included."""
    params = [SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[t]) for t in (7, 100, 300, 42)] * 2
    params += [SamplingParams(temperature=0.8, seed=5, max_tokens=9)]
    outs = {}
    for mode in (True, False):
        llm = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=128, max_model_len=512, async_scheduling=mode)
        outs[mode] = llm.generate(prompts + prompts[:1], params, use_tqdm=False)
        assert llm.engine.scheduler.block_manager.num_free_blocks == 128
    assert outs[True] == outs[False]


def test_decode_steps_built_in_a_device_record_change_nothing(tiny_qwen3, prompts):
    """Decode steps built as on a device (into a record of their own through one copy, padded to the graphs'
    sizes, the pending-token index inside it; core/decode_record.py), pipelined, with preemption: same tokens."""
    params = [SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[t]) for t in (7, 100, 300, 42)] * 2
    params += [SamplingParams(temperature=0.8, seed=5, max_tokens=9)]
    outs = {}
    for in_record in (True, False):
        llm = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=24, max_model_len=256, async_scheduling=True)
        inputs = llm.engine.runner.inputs
        if in_record:
            inputs.records = [DecodeRecord(llm.engine.config.max_num_seqs, llm.engine.runner.max_num_blocks_per_seq,
                                           torch.device("cpu")) for _ in range(2)]
            inputs.pad_sizes = [1, 2, 4, 8, 16]
        outs[in_record] = llm.generate(prompts + prompts[:1], params, use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.scheduler.block_manager.num_free_blocks == 24
    assert outs[True] == outs[False]


def test_pipelined_prefill_keeps_outputs_and_prefix_hits(tiny_qwen3):
    """Prefill steps launched behind a prefill in flight (small token budget, several steps of prompts, some
    sharing a prefix, chunked prompts) give the same tokens and the same prefix-cache hits as synchronous steps."""
    prefix = random_prompts(1, 512, (40, 40), seed=6)[0]
    prompts = [prefix + t for t in random_prompts(6, 512, (3, 30), seed=7)] + random_prompts(6, 512, (20, 90), seed=8)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs, hits, behind = {}, {}, {}
    for mode in (True, False):
        llm = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=256, kvcache_block_size=16, max_model_len=512,
                  max_num_batched_tokens=64, max_num_seqs=8, async_scheduling=mode)
        scheduler, launched = llm.engine.scheduler, []
        schedule = scheduler.schedule

        def recording(in_flight=None):
            batch = schedule(in_flight)
            launched.append(in_flight is not None and in_flight.is_prefill and batch is not None and batch.is_prefill)
            return batch
        scheduler.schedule = recording
        outs[mode] = llm.generate(prompts, params, use_tqdm=False)
        hits[mode], behind[mode] = scheduler.block_manager.num_prefix_hit_tokens, sum(launched)
        assert scheduler.block_manager.num_free_blocks == 256
    assert outs[True] == outs[False]
    assert hits[True] == hits[False] >= 4 * 32  # the first two share a step: both compute the prefix
    assert behind[True] >= 3 and behind[False] == 0
