"""Soak: many generate / stream calls on cpu_ref, after warm-up, grow neither the process's memory (RSS) nor the
engine's state: no queued or running request, every block free, the prefix cache within the block count, and no
Sequence kept alive once its outputs are returned."""
import gc
import time
import weakref

import psutil

from nanovllm import LLM, SamplingParams
from tests.conftest import random_prompts

NUM_BLOCKS = 48
WARMUP_CALLS, SOAK_SECONDS = 15, 8
RSS_GROWTH_LIMIT = 24 << 20  # allocator noise stays well below; a leak of one KV cache per call would not


def call(llm, i: int) -> None:
    prompts = random_prompts(4, 512, (1, 60), seed=i % 25)
    params = [SamplingParams(temperature=0, max_tokens=6), SamplingParams(temperature=0.9, seed=i, max_tokens=5),
              SamplingParams(temperature=0, max_tokens=4, logprobs=2), SamplingParams(max_tokens=7, stop="e")]
    if i % 3 == 0:
        list(llm.stream(prompts, params))
    else:
        llm.generate(prompts, params, use_tqdm=False)


def test_no_growth_over_many_calls(tiny_qwen3):
    llm = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=NUM_BLOCKS, max_model_len=128)
    live = weakref.WeakSet()
    add_request = llm.engine.add_request
    llm.engine.add_request = lambda *args, **kw: live.add(seq := add_request(*args, **kw)) or seq
    process = psutil.Process()
    for i in range(WARMUP_CALLS):
        call(llm, i)
    gc.collect()
    rss_after_warmup = process.memory_info().rss
    i, deadline = WARMUP_CALLS, time.monotonic() + SOAK_SECONDS
    while time.monotonic() < deadline:
        call(llm, i)
        i += 1
    gc.collect()
    growth = process.memory_info().rss - rss_after_warmup
    print(f"soak: {i - WARMUP_CALLS} calls, RSS growth {growth / 2**20:.1f} MiB")
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth / 2**20:.1f} MiB over {i - WARMUP_CALLS} calls"
    scheduler = llm.engine.scheduler
    bm = scheduler.block_manager
    assert not scheduler.waiting and not scheduler.running
    assert bm.num_free_blocks == NUM_BLOCKS and len(bm.hash_to_block_id) <= NUM_BLOCKS
    bm.check_invariants([])
    assert len(live) == 0, f"{len(live)} sequences outlived their calls"
    assert i - WARMUP_CALLS >= 20, "too few calls to call this a soak"
