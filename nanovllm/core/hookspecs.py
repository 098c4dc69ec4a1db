"""The plugin contract: the hooks a nanovllm backend plugin may implement (pluggy project "nanovllm").

A plugin is a module named by an entry point in the group `nanovllm.backends`. It declares
`NANOVLLM_PLUGIN_API = (major, minor)`, the contract version it was written for, and implements hooks
decorated with `nanovllm.hookimpl`. Each hook is called once per process, when plugins are loaded.
"""
import pluggy

hookspec = pluggy.HookspecMarker("nanovllm")
hookimpl = pluggy.HookimplMarker("nanovllm")


@hookspec
def nanovllm_register_backends():
    """Return the Backend objects this plugin offers (usually one), or an empty list.

    Called once when plugins are loaded, before any kernel is registered. Must not touch the device:
    a backend reports whether it can run through `Backend.availability()`.
    """


@hookspec
def nanovllm_register_kernels(registry):
    """Add kernel implementations to `registry` with `registry.register(op, backend, name, fn, ...)`.

    Called once after every plugin's backends are registered. A plugin may register kernels for any
    backend name, including another plugin's. Import heavy kernel modules lazily: the hook runs on every
    machine, including ones where the kernels cannot run (their `check` says why).
    """
