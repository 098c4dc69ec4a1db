"""Many callers on one LLM: threads calling generate/stream at once, interleaved streams, Ctrl-C in a caller.

Every call must get exactly what the same call gets alone (greedy and seeded requests), and the engine must be
idle with every KV block free afterwards.
"""
import json
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanovllm import LLM, SamplingParams
from tests.conftest import random_prompts

NUM_BLOCKS = 96
OPTIONS = dict(backend="cpu_ref", num_kvcache_blocks=NUM_BLOCKS, kvcache_block_size=16, max_model_len=256,
               max_num_seqs=16)


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(tiny_qwen3, **OPTIONS)


def assert_idle(llm):
    def check(engine):
        scheduler = engine.scheduler
        assert not scheduler.waiting and not scheduler.running
        assert not engine.has_work()
        bm = scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks
        bm.check_invariants([])
        return True
    assert llm.loop.run(check)


def call_params(i: int) -> list[SamplingParams]:
    return [SamplingParams(temperature=0, max_tokens=4 + i % 5, ignore_eos=True),
            SamplingParams(temperature=0.9, top_p=0.9, seed=1000 + i, max_tokens=6, logprobs=1 if i % 4 else None),
            SamplingParams(temperature=1.0, seed=i, max_tokens=3 + i % 3, stop="e")]


def run_call(llm, i: int) -> list[tuple]:
    prompts = random_prompts(3, 512, (1, 40), seed=i)
    if i % 2:
        pieces = {}
        for p in llm.stream(prompts, call_params(i)):
            tokens, text, logprobs, _ = pieces.get(p.index, ([], "", [], None))
            pieces[p.index] = (tokens + p.token_ids, text + p.text, logprobs + (p.logprobs or []), p.finish_reason)
        return [pieces[k] for k in range(len(prompts))]
    return [(o["token_ids"], o["text"], o["logprobs"] or [], o["finish_reason"])
            for o in llm.generate(prompts, call_params(i), use_tqdm=False)]


def test_threads_mixing_generate_and_stream_get_the_sequential_results(llm):
    num_threads, calls_per_thread = 8, 20
    calls = list(range(num_threads * calls_per_thread))
    sequential = {i: run_call(llm, i) for i in calls}
    with ThreadPoolExecutor(num_threads) as pool:
        concurrent = dict(zip(calls, pool.map(lambda i: run_call(llm, i), calls)))
    assert_same_results(concurrent, sequential)
    assert_idle(llm)


def assert_same_results(got: dict, expected: dict) -> None:
    """Tokens, text and finish reasons exactly; logprobs within float32 noise (batch shapes differ)."""
    def exact(results):
        return {i: [(t, text, [sorted(lp) for lp in lps], reason) for t, text, lps, reason in r]
                for i, r in results.items()}
    assert exact(got) == exact(expected)
    for i, results in expected.items():
        for (_, _, lps, _), (_, _, got_lps, _) in zip(results, got[i]):
            for step, got_step in zip(lps, got_lps):
                assert all(abs(step[t] - got_step[t]) < 1e-4 for t in step), (i, step, got_step)


def test_generate_while_a_stream_is_paused(llm):
    prompts = random_prompts(3, 512, (5, 30), seed=7)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]
    stream = llm.stream(prompts, params)
    first = next(stream)
    assert first.token_ids
    others = llm.generate(random_prompts(20, 512, (5, 60), seed=8), SamplingParams(max_tokens=16), use_tqdm=False)
    assert len(others) == 20 and all(o["token_ids"] for o in others)
    pieces = [first, *stream]
    got = [sum((p.token_ids for p in pieces if p.index == i), []) for i in range(3)]
    assert got == expected
    assert sum(p.finished for p in pieces) == 3
    assert_idle(llm)


def test_a_stream_inside_a_stream(llm):
    outer_prompts, inner_prompts = random_prompts(2, 512, (5, 30), seed=9), random_prompts(2, 512, (5, 30), seed=10)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected_outer = [o["token_ids"] for o in llm.generate(outer_prompts, params, use_tqdm=False)]
    expected_inner = [o["token_ids"] for o in llm.generate(inner_prompts, params, use_tqdm=False)]
    outer, inner_runs = [], []
    for piece in llm.stream(outer_prompts, params):
        outer.append(piece)
        if len(inner_runs) < 2:
            inner = list(llm.stream(inner_prompts, params))
            inner_runs.append([sum((p.token_ids for p in inner if p.index == i), []) for i in range(2)])
    assert [sum((p.token_ids for p in outer if p.index == i), []) for i in range(2)] == expected_outer
    assert inner_runs == [expected_inner, expected_inner]
    assert_idle(llm)


