"""The fused `rotary.qk_store` op (q/k norm + rotary + KV store) through the engine on the CPU.

A plugin adds the reference composition as a kernel of its own to cpu_ref, so the model takes the fused path
there: the tokens must be the two-op path's (whole prompts, chunked prefill, prefix-cache hits, decode, an FP8
cache), decode must not ask for the rotated k, and naming a part's kernel must run the parts.
"""
import types

import pytest

import nanovllm
from nanovllm import LLM, SamplingParams
from nanovllm.backends.cpu_ref import elementwise
from nanovllm.backends.cpu_ref import plugin as cpu_ref
from nanovllm.core import engine as engine_module
from nanovllm.core.plugins import load_plugins

OPTIONS = dict(backend="cpu_ref", num_kvcache_blocks=64, max_model_len=256, max_num_seqs=4,
               max_num_batched_tokens=64)  # a 70-token prompt is prefilled in two chunks
SHARED = list(range(3, 35))  # two full blocks of 16: the second request hits the prefix cache
PROMPTS = [SHARED + [40, 41, 42], SHARED + [50, 51], list(range(100, 170)), [7, 8, 9]]
SETTINGS = {"backends": {"order": ["cpu_ref"], "disabled": []}}


def fusing_plugin(calls: list[bool]):
    """A plugin whose `rotary.qk_store` kernel is the reference composition, recording each call's return_k."""
    m = types.ModuleType("fuser")
    m.NANOVLLM_PLUGIN_API = (1, 0)

    def composed(positions, q, k, v, cos_sin_cache, q_weight, k_weight, eps, k_cache, v_cache, slot_mapping,
                 return_k, k_scale=None, v_scale=None):
        calls.append(return_k)
        return elementwise.rotary_qk_store(positions, q, k, v, cos_sin_cache, q_weight, k_weight, eps, k_cache,
                                           v_cache, slot_mapping, return_k, k_scale, v_scale)

    @nanovllm.hookimpl
    def nanovllm_register_kernels(registry):
        registry.register("rotary.qk_store", "cpu_ref", "composed", composed, priority=10)
    m.nanovllm_register_kernels = nanovllm_register_kernels
    return m


def generate(model, **options):
    llm = LLM(model, **OPTIONS, **options)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = [llm.generate([p], params, use_tqdm=False)[0]["token_ids"] for p in PROMPTS[:2]]  # cache, then hit
    outputs += [o["token_ids"] for o in llm.generate(PROMPTS[2:], params, use_tqdm=False)]
    return outputs, llm


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("model", ["tiny_qwen3", "tiny_llama"])  # with and without the per-head q/k norm
def test_fused_path_gives_the_two_op_tokens(model, kv_cache_dtype, request, monkeypatch):
    folder = request.getfixturevalue(model)
    expected, llm = generate(folder, kv_cache_dtype=kv_cache_dtype)
    assert not llm.kernel_plan().calls("rotary.qk_store")  # the reference alone: the parts run
    calls: list[bool] = []
    plugins = load_plugins(SETTINGS, modules={"cpu_ref": cpu_ref, "fuser": fusing_plugin(calls)})
    monkeypatch.setattr(engine_module, "load_plugins", lambda: plugins)
    calls.clear()
    fused, llm = generate(folder, kv_cache_dtype=kv_cache_dtype)
    assert llm.kernel_plan().choices["rotary.qk_store"].impl.name == "composed"
    assert llm.engine.scheduler.block_manager.num_prefix_hit_tokens >= 32  # the second prompt hit the cache
    assert fused == expected
    assert True in calls and False in calls  # prefill steps ask for the rotated k, decode steps do not


def test_naming_a_part_runs_the_parts(tiny_qwen3, monkeypatch):
    calls: list[bool] = []
    plugins = load_plugins(SETTINGS, modules={"cpu_ref": cpu_ref, "fuser": fusing_plugin(calls)})
    monkeypatch.setattr(engine_module, "load_plugins", lambda: plugins)
    _, llm = generate(tiny_qwen3, kernels={"kv_cache.store": "torch_index"})
    choice = llm.kernel_plan().choices["rotary.qk_store"]
    assert choice.impl.name == "torch" and choice.why == "kernels= names kv_cache.store: its parts run"
    assert "not called: the model runs rotary.qk, then kv_cache.store" in llm.kernel_plan().table()
    assert calls == []
