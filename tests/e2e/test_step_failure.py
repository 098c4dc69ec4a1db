"""A step that raises (a kernel, Ctrl-C) aborts the call's requests and leaves the engine idle and usable: the next
generate gives the outputs a fresh engine gives, prefix-cache hits from before the failure included."""
import pytest

from nanovllm import LLM, SamplingParams
from tests.conftest import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
OPTIONS = dict(backend="cpu_ref", num_kvcache_blocks=64, kvcache_block_size=16, max_model_len=256)


class KernelFault(Exception):
    pass


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(6, 512, (1, 60), seed=31)


@pytest.fixture(scope="module")
def reference(tiny_qwen3, prompts):
    return LLM(tiny_qwen3, **OPTIONS).generate(prompts, GREEDY, use_tqdm=False)


def fail_on_call(layer, name: str, n: int, error: BaseException) -> None:
    """Make the layer's `name` kernel raise `error` on its n-th call (counting from 1)."""
    kernel, calls = getattr(layer, name), [0]

    def failing(*args):
        calls[0] += 1
        if calls[0] == n:
            raise error
        return kernel(*args)

    setattr(layer, name, failing)


def assert_idle(llm):
    scheduler = llm.engine.scheduler
    assert not scheduler.waiting and not scheduler.running
    bm = scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants([])


@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("kernel, n", [("decode", 3), ("decode", 1), ("prefill", 1), ("store", 4)])
def test_generate_after_a_failing_kernel(tiny_qwen3, prompts, reference, kernel, n, async_scheduling):
    llm = LLM(tiny_qwen3, async_scheduling=async_scheduling, **OPTIONS)
    llm.generate(prompts[:2], GREEDY, use_tqdm=False)  # blocks in the prefix cache from before the failure
    fail_on_call(llm.engine.runner.attention_layers[1], kernel, n, KernelFault("boom"))
    with pytest.raises(KernelFault):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert_idle(llm)
    assert llm.generate(prompts, GREEDY, use_tqdm=False) == reference
    assert_idle(llm)


def test_interrupt_mid_generate(tiny_qwen3, prompts, reference):
    """Ctrl-C inside a step: the same recovery, and KeyboardInterrupt itself propagates."""
    llm = LLM(tiny_qwen3, **OPTIONS)
    fail_on_call(llm.engine.runner, "sampler", 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert_idle(llm)
    assert llm.generate(prompts, GREEDY, use_tqdm=False) == reference


def test_stream_after_a_failing_kernel(tiny_qwen3, prompts, reference):
    llm = LLM(tiny_qwen3, **OPTIONS)
    fail_on_call(llm.engine.runner.attention_layers[0], "decode", 2, KernelFault("boom"))
    with pytest.raises(KernelFault):
        list(llm.stream(prompts, GREEDY))
    assert_idle(llm)
    pieces = list(llm.stream(prompts, GREEDY))
    assert [sum((p.token_ids for p in pieces if p.index == i), []) for i in range(len(prompts))] == \
        [r["token_ids"] for r in reference]


def test_failure_under_preemption_frees_every_block(tiny_qwen3, prompts, reference):
    """A tight KV budget (preemptions in flight) and a late failure: nothing leaks, and the rerun is exact."""
    llm = LLM(tiny_qwen3, **{**OPTIONS, "num_kvcache_blocks": 16})
    fail_on_call(llm.engine.runner.attention_layers[0], "decode", 12, KernelFault("late"))
    with pytest.raises(KernelFault):
        llm.generate(prompts * 3, GREEDY, use_tqdm=False)
    assert_idle(llm)
    assert llm.generate(prompts, GREEDY, use_tqdm=False) == reference
