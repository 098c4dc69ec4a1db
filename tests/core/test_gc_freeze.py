"""Start-up's objects are frozen out of full collections while an engine is open, given back when the last
engine closes, and an engine left open at exit closes without an error."""
import gc
import subprocess
import sys

from nanovllm import LLM, SamplingParams
from nanovllm.core.gc_freeze import StartUpFreeze


def test_the_last_engine_to_close_unfreezes():
    freeze = StartUpFreeze()
    try:
        freeze.freeze()
        assert gc.get_freeze_count() > 0
        freeze.freeze()  # a second engine: everything is collected and frozen again
        freeze.release()
        assert gc.get_freeze_count() > 0  # one engine is still open
        freeze.release()
        assert gc.get_freeze_count() == 0
        freeze.release()  # a close too many changes nothing
        assert freeze.open_engines == 0
    finally:
        gc.unfreeze()


def test_an_engine_freezes_after_start_up_and_releases_on_close(tiny_qwen3, monkeypatch):
    from nanovllm.core import engine
    freeze = StartUpFreeze()
    monkeypatch.setattr(engine, "START_UP_FREEZE", freeze)
    try:
        llm = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=64, max_model_len=256)
        assert freeze.open_engines == 1 and gc.get_freeze_count() > 0
        assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3), use_tqdm=False)[0]["token_ids"]) == 3
        llm.close()
        llm.close()  # twice: released once
        assert freeze.open_engines == 0 and gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


def test_an_engine_open_at_exit_closes_quietly(tiny_qwen3):
    script = (f"from nanovllm import LLM, SamplingParams\n"
              f"llm = LLM({tiny_qwen3!r}, backend='cpu_ref', num_kvcache_blocks=64, max_model_len=256)\n"
              f"print(llm.generate([[1, 2]], SamplingParams(max_tokens=2), use_tqdm=False)[0]['token_ids'])\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_an_engine_collected_during_another_start_up_releases_without_a_deadlock():
    """An unclosed engine caught in a reference cycle (e.g. through an exception's traceback) is closed by its
    `__del__` when a collection finds it, and the next engine's start-up collects: `release` then runs inside
    `freeze`, in the same thread. It must not wait for the lock `freeze` holds (a whole CI run hung there)."""
    import threading
    freeze = StartUpFreeze()

    released_in = []

    class Unclosed:  # what an LLM left open does when collected
        def __del__(self):
            released_in.append(threading.current_thread())
            freeze.release()

    gc.disable()  # no automatic collection may find the cycle first, outside freeze()
    try:
        freeze.freeze()
        cycle = Unclosed()
        cycle.me = cycle
        del cycle
        starting = threading.Thread(target=freeze.freeze, daemon=True)  # a deadlock would hang the test forever
        starting.start()
        starting.join(timeout=30)
        assert not starting.is_alive(), "freeze() deadlocked on a release() from a collected object's __del__"
        assert released_in == [starting]  # the case under test: released inside the other start-up's collection
        assert freeze.open_engines == 1 and gc.get_freeze_count() > 0  # one closed, one started
    finally:
        gc.enable()
        gc.unfreeze()
