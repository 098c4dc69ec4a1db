import pytest
import torch

from nanovllm.core.registry import KernelQuery, KernelRegistry
from tests.conftest import debug_messages

OPS = ["attention.decode"]
Q = KernelQuery("cpu", torch.float32, 64, 4, 2, 16)


def decode(q, k_cache, v_cache, meta, scale):
    return q


def registry():
    r = KernelRegistry()
    r.register("attention.decode", "cpu_ref", "ref", decode)
    r.register("attention.decode", "x", "slow", decode, priority=1)
    r.register("attention.decode", "x", "fast", decode, priority=5, check=lambda q: ["needs head_dim 128"] if q.head_dim != 128 else [])
    r.register("attention.decode", "x", "mid", decode, priority=3)
    return r


def test_priority_then_checks():
    choice = registry().resolve("x", Q, ops=OPS).choices["attention.decode"]
    assert choice.impl.name == "mid" and choice.rejected == (("fast", ("needs head_dim 128",)),)


def test_preferences_come_first():
    choice = registry().resolve("x", Q, ops=OPS, preferences={"attention.decode": ["slow"]}).choices["attention.decode"]
    assert choice.impl.name == "slow" and "plugins.toml" in choice.why


def test_named_kernel_that_cannot_serve_is_an_error():
    with pytest.raises(ValueError, match="needs head_dim 128"):
        registry().resolve("x", Q, ops=OPS, overrides={"attention.decode": "fast"})
    with pytest.raises(ValueError, match="did you mean 'fast'"):
        registry().resolve("x", Q, ops=OPS, overrides={"attention.decode": "fats"})


def test_reference_switch_and_fallback():
    r = registry()
    assert r.resolve("x", Q, ops=OPS, overrides="reference").choices["attention.decode"].impl.name == "ref"
    assert r.resolve("other", Q, ops=OPS).choices["attention.decode"].impl.name == "ref"


def test_register_validates_op_and_signature():
    r = KernelRegistry()
    with pytest.raises(ValueError, match="did you mean 'attention.decode'"):
        r.register("attention.decod", "x", "k", decode)
    with pytest.raises(ValueError, match="takes \\(q\\)"):
        r.register("attention.decode", "x", "k", lambda q: q)


def test_check_that_raises_is_a_reason_not_a_crash():
    r = registry()
    r.register("attention.decode", "x", "boom", decode, priority=9, check=lambda q: 1 / 0)
    choice = r.resolve("x", Q, ops=OPS).choices["attention.decode"]
    assert choice.impl.name == "mid" and "ZeroDivisionError" in choice.rejected[0][1][0]


def test_register_checks_parameter_names_and_counts():
    r = KernelRegistry()
    with pytest.raises(ValueError, match="parameter 2 is named 'v_cache', but the op passes 'k_cache'"):
        r.register("attention.decode", "x", "swapped", lambda q, v_cache, k_cache, meta, scale: q)
    with pytest.raises(ValueError, match="requires 6 arguments, the op passes 5"):
        r.register("attention.decode", "x", "extra", lambda q, k_cache, v_cache, meta, scale, window: q)
    with pytest.raises(ValueError, match="keyword-only window"):
        r.register("attention.decode", "x", "kwonly", lambda q, k_cache, v_cache, meta, scale, *, window: q)
    r.register("attention.decode", "x", "renamed", lambda query, kc, vc, metadata, softmax_scale: query)
    r.register("attention.decode", "x", "defaults", lambda q, k_cache, v_cache, meta, scale, window=None: q)
    r.register("attention.decode", "x", "varargs", lambda *args: args[0])


def test_preference_may_name_the_reference_kernel_and_carries_its_note():
    prefs = {"attention.decode": ["cpu_ref/ref", "mid"]}
    choice = registry().resolve("x", Q, ops=OPS, preferences=prefs,
                                notes={"attention.decode": "chosen by tune on 2025-01-01, cpu"}).choices["attention.decode"]
    assert choice.impl.full_name == "cpu_ref/ref" and choice.why == "chosen by tune on 2025-01-01, cpu"


