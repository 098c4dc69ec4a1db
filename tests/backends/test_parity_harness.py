"""The harness catches what it is for: wrong shapes, reads past a context, writes to padding slots."""
import pytest
import torch

from nanovllm.backends.cpu_ref import attention, kv_store
from nanovllm.backends.cpu_ref.plugin import CpuRefBackend
from nanovllm.core.registry import KernelImpl
from nanovllm.testing.layouts import ParityCase
from nanovllm.testing.parity import check_kernel, check_kernel_parity

CPU = torch.device("cpu")


def impl(op, fn):
    return KernelImpl(op, "third_party", "buggy", fn)


def test_wrong_shape_is_reported_with_both_shapes():
    def decode_first_head_only(q, k_cache, v_cache, meta, scale):
        return attention.decode_attention(q, k_cache, v_cache, meta, scale)[:, :1]
    with pytest.raises(AssertionError, match=r"third_party/buggy \(attention.decode.*returned shape \(3, 1, 64\), "
                                             r"expected \(3, 4, 64\)"):
        check_kernel(impl("attention.decode", decode_first_head_only), ParityCase(), CPU)


def test_reading_past_the_context_shows_as_nan():
    def decode_one_token_too_many(q, k_cache, v_cache, meta, scale):
        meta = type(meta)(meta.context_lens + 1, meta.block_tables, meta.max_context_len + 1)
        return attention.decode_attention(q, k_cache, v_cache, meta, scale)
    with pytest.raises(AssertionError, match="elements differ"):
        check_kernel(impl("attention.decode", decode_one_token_too_many), ParityCase(), CPU)


def test_writing_padding_slots_is_caught():
    def store_padding_too(key, value, k_cache, v_cache, slot_mapping):
        kv_store.store_kvcache(key, value, k_cache, v_cache, slot_mapping.clamp(min=0))
    with pytest.raises(AssertionError, match="slots < 0 must stay untouched"):
        check_kernel(impl("kv_cache.store", store_padding_too), ParityCase(), CPU)


def test_prefill_that_ignores_the_cached_prefix_is_caught():
    def prefill_chunk_only(q, k, v, k_cache, v_cache, meta, scale):
        return attention.prefill_attention(q, k, v, k_cache, v_cache, type(meta)(
            meta.cu_seqlens_q, meta.cu_seqlens_q, meta.max_seqlen_q, meta.max_seqlen_q, None), scale)
    with pytest.raises(AssertionError, match="chunks after a cached prefix"):
        check_kernel(impl("attention.prefill", prefill_chunk_only), ParityCase(), CPU)


def test_sampler_that_ignores_top_k_is_caught():
    from nanovllm.core import sampler

    def sample_without_filters(logits, params):
        params = sampler.SamplingTensors(params.temperatures, all_greedy=params.all_greedy)
        return sampler.sample(logits, params)
    with pytest.raises(AssertionError, match="top-k/top-p/min-p exclude"):
        check_kernel(impl("sampler", sample_without_filters), ParityCase(), CPU)


def test_kernel_that_raises_is_a_parity_failure():
    def crashes(q, k_cache, v_cache, meta, scale):
        raise IndexError("index 7 is out of bounds")
    with pytest.raises(AssertionError, match="raised on .*IndexError: index 7"):
        check_kernel(impl("attention.decode", crashes), ParityCase(), CPU)


def test_cases_the_check_rejects_are_not_run():
    picky = KernelImpl("attention.decode", "cpu_ref", "picky", attention.decode_attention,
                       check=lambda q: [] if q.head_dim == 48 else ["needs head_dim 48"])
    assert check_kernel_parity(CpuRefBackend(), picky) == 1


def test_matrix_cells_carry_the_reason_they_cannot_run():
    from nanovllm.backends.cpu_ref import plugin as cpu_ref
    from nanovllm.core.plugins import load_plugins
    from nanovllm.testing.parity import parity_cases
    from tests.core.test_plugins import SETTINGS, NullBackend, plugin_module

    def kernels(registry):
        registry.register("attention.decode", "null", "any", attention.decode_attention)
        registry.register("attention.prefill", "null", "fp8_only", attention.prefill_attention,
                          check=lambda q: ["needs float8 inputs"])
        registry.register("attention.decode", "ghost", "vendor", attention.decode_attention)
    mods = {"cpu_ref": cpu_ref, "n": plugin_module("n", [NullBackend(ok=False)], kernels)}
    cells = {str(c): c.skip_reason for c in parity_cases(load_plugins(SETTINGS, modules=mods))}
    assert cells["null-attention.decode-any"] == "null: the null device is switched off"
    assert cells["ghost-attention.decode-vendor"] == "ghost: no installed plugin offers this backend"
    assert cells["cpu_ref-attention.decode-torch_loop"] is None
    mods["n"] = plugin_module("n", [NullBackend(ok=True)], kernels)
    cells = {str(c): c.skip_reason for c in parity_cases(load_plugins(SETTINGS, modules=mods))}
    assert "rejects every parity case" in cells["null-attention.prefill-fp8_only"]
    assert "needs float8 inputs" in cells["null-attention.prefill-fp8_only"]
