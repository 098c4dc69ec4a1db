"""Fault injection: a KeyboardInterrupt or an error at every distinct point of a generate (or stream) call —
scheduling, admission, allocation, launch, commit, detokenize — in turn. After each the engine is idle, every KV
block is free, the block manager's invariants hold, and the next call gives what a fresh engine gives."""

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.core.detokenizer import IncrementalDetokenizer
from nanovllm.core.free_block_queue import FreeBlockQueue
from tests.conftest import random_prompts

OPTIONS = dict(backend="cpu_ref", num_kvcache_blocks=24, kvcache_block_size=16, max_model_len=128)
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
STOPPING = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, stop=["never-in-the-output"])


class Fault(Exception):
    pass


@pytest.fixture(scope="module")
def prompts():
    # 5 prompts of up to 70 tokens in 24 blocks: several admissions, decode appends and preemptions
    return random_prompts(5, 512, (10, 70), seed=5) * 2


@pytest.fixture(scope="module")
def reference(tiny_qwen3, prompts):
    return LLM(tiny_qwen3, **OPTIONS).generate(prompts, GREEDY, use_tqdm=False)


def fail_nth_call(obj, name: str, n: int, error: BaseException):
    """Make obj.name raise `error` on its n-th call (from 1), passing other calls on; returns the undo."""
    had_own = name in vars(obj)
    fn, calls = getattr(obj, name), [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise error
        return fn(*args, **kwargs)

    setattr(obj, name, failing)
    return lambda: setattr(obj, name, fn) if had_own else delattr(obj, name)


class FailingFreeList(FreeBlockQueue):
    """The block manager's free-block queue, whose pop raises on its n-th call."""
    def __init__(self, queue: FreeBlockQueue, n, error):
        super().__init__(queue.num_blocks, list(queue))
        self.calls, self.n, self.error = 0, n, error

    def popleft(self):
        self.calls += 1
        if self.calls == self.n:
            raise self.error
        return super().popleft()


def inject(llm, point: str, n: int, error: BaseException):
    """Arm the failure at `point`; returns the undo (the next call must run with the same engine, unharmed)."""
    engine = llm.engine
    scheduler, bm, runner = engine.scheduler, engine.scheduler.block_manager, engine.runner
    if point == "allocation":  # the free-block pop inside BlockManager._take_free_block (admission or append)
        bm.free_block_ids = FailingFreeList(bm.free_block_ids, n, error)
        return lambda: setattr(bm, "free_block_ids", FreeBlockQueue(bm.num_blocks, list(bm.free_block_ids)))
    target = {"scheduling": (scheduler, "schedule"), "admission": (bm, "allocate"),
              "decode append": (bm, "append_slots"), "launch": (runner, "launch"), "forward": (runner, "execute"),
              "sampling": (runner, "sampler"), "wait": (runner, "wait"), "commit": (scheduler, "commit"),
              "prefix caching": (bm, "cache_computed_blocks"),
              "detokenize": (IncrementalDetokenizer, "add_token")}[point]
    return fail_nth_call(*target, n, error)


def assert_idle_and_consistent(llm):
    scheduler = llm.engine.scheduler
    assert not scheduler.waiting and not scheduler.running
    bm = scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants([])


POINTS = ["scheduling", "admission", "allocation", "decode append", "launch", "forward", "sampling", "wait",
          "commit", "prefix caching", "detokenize"]


@pytest.mark.parametrize("error", [KeyboardInterrupt(), Fault("injected")], ids=["ctrl-c", "error"])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("point", POINTS)
def test_failure_at_every_point_of_generate(tiny_qwen3, prompts, reference, point, n, error):
    llm = LLM(tiny_qwen3, **OPTIONS)
    llm.generate(prompts[:2], GREEDY, use_tqdm=False)  # prefix-cache entries from before the failure
    undo = inject(llm, point, n, error)
    try:
        with pytest.raises(type(error)):
            llm.generate(prompts, STOPPING if point == "detokenize" else GREEDY, use_tqdm=False)
    finally:
        undo()
    assert_idle_and_consistent(llm)
    assert llm.generate(prompts, GREEDY, use_tqdm=False) == reference
    assert_idle_and_consistent(llm)


@pytest.mark.parametrize("point", ["scheduling", "allocation", "launch", "commit", "detokenize"])
def test_failure_at_every_point_of_stream(tiny_qwen3, prompts, reference, point):
    llm = LLM(tiny_qwen3, **OPTIONS)
    undo = inject(llm, point, 3, KeyboardInterrupt())
    try:
        with pytest.raises(KeyboardInterrupt):
            list(llm.stream(prompts, GREEDY))
    finally:
        undo()
    assert_idle_and_consistent(llm)
    pieces = list(llm.stream(prompts, GREEDY))
    assert [sum((p.token_ids for p in pieces if p.index == i), []) for i in range(len(prompts))] == \
        [r["token_ids"] for r in reference]
    assert_idle_and_consistent(llm)


def test_ctrl_c_in_the_third_free_block_pop_leaks_nothing(tiny_qwen3, prompts, reference):
    """The adversarial pass's reproduction: KeyboardInterrupt from the free-block pop on its third call, during
    admission (a prompt needing several blocks), used to leave a block referenced by no sequence."""
    llm = LLM(tiny_qwen3, **OPTIONS)
    bm = llm.engine.scheduler.block_manager
    bm.free_block_ids = FailingFreeList(bm.free_block_ids, 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[5] * 60], GREEDY, use_tqdm=False)  # 60 tokens: 4 blocks, the third pop fails
    assert_idle_and_consistent(llm)
    assert llm.generate(prompts, GREEDY, use_tqdm=False) == reference


@pytest.mark.parametrize("point", ["admission", "commit", "prefix caching"])
def test_failure_with_samples_not_yet_queued(tiny_qwen3, prompts, point):
    """SamplingParams(n=3): the other samples wait until the first has computed the prompt; a failure then
    leaves none of them queued or holding blocks."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, n=3)
    expected = LLM(tiny_qwen3, **OPTIONS).generate(prompts[:3], params, use_tqdm=False)
    llm = LLM(tiny_qwen3, **OPTIONS)
    undo = inject(llm, point, 2, Fault("injected"))
    try:
        with pytest.raises(Fault):
            llm.generate(prompts[:3], params, use_tqdm=False)
    finally:
        undo()
    assert_idle_and_consistent(llm)
    assert llm.generate(prompts[:3], params, use_tqdm=False) == expected
