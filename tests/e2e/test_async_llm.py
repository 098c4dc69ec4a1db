"""AsyncLLM: generate_async pieces add up to generate's output; abort and task cancellation end a request and free
its blocks; async and threaded callers share one engine."""
import asyncio
import threading
import time

import pytest

from nanovllm import AsyncLLM, LLM, SamplingParams
from tests.conftest import random_prompts

OPTIONS = dict(backend="cpu_ref", num_kvcache_blocks=64, kvcache_block_size=16, max_model_len=256)
LONG = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(tiny_qwen3, **OPTIONS)


def idle(llm, timeout: float = 10.0) -> bool:
    """Whether the engine becomes idle with every block free within `timeout` s: an abort returns at once, and the
    loop may still hold the aborted request's step in flight when the caller's stream has already ended."""
    deadline = time.monotonic() + timeout
    while not llm.loop.run(lambda e: not e.has_work() and e.scheduler.block_manager.num_free_blocks == 64):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def blocks_in_use(llm) -> int:
    """KV blocks in use, read by the engine loop after every message already queued (an abort included)."""
    return llm.loop.run(lambda e: e.scheduler.block_manager.num_blocks - e.scheduler.block_manager.num_free_blocks)


async def collect(async_llm, prompt, params, request_id=None):
    pieces = [p async for p in async_llm.generate_async(prompt, params, request_id)]
    return sum((p.token_ids for p in pieces), []), "".join(p.text for p in pieces), pieces


def test_generate_async_equals_generate(llm):
    async_llm = AsyncLLM(llm=llm)
    prompts = ["hello world", "paris is", [5, 6, 7, 8]]
    params = [SamplingParams(temperature=0, max_tokens=9), SamplingParams(seed=3, max_tokens=7, logprobs=1),
              SamplingParams(temperature=0.7, seed=4, max_tokens=8, stop="e")]
    expected = llm.generate(prompts, params, use_tqdm=False)

    async def main():
        return await asyncio.gather(*(collect(async_llm, p, sp, f"r{i}")
                                      for i, (p, sp) in enumerate(zip(prompts, params))))

    for (token_ids, text, pieces), e in zip(asyncio.run(main()), expected):
        assert (token_ids, text) == (e["token_ids"], e["text"])
        assert pieces[-1].finished and pieces[-1].finish_reason == e["finish_reason"]
        assert sum(p.finished for p in pieces) == 1 and pieces[0].request_id is not None
    assert idle(llm)


def test_abort_and_cancellation_free_blocks(llm):
    async_llm = AsyncLLM(llm=llm)

    async def main():
        aborted = asyncio.ensure_future(collect(async_llm, "hello", LONG, "to-abort"))
        cancelled = asyncio.ensure_future(collect(async_llm, "world", LONG, "to-cancel"))
        await asyncio.sleep(0.2)
        async_llm.abort("to-abort")
        cancelled.cancel()
        token_ids, _, pieces = await asyncio.wait_for(aborted, 60)
        assert pieces[-1].finish_reason == "abort" and len(token_ids) < 200
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        # cancelled right after its first piece: the abort is queued before this look, so no block is left in use
        first_piece = asyncio.Event()

        async def consume():
            async for _ in async_llm.generate_async("again", LONG, "to-cancel-2"):
                first_piece.set()
        task = asyncio.ensure_future(consume())
        await first_piece.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert blocks_in_use(llm) == 0
        with pytest.raises(ValueError, match="vocabulary"):
            await collect(async_llm, [10**6], LONG)

    asyncio.run(main())
    for _ in range(100):
        if idle(llm):
            break
        threading.Event().wait(0.05)
    assert idle(llm)


def test_async_and_threaded_callers_share_the_engine(llm):
    async_llm = AsyncLLM(llm=llm)
    prompts = random_prompts(6, 512, (3, 30), seed=3)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]
    threaded = []
    thread = threading.Thread(target=lambda: threaded.extend(llm.generate(prompts, params, use_tqdm=False)))

    async def main():
        thread.start()
        return await asyncio.gather(*(collect(async_llm, p, params) for p in prompts))

    results = asyncio.run(main())
    thread.join(60)
    assert [r[0] for r in results] == expected == [o["token_ids"] for o in threaded]
    assert idle(llm)


def test_duplicate_request_ids_are_refused(llm):
    async_llm = AsyncLLM(llm=llm)

    async def main():
        first = async_llm.generate_async("hello", LONG, "same")
        await first.__anext__()
        with pytest.raises(ValueError, match="already running"):
            await async_llm.generate_async("hello", LONG, "same").__anext__()
        await first.aclose()

    asyncio.run(main())


