"""Start-up's objects are frozen out of full collections while an engine is open, and given back when the last
engine closes."""
import gc

from nanovllm import LLM, SamplingParams
from nanovllm.core import gc_freeze


def test_the_last_engine_to_close_unfreezes(monkeypatch):
    monkeypatch.setattr(gc_freeze, "_open_engines", 0)
    try:
        gc_freeze.freeze_after_start_up()
        assert gc.get_freeze_count() > 0
        gc_freeze.freeze_after_start_up()  # a second engine: everything is collected and frozen again
        gc_freeze.release_on_close()
        assert gc.get_freeze_count() > 0  # one engine is still open
        gc_freeze.release_on_close()
        assert gc.get_freeze_count() == 0
        gc_freeze.release_on_close()  # a close too many changes nothing
        assert gc_freeze._open_engines == 0
    finally:
        gc.unfreeze()


def test_an_engine_freezes_after_start_up_and_releases_on_close(tiny_qwen3, monkeypatch):
    monkeypatch.setattr(gc_freeze, "_open_engines", 0)
    try:
        llm = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=64, max_model_len=256)
        assert gc_freeze._open_engines == 1 and gc.get_freeze_count() > 0
        assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3), use_tqdm=False)[0]["token_ids"]) == 3
        llm.close()
        llm.close()  # twice: released once
        assert gc_freeze._open_engines == 0 and gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
