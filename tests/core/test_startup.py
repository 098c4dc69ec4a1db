"""Start-up in one place: resolve() reads the config and never writes it; a worker rebuilds rank 0's plan."""
import dataclasses

import pytest
import torch
from transformers import Qwen3Config

from nanovllm.backends.cpu_ref import plugin as cpu_ref
from nanovllm.core.config import EngineConfig
from nanovllm.core.plugins import load_plugins
from nanovllm.core.startup import Resolved, from_pinned, pinned, resolve

SETTINGS = {"backends": {"order": ["cpu_ref"], "disabled": []}}
HF = Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=1,
                 intermediate_size=128, vocab_size=100, max_position_embeddings=512, architectures=["Qwen3ForCausalLM"])


def plugins():
    return load_plugins(SETTINGS, modules={"cpu_ref": cpu_ref})


def test_resolve_is_frozen_and_leaves_the_config_alone():
    config = EngineConfig(model="", hf_config=HF, max_model_len=4096)
    before = dataclasses.asdict(config)
    resolved = resolve(config, plugins())
    assert dataclasses.asdict(config) == before  # nothing written back
    assert isinstance(resolved, Resolved) and resolved.backend.name == "cpu_ref"
    assert (resolved.dtype, resolved.block_size, resolved.max_model_len) == (torch.float32, 16, 512)
    assert resolved.plan.query.head_dim == 16 and resolved.plan.query.num_kv_heads == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.block_size = 32


def test_backend_refuses_a_dtype_once_with_the_fix():
    config = EngineConfig(model="", hf_config=HF, dtype="float16")
    config.dtype = torch.int8  # bypass the config's own parsing: the backend must still refuse it
    with pytest.raises(ValueError, match="dtype=torch.int8 is not supported by backend 'cpu_ref'; supported"):
        resolve(config, plugins())


def test_worker_rebuilds_rank_zeros_plan_by_name_without_resolving():
    config = EngineConfig(model="", hf_config=HF, tensor_parallel_size=2, kernels={"sampler": "torch"})
    resolved = resolve(config, plugins())
    again = from_pinned(pinned(resolved), plugins())
    assert {op: c.impl.full_name for op, c in again.plan.choices.items()} == {
        op: c.impl.full_name for op, c in resolved.plan.choices.items()}
    assert again.plan.choices["sampler"].why == "named by the user"  # rank 0's reason travels with the choice
    assert again.plan.query.num_heads == 2  # each rank's share of the heads
    with pytest.raises(RuntimeError, match="no backend 'cpu_ref'"):
        from_pinned(pinned(resolved), load_plugins(SETTINGS, modules={}))


def test_memory_knobs_are_backend_options_checked_at_start_up():
    everything = load_plugins(SETTINGS)  # the built-in backends: cuda declares gpu_memory_utilization
    portable = EngineConfig(model="", hf_config=HF, backend="cpu_ref",
                            backend_options={"gpu_memory_utilization": 0.5, "cpu_memory_fraction": 0.2})
    resolved = resolve(portable, everything)  # another backend's option is checked, then unused
    assert resolved.backend.option(portable, "cpu_memory_fraction") == 0.2
    assert resolved.backend.option(EngineConfig(model="", hf_config=HF), "cpu_memory_fraction") == 0.3
    for on in (True, False, 0, 1):  # a switch: --backend-option fold_norms=0 gives the int
        resolve(EngineConfig(model="", hf_config=HF, backend_options={"fold_norms": on}), everything)
    for options, message in [({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization=1.5 is invalid.*\(0, 1\]"),
                              ({"fold_norms": 2}, r"fold_norms=2 is invalid.*on or off"),
                              ({"fold_norms": "yes"}, r"fold_norms='yes' is invalid"),
                              ({"fold_norms": 1.0}, r"fold_norms=1.0 is invalid"),
                              ({"max_len": 5}, "unknown engine option.*max_len.*gpu_memory_utilization"),
                              ({"block_size": 16, "trust_remote_code": True},  # vLLM's names get a hint each
                               r"block_size, trust_remote_code; block_size: nanovllm calls it kvcache_block_size; "
                               r"trust_remote_code: .*drop it; known: ")]:
        with pytest.raises(ValueError, match=message):
            resolve(EngineConfig(model="", hf_config=HF, backend_options=options), everything)
