"""Rank 0 watches its workers whenever it waits on them — the start-up rendezvous and every step's collectives:
a worker that fails, dies early or stops (SIGSTOP) ends the wait within seconds with its own error, and Ctrl-C
interrupts it. A script without its `__main__` guard is told what to add."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.core.parallel import worker_group
from tests.conftest import random_prompts
from tests.e2e import tp_faults
from tests.e2e.test_tensor_parallel import no_leaks  # noqa: F401  (fixture)

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
OPTIONS = dict(backend="cpu_ref", dtype="float32", kvcache_block_size=16, max_model_len=256, num_kvcache_blocks=64,
               tensor_parallel_size=2)


def test_worker_failing_during_the_rendezvous_fails_rank_0_with_its_error(tiny_qwen3, monkeypatch, no_leaks):
    monkeypatch.setattr(worker_group, "worker_main", tp_faults.fails_before_the_rendezvous)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)worker rank 1 .* died with exit code 1:.*"
                                           r"this worker process has no backend 'backend_of_rank_1_that_does_not_exist'"):
        LLM(tiny_qwen3, **OPTIONS)
    assert time.monotonic() - start < 30  # was the gloo rendezvous timeout: 300 s


def test_worker_dying_before_it_starts_points_at_the_main_guard(tiny_qwen3, monkeypatch, no_leaks):
    monkeypatch.setattr(worker_group, "worker_main", tp_faults.exits_before_starting)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)worker rank 1 .* died with exit code 3.*died while starting, "
                                           r"before running any nanovllm code.*if __name__ == \"__main__\":"):
        LLM(tiny_qwen3, **OPTIONS)
    assert time.monotonic() - start < 30


def test_stopped_worker_fails_generate_within_seconds(tiny_qwen3, monkeypatch, no_leaks):
    monkeypatch.setenv("NANOVLLM_TP_HEARTBEAT_TIMEOUT", "2")
    llm = LLM(tiny_qwen3, **OPTIONS)
    pid = llm.engine.workers.pids[0]
    os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=rf"worker rank 1 \(pid {pid}\) has sent no heartbeat for \d+ s: it is "
                                               r"stopped \(SIGSTOP, a debugger\) or hung"):
            llm.generate(random_prompts(2, 512, (1, 40), seed=16), GREEDY, use_tqdm=False)
        assert time.monotonic() - start < 20  # was the collective timeout: 300 s
        with pytest.raises(RuntimeError, match="the engine is shut down"):
            llm.generate([[5]], GREEDY, use_tqdm=False)
    finally:
        llm.close()


def test_ctrl_c_interrupts_a_wait_on_a_stopped_worker(tiny_qwen3, monkeypatch, no_leaks):
    monkeypatch.setenv("NANOVLLM_TP_HEARTBEAT_TIMEOUT", "120")
    llm = LLM(tiny_qwen3, **OPTIONS)
    os.kill(llm.engine.workers.pids[0], signal.SIGSTOP)
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT))
    start = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate(random_prompts(2, 512, (1, 40), seed=17), GREEDY, use_tqdm=False)
        assert time.monotonic() - start < 20
    finally:
        timer.cancel()
        llm.close()


def test_script_without_main_guard_is_told_what_to_add(tiny_qwen3, tmp_path):
    script = tmp_path / "no_guard.py"
    script.write_text(textwrap.dedent(f"""
        from nanovllm import LLM
        llm = LLM({tiny_qwen3!r}, backend="cpu_ref", tensor_parallel_size=2, num_kvcache_blocks=16, max_model_len=64)
        print(llm.generate([[5, 6]]))
    """))
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    start = time.monotonic()
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode != 0
    assert f"the script {script} has no `if __name__ == \"__main__\":` guard; put the code that creates the " \
           f"LLM" in run.stderr
    assert time.monotonic() - start < 120