def test_duplicate_request_ids_are_refused_across_wrappers_of_one_llm(llm):
    """Two AsyncLLMs on one LLM share its engine: the engine loop refuses an id in use, so abort(id) stays one
    request's."""
    first_llm, second_llm = AsyncLLM(llm=llm), AsyncLLM(llm=llm)

    async def main():
        first = first_llm.generate_async("hello", LONG, "shared")
        await first.__anext__()
        with pytest.raises(ValueError, match="already running"):
            await second_llm.generate_async("hello", LONG, "shared").__anext__()
        pieces = [p async for p in first]  # the first request is untouched: it runs to its end
        assert pieces[-1].finished and pieces[-1].finish_reason == "length"
    asyncio.run(asyncio.wait_for(main(), 60))
    assert idle(llm)


def test_n_samples_equal_generates(llm):
    """n > 1: the pieces of each sample add up to generate's sample of that index, streamed or not; the samples
    share the prompt's blocks, and the iteration ends once all have finished."""
    async_llm = AsyncLLM(llm=llm)
    params = SamplingParams(n=3, temperature=0.8, seed=11, max_tokens=8, logprobs=1)
    expected = llm.generate(["hello world"], params, use_tqdm=False)[0]["outputs"]

    async def main(stream):
        return [p async for p in async_llm.generate_async("hello world", params, stream=stream)]

    for stream in (True, False):
        pieces = asyncio.run(main(stream))
        assert sorted({p.sample_index for p in pieces}) == [0, 1, 2]
        for e in expected:
            mine = [p for p in pieces if p.sample_index == e["index"]]
            assert sum((p.token_ids for p in mine), []) == e["token_ids"]
            assert "".join(p.text for p in mine) == e["text"]
            assert sum((p.logprobs for p in mine), []) == e["logprobs"]
            assert [p.finished for p in mine] == [False] * (len(mine) - 1) + [True]
            assert mine[-1].finish_reason == e["finish_reason"]
        assert pieces[-1].finished and (stream or len(pieces) == 3)  # not streamed: one piece per sample
    assert len({tuple(e["token_ids"]) for e in expected}) > 1  # the seeds differ per sample
    assert idle(llm)


def test_abort_ends_every_sample(llm):
    async_llm = AsyncLLM(llm=llm)

    async def main():
        pieces = []
        async for p in async_llm.generate_async("hello", SamplingParams(n=2, max_tokens=200, ignore_eos=True),
                                                "n-abort"):
            pieces.append(p)
            if len(pieces) == 3:
                async_llm.abort("n-abort")
        return pieces
    pieces = asyncio.run(asyncio.wait_for(main(), 60))
    assert {p.finish_reason for p in pieces if p.finished} == {"abort"}
    assert sum(p.finished for p in pieces) == 2
    assert idle(llm)


def close_logprobs(got, want) -> bool:
    """Two logprobs lists ([{token id: logprob} or None, ...] or None): the same ids, values within 1e-4."""
    if got is None or want is None:
        return got is want
    return len(got) == len(want) and all(
        (g is None and w is None) or (g is not None and w is not None and list(g) == list(w)
                                      and all(abs(g[t] - w[t]) < 1e-4 for t in g))
        for g, w in zip(got, want))


