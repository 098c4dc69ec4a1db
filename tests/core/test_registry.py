import pytest
import torch

from nanovllm.core.registry import KernelQuery, KernelRegistry

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
