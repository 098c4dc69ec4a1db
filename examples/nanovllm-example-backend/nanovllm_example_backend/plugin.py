"""The plugin module the `nanovllm.backends` entry point names: the backend and its kernels.

Kernels are imported inside the registration hook, so loading the plugin stays cheap and cannot fail
on a machine where a kernel's dependencies are missing (its `check` would say why).
"""
import torch

import nanovllm
from nanovllm.backends.cpu_ref.plugin import CpuRefBackend

NANOVLLM_PLUGIN_API = (1, 0)

BACKEND = "example_cpu"


class ExampleCpuBackend(CpuRefBackend):
    """cpu_ref's CPU lifecycle (RAM-fraction KV budget, gloo for TP) under its own name and kernels."""
    name = BACKEND
    device_type = "cpu"
    default_dtype = torch.float32
    # The plugin's own preference; a user's plugins.toml [kernels.example_cpu] replaces it op by op.
    kernel_preferences = {
        "attention.prefill": ["sdpa_padded"],
        "attention.decode": ["padded_gather"],
    }

    def device(self, config, rank: int = 0) -> torch.device:
        if config.device not in (None, "cpu"):
            raise ValueError(f"device={config.device!r}: the {BACKEND} backend runs on 'cpu' only")
        return torch.device("cpu")


def cpu_only(query) -> list[str]:
    return [] if query.device_type == "cpu" else [f"runs on cpu tensors, not {query.device_type}"]


@nanovllm.hookimpl
def nanovllm_register_backends():
    return [ExampleCpuBackend()]


@nanovllm.hookimpl
def nanovllm_register_kernels(registry):
    from nanovllm.core.kv_store import store_kvcache
    from nanovllm.core.sampler import sample
    from nanovllm_example_backend import attention
    registry.register("kv_cache.store", BACKEND, "cpu_ref_index", store_kvcache, check=cpu_only)
    registry.register("attention.prefill", BACKEND, "sdpa_padded", attention.prefill_attention, priority=10,
                      check=cpu_only)
    registry.register("attention.decode", BACKEND, "padded_gather", attention.decode_attention, priority=10,
                      check=cpu_only)
    registry.register("sampler", BACKEND, "torch", sample, check=cpu_only)
