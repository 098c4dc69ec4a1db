"""Plugin discovery (entry points, group `nanovllm.backends`), plugins.toml, and backend selection.

Every backend, built-in or third-party, arrives the same way: an entry point names a module that
implements the hooks in `hookspecs`. A plugin that fails to import, targets another plugin API, or
whose hook raises is reported and skipped; the others keep working.
"""
import dataclasses
import importlib.metadata
import os
from dataclasses import dataclass, field
from pathlib import Path

import pluggy

from nanovllm.core import hookspecs
from nanovllm.core.backend import Backend
from nanovllm.core.logging import get_logger
from nanovllm.core.plugins_toml import check_schema, read_toml, warn_unknown_names
from nanovllm.core.registry import REFERENCE_BACKEND, KernelImpl, KernelRegistry, suggest

logger = get_logger(__name__)

ENTRY_POINT_GROUP = "nanovllm.backends"
PLUGIN_API = (1, 0)
DEFAULT_TOML = Path(__file__).resolve().parent.parent / "plugins.toml"
REFERENCE_MODULE = "nanovllm.backends.cpu_ref.plugin"  # the only module that may be the plugin named cpu_ref


def user_toml_path() -> Path:
    if "NANOVLLM_PLUGINS_TOML" in os.environ:
        return Path(os.environ["NANOVLLM_PLUGINS_TOML"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "nanovllm" / "plugins.toml"


def load_settings(user_file_may_be_missing: bool = False) -> dict:
    """The packaged plugins.toml, with the user's file (NANOVLLM_PLUGINS_TOML or ~/.config) laid over it; each
    checked against the schema (see plugins_toml.py). A NANOVLLM_PLUGINS_TOML naming no file is an error, unless
    `user_file_may_be_missing` (`nanovllm tune`, which creates it)."""
    settings = check_schema(read_toml(DEFAULT_TOML), DEFAULT_TOML)
    user = user_toml_path()
    if "NANOVLLM_PLUGINS_TOML" in os.environ and not user.exists() and not user_file_may_be_missing:
        raise ValueError(f"NANOVLLM_PLUGINS_TOML={os.environ['NANOVLLM_PLUGINS_TOML']!r}: no such file; point it "
                         f"at a plugins.toml, or unset it")
    if user.exists():
        override = check_schema(read_toml(user), user)
        settings.setdefault("backends", {}).update(override.get("backends", {}))
        for backend, prefs in override.get("kernels", {}).items():
            settings.setdefault("kernels", {}).setdefault(backend, {}).update(prefs)
        settings["tune"] = override.get("tune", {})  # what `nanovllm tune` wrote, and when: only the user file
        settings["_source"] = f"{DEFAULT_TOML} + {user}"
    return settings


def check_api_version(declared) -> str | None:
    """None when a plugin built for `declared` can be loaded, else the reason and the fix."""
    core = f"{PLUGIN_API[0]}.{PLUGIN_API[1]}"
    if declared is None:
        return f"declares no NANOVLLM_PLUGIN_API; set it to the version it was written for (this nanovllm speaks {core})"
    try:
        major, minor = declared
    except (TypeError, ValueError):
        return f"NANOVLLM_PLUGIN_API={declared!r} is not a (major, minor) pair"
    if major != PLUGIN_API[0] or minor > PLUGIN_API[1]:
        newer = "upgrade nanovllm" if (major, minor) > PLUGIN_API else "upgrade the plugin"
        release = f"for {PLUGIN_API[0]}.x" if major != PLUGIN_API[0] else f"built for {core} or older"
        return (f"built for plugin API {major}.{minor}, this nanovllm speaks {core}: {newer} "
                f"or install a plugin release {release}")
    return None


def backend_availability(backend: Backend, device: str | None = None) -> tuple[bool, str]:
    """backend.availability(), with a check that raises reported as the reason it is unavailable.

    Plugins written before availability() took a device keep working: it is passed only when set.
    """
    try:
        ok, reason = backend.availability(device) if device is not None else backend.availability()
    except Exception as e:  # a third party's broken check must not take down the others
        return False, f"its availability() raised {type(e).__name__}: {e}"
    return bool(ok), reason


@dataclass
class Plugins:
    """What loading found: usable backends, the kernel registry, and every plugin that was refused."""
    backends: dict[str, Backend] = field(default_factory=dict)
    registry: KernelRegistry = field(default_factory=KernelRegistry)
    failures: dict[str, str] = field(default_factory=dict)
    plugin_of_backend: dict[str, str] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)  # plugin name -> its package's version

    def select(self, name: str | None, device: str | None = None) -> Backend:
        """The backend named, or the first available in plugins.toml's order. Raises with reasons.

        A named backend is asked whether it can run on `device` (the engine option), so a backend may
        accept a device other than its own (a GPU backend run on CPU tensors in CI). Auto-selection asks
        each backend about its own device: the device option is not a reason to pick a backend.
        """
        if name is not None:
            if name not in self.backends:
                raise ValueError(f"unknown backend {name!r}{suggest(name, self.backends)}. {self.describe()}")
            ok, reason = backend_availability(self.backends[name], device)
            if not ok:
                raise RuntimeError(f"backend {name!r} is not available on this machine: {reason}. {self.describe()}")
            return self.backends[name]
        order = self.settings.get("backends", {}).get("order", [])
        for candidate in [*order, *sorted(set(self.backends) - set(order))]:
            if candidate in self.backends and backend_availability(self.backends[candidate])[0]:
                return self.backends[candidate]
        raise RuntimeError(f"no backend is available. {self.describe()}")

    def kernel_preferences(self, backend: str) -> dict[str, list[str]]:
        """Per op, the kernel names to try first: the backend's own `kernel_preferences`, with plugins.toml's
        `[kernels.<backend>]` (packaged or user file) replacing them op by op."""
        own = getattr(self.backends.get(backend), "kernel_preferences", None) or {}
        return {**own, **self.settings.get("kernels", {}).get(backend, {})}

    def preference_notes(self, backend: str) -> dict[str, str]:
        """{op: "chosen by tune on <date>, <device>"} for the ops whose preference `nanovllm tune` wrote."""
        tuned = self.settings.get("tune", {}).get(backend, {})
        note = f"chosen by tune on {tuned.get('date', '?')}, {tuned.get('device', '?')}"
        return {op: note for op in tuned.get("ops", [])}

    def describe(self) -> str:
        parts = []
        for name, backend in self.backends.items():
            ok, reason = backend_availability(backend)
            parts.append(f"{name} (available)" if ok else f"{name} (unavailable: {reason})")
        parts += [f"{name} (plugin refused: {why})" for name, why in self.failures.items()]
        return "Known backends: " + (", ".join(parts) or "none")


def _entry_points():
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def load_plugins(settings: dict | None = None, modules: dict | None = None) -> Plugins:
    """Discover, validate and register every plugin. `modules` ({name: module}) bypasses entry points (tests)."""
    settings = load_settings() if settings is None else settings
    disabled = set(settings.get("backends", {}).get("disabled", []))
    disabled_kernels = set(settings.get("backends", {}).get("disabled_kernels", []))
    plugins = Plugins(settings=settings)
    pm = pluggy.PluginManager("nanovllm")
    pm.add_hookspecs(hookspecs)

    found = dict(modules or {})
    if modules is None:
        for ep in _entry_points():
            if ep.name in disabled or ep.name in found:
                continue
            if ep.name == REFERENCE_BACKEND and ep.value != REFERENCE_MODULE:
                plugins.failures[f"{ep.name} ({ep.value})"] = reserved_name_reason(ep.value)
                logger.warning("plugin %r (%s) is refused: %s", ep.name, ep.value, reserved_name_reason(ep.value))
                continue
            try:
                found[ep.name] = ep.load()
                if getattr(ep, "dist", None) is not None:
                    plugins.versions[ep.name] = ep.dist.version
            except Exception as e:
                plugins.failures[ep.name] = f"import failed: {type(e).__name__}: {e}"
                logger.warning("plugin %r (%s) failed to import and is skipped: %s: %s", ep.name, ep.value,
                               type(e).__name__, e)
    for name, module in found.items():
        why = check_api_version(getattr(module, "NANOVLLM_PLUGIN_API", None))
        if name == REFERENCE_BACKEND and getattr(module, "__name__", None) != REFERENCE_MODULE:
            why = reserved_name_reason(getattr(module, "__name__", repr(module)))
        if why is None:
            try:
                pm.register(module, name=name)
                pm.check_pending()
            except Exception as e:
                if pm.is_registered(module):
                    pm.unregister(module)
                why = f"invalid hooks: {e}"
        if why is not None:
            plugins.failures[name] = why
            logger.warning("plugin %r is refused: %s", name, why)

    for impl in pm.hook.nanovllm_register_backends.get_hookimpls():
        try:
            offered = list(impl.function() or [])
            for backend in offered:
                if not isinstance(backend, Backend) or not backend.name:
                    raise TypeError(f"{backend!r} is not a named nanovllm Backend")
        except Exception as e:
            plugins.failures[impl.plugin_name] = f"nanovllm_register_backends raised {type(e).__name__}: {e}"
            logger.warning("plugin %r: %s", impl.plugin_name, plugins.failures[impl.plugin_name])
            continue
        for backend in offered:
            if backend.name in plugins.backends:
                logger.warning("plugin %r offers backend %r, already offered by %r; ignored", impl.plugin_name,
                               backend.name, plugins.plugin_of_backend[backend.name])
                continue
            plugins.backends[backend.name] = backend
            plugins.plugin_of_backend[backend.name] = impl.plugin_name

    for impl in pm.hook.nanovllm_register_kernels.get_hookimpls():
        staging = KernelRegistry()
        try:
            args = {"registry": _PluginRegistry(staging, impl.plugin_name)}
            impl.function(**{name: args[name] for name in impl.argnames})
        except Exception as e:
            plugins.failures[impl.plugin_name] = f"nanovllm_register_kernels raised {type(e).__name__}: {e}"
            logger.warning("plugin %r: %s; its kernels are skipped", impl.plugin_name, plugins.failures[impl.plugin_name])
            continue
        version = plugins.versions.get(impl.plugin_name, "")
        for op, impls in staging.impls.items():
            impls = [dataclasses.replace(i, plugin_version=version) for i in impls]
            plugins.registry.impls[op].extend(disable_listed(impls, disabled_kernels))
    if modules is None:  # tests that hand in modules also hand in settings naming what they like
        warn_unknown_names(settings, set(plugins.backends), {ep.name for ep in _entry_points()}, plugins.registry)
    return plugins


def reserved_name_reason(module: str) -> str:
    return (f"the plugin name {REFERENCE_BACKEND!r} is reserved for nanovllm's reference backend ({REFERENCE_MODULE}), "
            f"but it names {module}: give the entry point another name (a plugin may still add kernels to the "
            f"cpu_ref backend)")


def disable_listed(impls: list[KernelImpl], disabled: set[str]) -> list[KernelImpl]:
    """Kernels named "backend/name" in plugins.toml's `disabled_kernels` stay listed but never resolve."""
    out = []
    for impl in impls:
        if f"{impl.backend}/{impl.name}" in disabled:
            reason = f"disabled in plugins.toml ([backends] disabled_kernels has {impl.backend + '/' + impl.name!r})"
            impl = dataclasses.replace(impl, check=lambda query, reason=reason: [reason])
        out.append(impl)
    return out


class _PluginRegistry:
    """The registry as one plugin sees it: registrations are tagged with the plugin's name."""

    def __init__(self, registry: KernelRegistry, plugin: str):
        self._registry, self._plugin = registry, plugin

    def register(self, op, backend, name, fn, priority=0, check=None, graph_safe=False, fallback=""):
        return self._registry.register(op, backend, name, fn, priority, check, plugin=self._plugin,
                                       graph_safe=graph_safe, fallback=fallback)
