"""The safetensors loader: sharded checkpoints, dtypes, and an error naming the file or tensor for each fault."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovllm import LLM, SamplingParams
from tests.conftest import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
SMALL = dict(backend="cpu_ref", num_kvcache_blocks=64, max_model_len=256)


def copy_model(src: str, dst) -> str:
    return shutil.copytree(src, os.path.join(str(dst), "model"))


def greedy(path: str, **options) -> list[list[int]]:
    llm = LLM(path, **{**SMALL, **options})
    return [o["token_ids"] for o in llm.generate(random_prompts(3, 512, (1, 40), seed=7), GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def sharded_llama(tiny_llama, tmp_path_factory) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = str(tmp_path_factory.mktemp("sharded"))
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(path, max_shard_size="200KB")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(path)
    return path


def test_sharded_checkpoint_gives_the_same_tokens(tiny_llama, sharded_llama):
    shards = [f for f in os.listdir(sharded_llama) if f.endswith(".safetensors")]
    assert len(shards) > 2 and os.path.isfile(os.path.join(sharded_llama, "model.safetensors.index.json"))
    assert greedy(sharded_llama) == greedy(tiny_llama)


def test_missing_shard_names_the_file(sharded_llama, tmp_path):
    path = copy_model(sharded_llama, tmp_path)
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(FileNotFoundError, match=shard):
        LLM(path, **SMALL)


def test_missing_weights_file_names_the_folder(tiny_llama, tmp_path):
    path = copy_model(tiny_llama, tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights in .*model"):
        LLM(path, **SMALL)


def test_truncated_file_names_the_file(tiny_llama, tmp_path):
    path = copy_model(tiny_llama, tmp_path)
    weights = os.path.join(path, "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) // 2)
    with pytest.raises(RuntimeError, match="model.safetensors.*truncated or corrupt"):
        LLM(path, **SMALL)


def test_missing_tensor_is_named(tiny_llama, tmp_path):
    path = copy_model(tiny_llama, tmp_path)
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks tensors: model.layers.1.self_attn.k_proj.weight; re-download"):
        LLM(path, **SMALL)


def test_unexpected_tensor_is_named(tiny_llama, tmp_path):
    path = copy_model(tiny_llama, tmp_path)
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="tensor model.layers.0.self_attn.extra.weight has no place"):
        LLM(path, **SMALL)


@pytest.fixture(scope="module")
def bf16_llama(tiny_llama, tmp_path_factory) -> str:
    path = copy_model(tiny_llama, tmp_path_factory.mktemp("bf16"))
    weights = os.path.join(path, "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.pop("torch_dtype", None)
    config["dtype"] = "bfloat16"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


@pytest.mark.parametrize("dtype, expected", [("auto", torch.bfloat16), ("float32", torch.float32), (None, torch.float32)])
def test_checkpoint_dtype_or_requested_dtype(bf16_llama, dtype, expected):
    llm = LLM(bf16_llama, dtype=dtype, **SMALL)
    model = llm.engine.runner.model
    assert {p.dtype for p in model.parameters()} == {expected}
    stored = load_file(os.path.join(bf16_llama, "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, stored.to(expected))


def edited_weights(src: str, dst, name: str, make) -> str:
    """A copy of the checkpoint whose tensor `name` is replaced by make(old tensor)."""
    path = copy_model(src, dst)
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    tensors[name] = make(tensors[name])
    save_file(tensors, weights, metadata={"format": "pt"})
    return path


MISFITS = [  # the adversarial pass's cases: each used to load (truncated, broadcast, cast) or fail without a name
    ("larger than its parameter", "model.layers.0.mlp.down_proj.weight", lambda t: torch.zeros(t.shape[0] + 1, t.shape[1]),
     r"tensor model.layers.0.mlp.down_proj.weight has shape \[129, 384\], but parameter "
     r"model.layers.0.mlp.down_proj.weight expects \[128, 384\]"),
    ("a norm of shape [1]", "model.norm.weight", lambda t: torch.ones(1),
     r"tensor model.norm.weight has shape \[1\], but parameter model.norm.weight expects \[128\]"),
    ("smaller, into a merged parameter", "model.layers.1.self_attn.k_proj.weight", lambda t: t[:-1],
     r"tensor model.layers.1.self_attn.k_proj.weight has shape \[63, 128\], but parameter "
     r"model.layers.1.self_attn.qkv_proj.weight \(part 'k'\) expects \[64, 128\]"),
    ("an int64 embedding", "model.embed_tokens.weight", lambda t: t.to(torch.int64),
     r"tensor model.embed_tokens.weight is torch.int64, but parameter model.embed_tokens.weight holds torch.float32"),
    ("an LM head too narrow", "lm_head.weight", lambda t: t[:, :-2].contiguous(),
     r"tensor lm_head.weight has shape \[512, 126\], but parameter lm_head.weight expects \[512, 128\]"),
]


@pytest.mark.parametrize("name, make, message", [c[1:] for c in MISFITS], ids=[c[0] for c in MISFITS])
def test_tensor_that_does_not_fit_its_parameter_is_refused_naming_both(tiny_llama, tmp_path, name, make, message):
    with pytest.raises(ValueError, match=message):
        LLM(edited_weights(tiny_llama, tmp_path, name, make), **SMALL)
