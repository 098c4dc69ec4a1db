"""The architecture registry: every supported name maps to its model; anything else is refused clearly."""
import json
import os
import shutil

import pytest

from nanovllm import LLM
from nanovllm.models.registry import ARCHITECTURES

SMALL = dict(backend="cpu_ref", num_kvcache_blocks=64, max_model_len=256)


def edit_config(src: str, dst, **changes) -> str:
    path = shutil.copytree(src, os.path.join(str(dst), "model"))
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def test_supported_architectures():
    assert sorted(ARCHITECTURES) == ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]


@pytest.mark.parametrize("fixture, module", [("tiny_qwen3", "qwen3"), ("tiny_qwen2", "qwen2"), ("tiny_llama", "llama")])
def test_architecture_from_config(fixture, module, request):
    llm = LLM(request.getfixturevalue(fixture), **SMALL)
    assert type(llm.engine.runner.model).__module__ == f"nanovllm.models.{module}"


def test_unsupported_architecture_lists_the_supported(tiny_llama, tmp_path):
    path = edit_config(tiny_llama, tmp_path, architectures=["MistralForCausalLM"])
    with pytest.raises(ValueError, match=r"unsupported architecture \['MistralForCausalLM'\]; supported: "
                                         r"LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        LLM(path, **SMALL)


def test_unsupported_activation_is_refused(tiny_llama, tmp_path):
    path = edit_config(tiny_llama, tmp_path, hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported by LlamaForCausalLM; supported: silu"):
        LLM(path, **SMALL)
