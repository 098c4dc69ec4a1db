import types

import pytest
import torch

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


def test_incompatible_plugin_is_listed_with_both_versions_and_the_fix(monkeypatch, capsys):
    from nanovllm import cli
    from nanovllm.backends.cpu_ref import plugin as cpu_ref
    modules = {"cpu_ref": cpu_ref, "future": plugin_module("future", [NullBackend()], api=(2, 0))}
    monkeypatch.setattr(plugins_module, "load_plugins", lambda: load_plugins(SETTINGS, modules=modules))
    assert cli.main(["backends"]) == 0
    assert ("future (plugin refused): built for plugin API 2.0, this nanovllm speaks 1.0: upgrade nanovllm or "
            "install a plugin release for 1.x") in capsys.readouterr().out
    assert nanovllm.PLUGIN_API == (1, 0)


def test_a_plugin_for_a_newer_minor_is_told_which_release_to_install():
    """A 1.9 plugin is a 1.x release already: the fix names the minor this nanovllm speaks."""
    plugins = load_plugins(SETTINGS, modules={"v": plugin_module("v", [NullBackend()], api=(1, 9))})
    assert plugins.failures["v"] == ("built for plugin API 1.9, this nanovllm speaks 1.0: upgrade nanovllm or "
                                     "install a plugin release built for 1.0 or older")


class RaisingBackend(Backend):
    name = "raising"

    def availability(self):
        raise OSError("driver library libvendor.so not found")


def test_backend_whose_availability_raises_is_unavailable_not_fatal():
    from nanovllm.backends.cpu_ref import plugin as cpu_ref
    plugins = load_plugins(SETTINGS, modules={"cpu_ref": cpu_ref, "r": plugin_module("r", [RaisingBackend()])})
    assert plugins.select(None).name == "cpu_ref"
    with pytest.raises(RuntimeError, match="availability\\(\\) raised OSError: driver library"):
        plugins.select("raising")
    assert "raising (unavailable: its availability() raised OSError" in plugins.describe()


def test_kernel_whose_check_raises_is_skipped_with_the_reason():
    from nanovllm.backends.cpu_ref import plugin as cpu_ref
    from nanovllm.core.registry import KernelQuery

    def kernels(registry):
        def check(query):
            raise RuntimeError("cannot query device capability")
        registry.register("attention.decode", "null", "vendor_decode", lambda q, kc, vc, meta, scale: q, priority=9,
                          check=check)
    plugins = load_plugins(SETTINGS, modules={"cpu_ref": cpu_ref, "v": plugin_module("v", [NullBackend()], kernels)})
    query = KernelQuery("cpu", torch.float32, 64, 4, 2, 16)
    choice = plugins.registry.resolve("null", query, plugins.kernel_preferences("null")).choices["attention.decode"]
    assert choice.impl.backend == "cpu_ref"
    assert choice.rejected[0][0] == "vendor_decode" and "check raised RuntimeError" in choice.rejected[0][1][0]


def test_backend_preference_and_plugins_toml_override():
    from nanovllm.backends.cpu_ref import plugin as cpu_ref
    from nanovllm.core.registry import KernelQuery

    class PreferringBackend(NullBackend):
        kernel_preferences = {"attention.decode": ["b"]}

    def kernels(registry):
        for name, priority in (("a", 5), ("b", 1), ("c", 0)):
            registry.register("attention.decode", "null", name, lambda q, kc, vc, meta, scale: q, priority=priority)
    query = KernelQuery("cpu", torch.float32, 64, 4, 2, 16)

    def chosen(settings):
        plugins = load_plugins(settings, modules={"cpu_ref": cpu_ref,
                                                  "p": plugin_module("p", [PreferringBackend()], kernels)})
        plan = plugins.registry.resolve("null", query, plugins.kernel_preferences("null"))
        return plan.choices["attention.decode"]
    assert chosen(SETTINGS).impl.name == "b"  # the backend's own preference beats priority
    assert chosen({**SETTINGS, "kernels": {"null": {"attention.decode": ["c"]}}}).impl.name == "c"  # user wins
    disabled = {"backends": {**SETTINGS["backends"], "disabled_kernels": ["null/b"]}}
    choice = chosen(disabled)
    assert choice.impl.name == "a" and "disabled_kernels" in dict(choice.rejected)["b"][0]


def test_the_plugin_name_cpu_ref_is_reserved_for_the_reference_backend():
    impostor = plugin_module("cpu_ref", [NullBackend()])
    plugins = load_plugins(SETTINGS, modules={"cpu_ref": impostor})
    assert "null" not in plugins.backends
    assert "reserved for nanovllm's reference backend" in plugins.failures["cpu_ref"]
