"""tensor_parallel_size=2 on cpu_ref over gloo: the same greedy tokens as one rank and as HF, and a clean
shutdown (no child process, no shared-memory segment) whether generate ends, raises or a worker dies."""
import multiprocessing
import os
import signal
import time

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.testing.tiny_models import make_tiny_model
from tests.conftest import random_prompts
from tests.e2e.hf_reference import hf_greedy, load_hf

MODELS = ["tiny_qwen3"]  # llama and qwen2 join once their architectures land
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
OPTIONS = dict(backend="cpu_ref", dtype="float32", kvcache_block_size=16, max_model_len=256)


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.fixture
def no_leaks():
    """Fails the test if it leaves a child process or a new /dev/shm segment behind."""
    before = shm_entries()
    yield
    children = multiprocessing.active_children()
    assert not children, f"processes left behind: {children}"
    assert shm_entries() - before == set()


def tokens(outputs) -> list[list[int]]:
    return [o["token_ids"] for o in outputs]


@pytest.mark.parametrize("model_fixture", MODELS)
def test_tp2_equals_tp1_and_hf(model_fixture, request, no_leaks):
    """Chunked prefill too (max_num_batched_tokens=64): steps that sample nothing gather empty logits."""
    path = request.getfixturevalue(model_fixture)
    prompts = random_prompts(4, 512, (1, 100), seed=11)
    single = tokens(LLM(path, num_kvcache_blocks=128, **OPTIONS).generate(prompts, GREEDY, use_tqdm=False))
    with LLM(path, num_kvcache_blocks=128, tensor_parallel_size=2, max_num_batched_tokens=64,
             max_num_seqs=8, **OPTIONS) as llm:
        assert llm.engine.runner.num_blocks == 128
        assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == single
    hf = load_hf(path)
    assert single == [hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts]


def test_tp2_with_fewer_kv_heads_than_ranks(tmp_path_factory, no_leaks):
    path = make_tiny_model(str(tmp_path_factory.mktemp("qwen3_kv1")), "qwen3", num_kv_heads=1)
    prompts = random_prompts(3, 512, (1, 80), seed=12)
    with LLM(path, num_kvcache_blocks=64, tensor_parallel_size=2, **OPTIONS) as llm:
        assert llm.engine.runner.attention_layers[0].num_kv_heads == 1
        outputs = tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    hf = load_hf(path)
    assert outputs == [hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts]


@pytest.mark.parametrize("model_fixture", MODELS)
def test_tp2_preemption_same_tokens(model_fixture, request, no_leaks):
    path = request.getfixturevalue(model_fixture)
    prompts = random_prompts(8, 512, (1, 120), seed=3)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    single = tokens(LLM(path, num_kvcache_blocks=256, **OPTIONS).generate(prompts, params, use_tqdm=False))
    with LLM(path, num_kvcache_blocks=18, tensor_parallel_size=2, **OPTIONS) as llm:
        outputs = tokens(llm.generate(prompts, params, use_tqdm=False))
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.scheduler.block_manager.num_free_blocks == 18
    assert outputs == single


def test_killed_worker_is_an_error_on_rank_0(tiny_qwen3, no_leaks):
    llm = LLM(tiny_qwen3, num_kvcache_blocks=64, tensor_parallel_size=2, **OPTIONS)
    os.kill(llm.engine.workers.pids[0], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="worker rank 1 .* died"):
        llm.generate(random_prompts(2, 512, (1, 40), seed=13), GREEDY, use_tqdm=False)
    assert time.monotonic() - start < 10
    llm.close()


def test_worker_killed_mid_generate_is_an_error_on_rank_0(tiny_qwen3, no_leaks):
    llm = LLM(tiny_qwen3, num_kvcache_blocks=64, tensor_parallel_size=2, **OPTIONS)
    runner, pid = llm.engine.runner, llm.engine.workers.pids[0]
    execute = runner.execute

    def execute_then_kill(*args):  # the worker dies while rank 0 is inside the forward's collectives
        if runner.num_steps_run == 2:
            os.kill(pid, signal.SIGKILL)
        runner.num_steps_run += 1
        return execute(*args)

    runner.num_steps_run, runner.execute = 0, execute_then_kill
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="worker rank 1 .* died"):
        llm.generate(random_prompts(2, 512, (1, 40), seed=14), GREEDY, use_tqdm=False)
    assert time.monotonic() - start < 20
    del llm  # __del__ closes


def test_interrupted_generate_shuts_workers_down(tiny_qwen3, no_leaks):
    """Ctrl-C (KeyboardInterrupt) inside a step stops the workers at once; the LLM then refuses work."""
    llm = LLM(tiny_qwen3, num_kvcache_blocks=64, tensor_parallel_size=2, **OPTIONS)
    pids = llm.engine.workers.pids

    def interrupted(*args):
        raise KeyboardInterrupt

    llm.engine.runner.sampler = interrupted
    with pytest.raises(KeyboardInterrupt):
        llm.generate(random_prompts(2, 512, (1, 40), seed=15), GREEDY, use_tqdm=False)
    assert not multiprocessing.active_children()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
