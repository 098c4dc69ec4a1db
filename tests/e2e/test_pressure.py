"""Hundreds of requests of random lengths under a KV budget of a few blocks: greedy outputs equal an unconstrained
run's, the block manager's invariants hold after every step, and every block is free at the end."""
import random

from nanovllm import LLM, SamplingParams
from tests.conftest import random_prompts

NUM_REQUESTS = 240
MAX_MODEL_LEN = 64
OPTIONS = dict(backend="cpu_ref", kvcache_block_size=16, max_model_len=MAX_MODEL_LEN)


def requests():
    prompts = random_prompts(NUM_REQUESTS, 512, (1, MAX_MODEL_LEN - 8), seed=41)
    prompts += [prompts[i][:20] + [7] * 5 for i in range(0, 40, 4)]  # shared prefixes: prefix-cache hits
    rng = random.Random(41)
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 6), ignore_eos=rng.random() < 0.8)
              for _ in prompts]
    return prompts, params


def checked_every_step(llm):
    """Check the block manager's invariants after every committed step."""
    scheduler = llm.engine.scheduler
    commit = scheduler.commit
    num_steps = [0]

    def commit_and_check(*args, **kwargs):
        finished = commit(*args, **kwargs)
        scheduler.block_manager.check_invariants(scheduler.running)
        num_steps[0] += 1
        return finished

    scheduler.commit = commit_and_check
    return num_steps


def test_many_requests_under_a_few_blocks(tiny_qwen3):
    prompts, params = requests()
    free = LLM(tiny_qwen3, num_kvcache_blocks=1024, **OPTIONS).generate(prompts, params, use_tqdm=False)
    tight = LLM(tiny_qwen3, num_kvcache_blocks=6, max_num_seqs=8, max_num_batched_tokens=96, **OPTIONS)
    num_steps = checked_every_step(tight)
    outputs = tight.generate(prompts, params, use_tqdm=False)
    scheduler = tight.engine.scheduler
    assert scheduler.num_preemptions > 0 and num_steps[0] > NUM_REQUESTS
    assert [o["token_ids"] for o in outputs] == [o["token_ids"] for o in free]
    assert [o["finish_reason"] for o in outputs] == [o["finish_reason"] for o in free]
    bm = scheduler.block_manager
    assert not scheduler.waiting and not scheduler.running
    assert bm.num_free_blocks == bm.num_blocks == 6
    bm.check_invariants([])
    assert bm.num_prefix_hit_tokens > 0
