"""Shadow verification catches a wrong kernel, demotes it, and the run then matches cpu_ref (issue 12, feature 4)."""
import types

import pytest

import nanovllm
from nanovllm import LLM, SamplingParams
from nanovllm.backends.cpu_ref import attention as ref_attention
from nanovllm.backends.cpu_ref import plugin as cpu_ref
from nanovllm.core import engine as engine_module
from nanovllm.core.plugins import load_plugins
from tests.conftest import debug_messages

OPTIONS = dict(num_kvcache_blocks=64, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=512)
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
SETTINGS = {"backends": {"order": ["cpu_ref"], "disabled": []}}


def off_by_a_bit_decode(q, k_cache, v_cache, meta, scale):
    return ref_attention.decode_attention(q, k_cache, v_cache, meta, scale) + 0.5


def off_by_one_store(key, value, k_cache, v_cache, slot_mapping):
    from nanovllm.backends.cpu_ref.kv_store import store_kvcache
    store_kvcache(key, value, k_cache, v_cache, slot_mapping + (slot_mapping >= 0).long())  # one slot late


def off_by_one_fused_store(positions, q, k, v, cos_sin_cache, q_weight, k_weight, eps, k_cache, v_cache,
                           slot_mapping, return_k):
    from nanovllm.backends.cpu_ref.elementwise import rotary_qk_store
    return rotary_qk_store(positions, q, k, v, cos_sin_cache, q_weight, k_weight, eps, k_cache, v_cache,
                           slot_mapping + (slot_mapping >= 0).long(), return_k)  # one slot late


def wrong_plugin(op, fn):
    m = types.ModuleType("wrong")
    m.NANOVLLM_PLUGIN_API = (1, 0)

    @nanovllm.hookimpl
    def nanovllm_register_kernels(registry):
        registry.register(op, "cpu_ref", "wrong", fn, priority=100)
    m.nanovllm_register_kernels = nanovllm_register_kernels
    return m


def generate(tiny, **options) -> list[list[int]]:
    llm = LLM(tiny, backend="cpu_ref", **OPTIONS, **options)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    return [o["token_ids"] for o in outputs], llm


@pytest.mark.parametrize("op, fn", [("attention.decode", off_by_a_bit_decode), ("kv_cache.store", off_by_one_store),
                                   ("rotary.qk_store", off_by_one_fused_store)])
def test_wrong_kernel_is_caught_demoted_and_the_run_matches_the_reference(tiny_qwen3, monkeypatch, op, fn):
    expected, _ = generate(tiny_qwen3, kernels="reference")
    plugins = load_plugins(SETTINGS, modules={"cpu_ref": cpu_ref, "wrong": wrong_plugin(op, fn)})
    monkeypatch.setattr(engine_module, "load_plugins", lambda: plugins)
    unverified, llm = generate(tiny_qwen3)
    assert llm.kernel_plan().choices[op].impl.name == "wrong" and unverified != expected
    with debug_messages("nanovllm.core.shadow") as messages:
        verified, llm = generate(tiny_qwen3, verify_kernels=3)
    assert verified == expected
    errors = [m for m in messages if "cpu_ref/wrong" in m and "demoted" in m]
    assert len(errors) == 1 and op in errors[0] and "max abs error" in errors[0] and "at shapes (" in errors[0]
    choice = llm.kernel_plan().choices[op]
    assert choice.impl.full_name.startswith("cpu_ref/") and choice.impl.name != "wrong"
    assert choice.why == "demoted cpu_ref/wrong (see skipped)" and choice.rejected[0][0] == "wrong"
    assert choice.rejected[0][1][0].startswith("shadow verification: max abs error")
    assert "demoted cpu_ref/wrong" in llm.kernel_plan().table()


def test_verification_is_off_by_default_and_read_from_the_environment(tiny_qwen3, monkeypatch):
    _, llm = generate(tiny_qwen3)
    assert llm.kernel_plan().wrappers == {}
    monkeypatch.setenv("NANOVLLM_VERIFY_KERNELS", "5")
    _, llm = generate(tiny_qwen3)
    assert set(llm.kernel_plan().wrappers) == {"kv_cache.store", "attention.prefill", "attention.decode", "sampler",
                                               "rotary.qk", "act.silu_mul", "rotary.qk_store", "norm.add_rms"}
    monkeypatch.setenv("NANOVLLM_VERIFY_KERNELS", "often")
    with pytest.raises(ValueError, match="NANOVLLM_VERIFY_KERNELS='often' is invalid"):
        generate(tiny_qwen3)