def test_vllm_style_generate_yields_cumulative_request_outputs(llm):
    """AsyncLLM.generate (vLLM's API): each output holds every sample's whole output so far, the last one equals
    LLM.generate's result, earlier ones are prefixes and stay unchanged after later steps; closing it aborts."""
    async_llm = AsyncLLM(llm=llm)
    greedy = llm.generate(["hello world"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                          use_tqdm=False)[0]
    cases = [("paris is", SamplingParams(temperature=0, max_tokens=9, logprobs=1, prompt_logprobs=1)),
             ([5, 6, 7, 8], SamplingParams(temperature=0.8, seed=4, max_tokens=6, n=2)),
             ("hello world", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop=greedy.text[2:5])),
             ("hello world", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                            stop_token_ids=[greedy.token_ids[4]]))]

    async def run(prompt, params, request_id):
        outs = []
        async for out in async_llm.generate(prompt, params, request_id):
            outs.append((out, [list(s.token_ids) for s in out.outputs]))
        return outs

    async def main():
        return await asyncio.gather(*(run(p, sp, f"v{i}") for i, (p, sp) in enumerate(cases)))

    results = asyncio.run(main())
    assert [r[-1][0].stop_reason for r in results] == [None, None, greedy.text[2:5], greedy.token_ids[4]]
    for (prompt, params), outs in zip(cases, results):
        expected = llm.generate([prompt], params, use_tqdm=False)[0]
        last = outs[-1][0]
        assert [o.finished for o, _ in outs] == [False] * (len(outs) - 1) + [True]
        assert last.request_id == outs[0][0].request_id and last.prompt == (prompt if isinstance(prompt, str)
                                                                              else None)
        assert last.prompt_token_ids == expected.prompt_token_ids and last.num_cached_tokens == 0  # < a KV block
        assert all(o.num_cached_tokens is None for o, _ in outs if not o.outputs[0].finished())  # known at its end
        times = [(o.metrics.arrival_time, o.metrics.first_token_time, o.metrics.finished_time) for o, _ in outs]
        assert all(t[2] is None for t in times[:-1]) and times[-1][0] < times[-1][1] <= times[-1][2]
        assert len({t[:2] for t in times}) == 1  # the first output already had its first token
        exact = ("text", "token_ids", "finish_reason", "stop_reason", "index")
        assert set(last) == set(expected) and last.finished and last.text == expected.text
        for got, want in zip(last.outputs, expected.outputs, strict=True):  # logprobs: the batches differed
            assert {k: got[k] for k in exact} == {k: want[k] for k in exact}
            assert close_logprobs(got.logprobs, want.logprobs)
            assert (got.cumulative_logprob is None) == (want.cumulative_logprob is None)
            assert got.cumulative_logprob is None or abs(got.cumulative_logprob - want.cumulative_logprob) < 1e-4
        assert close_logprobs(last.prompt_logprobs, expected.prompt_logprobs)
        for out, snapshot in outs:  # prefixes, and unchanged by the steps after them
            assert [s.token_ids for s in out.outputs] == snapshot
            for s, final in zip(out.outputs, last.outputs):
                assert final.token_ids[:len(s.token_ids)] == s.token_ids and final.text.startswith(s.text)
    assert idle(llm)

    async def close_early():
        outputs = async_llm.generate("hello", LONG, "v-closed")
        first = await outputs.__anext__()
        await outputs.aclose()
        return first, blocks_in_use(llm)

    first, in_use = asyncio.run(close_early())
    assert not first.finished and in_use == 0  # closing aborted it at once

    async def aborted():
        outs = []
        async for out in async_llm.generate([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True, n=2), "v-ab"):
            outs.append(out)
            if len(outs) == 3:
                async_llm.abort("v-ab")
        return outs

    outs = asyncio.run(aborted())
    assert outs[-1].finished and [s.finish_reason for s in outs[-1].outputs] == ["abort", "abort"]
    assert all(len(s.token_ids) < 200 for s in outs[-1].outputs) and idle(llm)


def test_vllm_output_kinds_delta_and_final_only(llm):
    """SamplingParams.output_kind (vLLM's RequestOutputKind): DELTA outputs hold only what each step added to the
    sample that advanced, and add up to the cumulative result; FINAL_ONLY yields one output, the result."""
    from nanovllm import RequestOutputKind
    async_llm = AsyncLLM(llm=llm)
    base = dict(temperature=0.8, seed=7, max_tokens=6, ignore_eos=True, n=2, logprobs=1, prompt_logprobs=1)
    expected = llm.generate(["paris is"], SamplingParams(**base), use_tqdm=False)[0]

    async def run(kind, request_id):
        return [o async for o in async_llm.generate("paris is", SamplingParams(**base, output_kind=kind), request_id)]

    deltas = asyncio.run(run(RequestOutputKind.DELTA, "k-delta"))
    assert len(deltas) == 12 and all(len(o.outputs) == 1 for o in deltas)  # 2 samples x 6 steps
    assert [o.finished for o in deltas] == [False] * 11 + [True]
    assert deltas[0].prompt_logprobs is not None and all(o.prompt_logprobs is None for o in deltas[1:])
    for i, want in enumerate(expected.outputs):
        mine = [o.outputs[0] for o in deltas if o.outputs[0].index == i]
        assert [t for d in mine for t in d.token_ids] == want.token_ids
        assert "".join(d.text for d in mine) == want.text and all(len(d.logprobs) == 1 for d in mine)
        assert abs(mine[-1].cumulative_logprob - want.cumulative_logprob) < 1e-4
        assert mine[-1].finish_reason == "length" and all(d.finish_reason is None for d in mine[:-1])
    (final,) = asyncio.run(run(2, "k-final"))  # the value works too
    assert final.finished and [s.token_ids for s in final.outputs] == [s.token_ids for s in expected.outputs]
    assert close_logprobs(final.prompt_logprobs, expected.prompt_logprobs) and idle(llm)
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind=3)


def test_reset_prefix_cache_from_async_code(llm):
    async_llm = AsyncLLM(llm=llm)
    prompt = list(range(300, 340))
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

    async def main():
        outs = [[o async for o in async_llm.generate(prompt, params, f"reset-{i}")][-1] for i in range(2)]
        reset = await async_llm.reset_prefix_cache()
        cold = [o async for o in async_llm.generate(prompt, params, "reset-2")][-1]
        return outs, reset, cold
    (first, second), reset, cold = asyncio.run(main())
    assert (first.num_cached_tokens, second.num_cached_tokens, reset, cold.num_cached_tokens) == (0, 32, True, 0)
    assert cold.outputs[0].token_ids == first.outputs[0].token_ids