def test_breaking_out_of_a_stream_aborts_only_its_requests(llm):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = random_prompts(4, 512, (5, 30), seed=11)
    expected = llm.generate(prompts, params, use_tqdm=False)
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        def other():
            started.set()
            return llm.generate(prompts, params, use_tqdm=False)
        future = pool.submit(other)
        started.wait()
        for piece in llm.stream(prompts, params):
            break
        assert future.result(timeout=120) == expected
    assert_idle(llm)


def test_ctrl_c_in_the_caller_aborts_its_call(llm):
    """SIGINT reaches the main thread while it waits on the engine loop: the call's 300 requests are aborted (none
    left waiting to run in the next call), every block is free, and the next call gets exact results."""
    prompts = random_prompts(300, 512, (5, 40), seed=12)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    sampler, calls, main = llm.engine.runner.sampler, [0], threading.main_thread().ident

    def interrupting(*args):
        calls[0] += 1
        if calls[0] == 3:
            signal.pthread_kill(main, signal.SIGINT)
        return sampler(*args)

    llm.engine.runner.sampler = interrupting
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.engine.runner.sampler = sampler
    assert_idle(llm)
    small = prompts[:2]
    fresh = LLM(llm.config.model, **OPTIONS).generate(small, params, use_tqdm=False)
    assert llm.generate(small, params, use_tqdm=False) == fresh
    assert_idle(llm)


def test_close_ends_waiting_callers(tiny_qwen3):
    llm = LLM(tiny_qwen3, **OPTIONS)
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(llm.generate, random_prompts(40, 512, (5, 40), seed=13), params, use_tqdm=False)
        time.sleep(0.3)
        llm.close()
        with pytest.raises(RuntimeError, match="closed|shut down"):
            future.result(timeout=60)
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate([[1, 2, 3]], params, use_tqdm=False)


def test_params_reassigned_after_submission_do_not_reach_running_requests(llm):
    """The engine held the caller's SamplingParams object: reassigning a field for the next call (or from another
    thread) changed requests already running (max_tokens 200 -> 3 stopped one mid-way)."""
    import asyncio

    from nanovllm import AsyncLLM
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    pieces = llm.stream(["hello"], params)
    params.max_tokens, params.stop = 3, ["e"]  # after the call: its requests keep what was submitted
    tokens = []
    for piece in pieces:
        tokens += piece.token_ids
        params.max_tokens, params.ignore_eos = 2, False  # while they run
    assert len(tokens) == 200

    async def run_async() -> int:
        shared = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
        count = 0
        async for out in AsyncLLM(llm=llm).generate_async("hello", shared):
            count += len(out.token_ids)
            shared.max_tokens = 1
        return count
    assert asyncio.run(run_async()) == 120


def test_a_call_validates_each_params_once(llm, monkeypatch):
    # The caller validates a clone of each SamplingParams and the loop adds it unchecked (EngineRequest's
    # contract): three validations per request on a 256-prompt call cost the engine's start ~2 ms of host time.
    params = [SamplingParams(temperature=0, max_tokens=2, ignore_eos=True) for _ in range(5)]
    calls = []
    validate = SamplingParams.validate
    monkeypatch.setattr(SamplingParams, "validate", lambda self: (calls.append(self), validate(self))[1])
    outputs = llm.generate(random_prompts(5, 512, (3, 9), seed=3), params, use_tqdm=False)
    assert [len(o["token_ids"]) for o in outputs] == [2] * 5
    assert len(calls) == 5 and all(c is not p for c, p in zip(calls, params)), "one clone() each, nothing else"
    assert_idle(llm)


def test_engine_add_request_called_directly_validates_reassigned_fields(llm):
    params = SamplingParams(max_tokens=4)
    params.temperature = -1.0  # valid at construction, reassigned since: the Engine API's callers hold no clone
    assert llm.loop.run(lambda engine: _refusal(engine.add_request, [1, 2, 3], params)) == (
        "SamplingParams.temperature=-1.0 is invalid: expected a finite number >= 0 (0 means greedy)")
    assert_idle(llm)


def _refusal(fn, *args) -> str | None:
    try:
        fn(*args)
    except ValueError as e:
        return str(e)
    return None


def test_the_model_defaults_a_request_takes_are_still_checked(tiny_qwen3, tmp_path):
    # A request the caller checked skips the loop's check, but a copy the model's defaults changed is checked.
    folder = tmp_path / "model"
    shutil.copytree(tiny_qwen3, folder)
    with open(folder / "generation_config.json", "w") as f:
        json.dump({"top_k": 600}, f)  # beyond the tiny vocabulary (512)
    llm = LLM(str(folder), **OPTIONS)
    with pytest.raises(ValueError, match="top_k=600 is invalid: expected at most the vocabulary size 512"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, top_k=4), use_tqdm=False)[0]["token_ids"]
    assert_idle(llm)
