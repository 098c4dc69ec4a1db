"""The cpu_ref backend: pure torch on the CPU, clarity over speed, the oracle for every other backend.

Its kernels are the reference twins of every op; they are device-agnostic, so the registry can force
them on any backend (`kernels="reference"`).
"""

import torch

import nanovllm
from nanovllm.core.backend import Backend, Fraction

NANOVLLM_PLUGIN_API = (1, 0)


def available_host_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"]
    except (OSError, KeyError, ValueError):
        return None


class CpuRefBackend(Backend):
    name = "cpu_ref"
    device_type = "cpu"
    kv_cache_dtypes = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
    dist_backend = "gloo"
    options = {"cpu_memory_fraction": Fraction(0.3, "the share of free RAM the KV cache may take")}

    def device(self, config, rank: int = 0) -> torch.device:
        if config.device not in (None, "cpu"):
            raise ValueError(f"device={config.device!r}: the cpu_ref backend runs on 'cpu' only")
        return torch.device("cpu")

    def kv_cache_budget(self, config, device, bytes_per_block: int) -> int:
        if config.num_kvcache_blocks is not None:
            return config.num_kvcache_blocks
        free = available_host_memory() or 4 << 30
        return max(1, int(free * self.option(config, "cpu_memory_fraction")) // bytes_per_block)


@nanovllm.hookimpl
def nanovllm_register_backends():
    return [CpuRefBackend()]


@nanovllm.hookimpl
def nanovllm_register_kernels(registry):
    from nanovllm.backends.cpu_ref import attention, elementwise
    from nanovllm.core import kv_store, sampler
    registry.register("kv_cache.store", "cpu_ref", "torch_index", kv_store.store_kvcache)
    registry.register("attention.prefill", "cpu_ref", "torch_loop", attention.prefill_attention)
    registry.register("attention.decode", "cpu_ref", "torch_loop", attention.decode_attention)
    registry.register("sampler", "cpu_ref", "torch", sampler.sample)
    registry.register("rotary.qk", "cpu_ref", "torch", elementwise.rotary_qk, graph_safe=True)
    registry.register("act.silu_mul", "cpu_ref", "torch", elementwise.silu_mul, graph_safe=True)
    registry.register("norm.add_rms", "cpu_ref", "torch", elementwise.add_rms_norm, graph_safe=True)
    registry.register("rotary.qk_store", "cpu_ref", "torch", elementwise.rotary_qk_store)