def test_excluded_kernel_is_skipped_as_demoted():
    choice = registry().resolve("x", Q, ops=OPS, exclude=frozenset({"x/mid"})).choices["attention.decode"]
    assert choice.impl.name == "slow" and ("mid", ("demoted by shadow verification",)) in choice.rejected


def test_plan_table_names_plugin_version_and_skipped():
    r = KernelRegistry()
    r.register("attention.decode", "x", "fast", decode, priority=5, plugin="vendor", plugin_version="2.1.0",
               check=lambda q: ["needs head_dim 128"])
    r.register("attention.decode", "x", "mid", decode, plugin="vendor", plugin_version="2.1.0")
    table = r.resolve("x", Q, ops=OPS).table()
    assert "x/mid" in table and "vendor 2.1.0" in table and "skipped fast: needs head_dim 128" in table


def test_the_oracle_cannot_be_replaced_by_a_foreign_cpu_ref_kernel():
    """A third party may add a kernel to backend cpu_ref, even one that outranks cpu_ref's own there, but the
    reference (kernels="reference", shadow verification) stays cpu_ref's own, and the plan marks the foreign one."""
    r = KernelRegistry()
    r.register("attention.decode", "cpu_ref", "torch_loop", decode, plugin="cpu_ref")
    r.register("attention.decode", "cpu_ref", "faster", decode, priority=100, plugin="acme")
    assert r.reference("attention.decode").name == "torch_loop"
    with debug_messages("nanovllm.core.registry") as messages:
        plan = r.resolve("cpu_ref", Q, ops=OPS)
    assert plan.choices["attention.decode"].impl.name == "faster"  # the third party's right to add kernels
    assert "FOREIGN: plugin acme's kernel on the reference backend" in plan.table()
    assert any("runs cpu_ref/faster from plugin 'acme', not cpu_ref's own" in m for m in messages)
    forced = r.resolve("cpu_ref", Q, ops=OPS, overrides="reference").choices["attention.decode"]
    assert forced.impl.name == "torch_loop" and "FOREIGN" not in r.resolve("x", Q, ops=OPS).table()


def test_only_a_foreign_cpu_ref_kernel_is_no_reference():
    r = KernelRegistry()
    r.register("attention.decode", "cpu_ref", "impostor", decode, plugin="acme")
    assert r.reference("attention.decode") is None
    with pytest.raises(RuntimeError, match=r"no reference \(cpu_ref\) kernel is registered for attention.decode"):
        r.resolve("x", Q, ops=OPS, overrides="reference")


def test_plan_is_read_only_and_names_per_call_fallbacks():
    r = KernelRegistry()
    r.register("attention.decode", "x", "fast", decode, fallback="x/slow for batches with long contexts")
    plan = r.resolve("x", Q, ops=OPS)
    with pytest.raises(TypeError):
        plan.choices["attention.decode"] = None
    assert "falls back per call to x/slow for batches with long contexts" in plan.table()


def test_fp8_kv_cache_skips_kernels_that_take_no_scales():
    def decode_fp8(q, k_cache, v_cache, meta, scale, k_scale=None, v_scale=None):
        return q

    r = KernelRegistry()
    r.register("attention.decode", "x", "bf16_only", decode, priority=9)
    r.register("attention.decode", "x", "fp8_ready", decode_fp8, priority=1)
    assert r.resolve("x", Q, ops=["attention.decode"]).choices["attention.decode"].impl.name == "bf16_only"
    fp8 = KernelQuery("cpu", torch.float32, 64, 4, 2, 16, torch.float8_e4m3fn)
    plan = r.resolve("x", fp8, ops=["attention.decode"])
    choice = plan.choices["attention.decode"]
    assert choice.impl.name == "fp8_ready"
    name, reasons = choice.rejected[0]
    assert name == "bf16_only" and "needs a kernel that takes (k_scale, v_scale)" in reasons[0]
    assert "KV cache float8_e4m3fn" in plan.table()
    with pytest.raises(ValueError, match="bf16_only.*cannot serve this run: KV cache float8_e4m3fn needs"):
        r.resolve("x", fp8, overrides={"attention.decode": "bf16_only"}, ops=["attention.decode"])
