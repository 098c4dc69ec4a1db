import types

import pytest

import nanovllm
from nanovllm.core import plugins as plugins_module
from nanovllm.core.backend import Backend
from nanovllm.core.plugins import load_plugins

SETTINGS = {"backends": {"order": ["null", "cpu_ref"], "disabled": []}}


class NullBackend(Backend):
    name = "null"

    def __init__(self, ok=True):
        self.ok = ok

    def availability(self):
        return (True, "") if self.ok else (False, "the null device is switched off")


def plugin_module(name, backends=(), kernels=None, api=(1, 0)):
    m = types.ModuleType(name)
    if api is not None:
        m.NANOVLLM_PLUGIN_API = api

    @nanovllm.hookimpl
    def nanovllm_register_backends():
        return list(backends)
    m.nanovllm_register_backends = nanovllm_register_backends
    if kernels:
        @nanovllm.hookimpl
        def nanovllm_register_kernels(registry):
            kernels(registry)
        m.nanovllm_register_kernels = nanovllm_register_kernels
    return m


def test_builtin_backends_come_from_entry_points():
    eps = {ep.name: ep.value for ep in plugins_module._entry_points()}
    assert eps["cpu_ref"] == "nanovllm.backends.cpu_ref.plugin"
    plugins = load_plugins(SETTINGS)
    assert "cpu_ref" in plugins.backends and plugins.plugin_of_backend["cpu_ref"] == "cpu_ref"
    assert [i.name for i in plugins.registry.candidates("attention.decode", "cpu_ref")] == ["torch_loop"]


def test_plugin_that_raises_on_import_is_skipped(monkeypatch):
    class BrokenEntryPoint:
        name, value = "broken", "broken_plugin.module"

        def load(self):
            raise ImportError("no module named broken_plugin")
    real = plugins_module._entry_points()
    monkeypatch.setattr(plugins_module, "_entry_points", lambda: [BrokenEntryPoint(), *real])
    plugins = load_plugins(SETTINGS)
    assert "broken" in plugins.failures and "ImportError" in plugins.failures["broken"]
    assert "cpu_ref" in plugins.backends


def test_unknown_backend_lists_known_ones_and_suggests():
    from nanovllm.backends.cpu_ref import plugin as cpu_ref
    plugins = load_plugins(SETTINGS, modules={"cpu_ref": cpu_ref, "null": plugin_module("null", [NullBackend(False)])})
    with pytest.raises(ValueError, match=r"unknown backend 'cpu-ref'.*did you mean 'cpu_ref'.*null \(unavailable: the null"):
        plugins.select("cpu-ref")
    with pytest.raises(RuntimeError, match="not available on this machine: the null device is switched off"):
        plugins.select("null")
    assert plugins.select(None).name == "cpu_ref"  # order says null first, but it is unavailable


def test_auto_selection_follows_order():
    from nanovllm.backends.cpu_ref import plugin as cpu_ref
    plugins = load_plugins(SETTINGS, modules={"cpu_ref": cpu_ref, "null": plugin_module("null", [NullBackend()])})
    assert plugins.select(None).name == "null"


def test_plugin_hook_that_raises_is_reported_and_others_keep_working():
    from nanovllm.backends.cpu_ref import plugin as cpu_ref

    def bad_kernels(registry):
        registry.register("attention.decode", "null", "fast", lambda *a: None)
        raise RuntimeError("vendor library missing")
    plugins = load_plugins(SETTINGS, modules={"cpu_ref": cpu_ref, "bad": plugin_module("bad", [NullBackend()], bad_kernels)})
    assert "vendor library missing" in plugins.failures["bad"]
    assert plugins.registry.candidates("attention.decode", "null") == []
    assert plugins.registry.candidates("attention.decode", "cpu_ref")


def test_misspelt_hook_is_refused():
    m = plugin_module("typo", [NullBackend()])

    @nanovllm.hookimpl
    def nanovllm_register_kernal(registry):
        pass
    m.nanovllm_register_kernal = nanovllm_register_kernal
    plugins = load_plugins(SETTINGS, modules={"typo": m})
    assert "nanovllm_register_kernal" in plugins.failures["typo"] and "null" not in plugins.backends


@pytest.mark.parametrize("api, ok", [((1, 0), True), ((2, 0), False), ((1, 9), False), (None, False)])
def test_plugin_api_version_is_checked(api, ok):
    plugins = load_plugins(SETTINGS, modules={"v": plugin_module("v", [NullBackend()], api=api)})
    assert ("null" in plugins.backends) == ok
    if not ok:
        assert "v" in plugins.failures
