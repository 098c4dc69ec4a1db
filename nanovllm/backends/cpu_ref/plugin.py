"""The cpu_ref backend: pure torch on the CPU, clarity over speed, the oracle for every other backend.

Its kernels are the reference twins of every op; they are device-agnostic, so the registry can force
them on any backend (`kernels="reference"`).
"""

import torch

import nanovllm
from nanovllm.core.backend import Backend
from nanovllm.core.parallel import Communicator

NANOVLLM_PLUGIN_API = (1, 0)


class CpuRefBackend(Backend):
    name = "cpu_ref"
    device_type = "cpu"
    default_dtype = torch.float32
    default_block_size = 16
    kv_cache_dtypes = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
    supports_graphs = False
    dist_backend = "gloo"

    def device(self, config, rank: int = 0) -> torch.device:
        if config.device not in (None, "cpu"):
            raise ValueError(f"device={config.device!r}: the cpu_ref backend runs on 'cpu' only")
        return torch.device("cpu")

    def memory_info(self, device):
        try:
            with open("/proc/meminfo") as f:
                info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
            return info["MemAvailable"], info["MemTotal"]
        except (OSError, KeyError, ValueError):
            return None

    def kv_cache_budget(self, config, device, bytes_per_block: int) -> int:
        if config.num_kvcache_blocks is not None:
            return config.num_kvcache_blocks
        info = self.memory_info(device)
        free = info[0] if info else 4 << 30
        return max(1, int(free * config.cpu_memory_fraction) // bytes_per_block)

    def communicator(self, rank: int, world_size: int, init_method: str) -> Communicator:
        if world_size == 1:
            return Communicator(rank, world_size)
        from nanovllm.core.distributed import TorchDistCommunicator
        return TorchDistCommunicator(rank, world_size, init_method, "gloo", torch.device("cpu"))

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)


@nanovllm.hookimpl
def nanovllm_register_backends():
    return [CpuRefBackend()]


@nanovllm.hookimpl
def nanovllm_register_kernels(registry):
    from nanovllm.backends.cpu_ref import attention, kv_store
    from nanovllm.core import sampler
    registry.register("kv_cache.store", "cpu_ref", "torch_index", kv_store.store_kvcache)
    registry.register("attention.prefill", "cpu_ref", "torch_loop", attention.prefill_attention)
    registry.register("attention.decode", "cpu_ref", "torch_loop", attention.decode_attention)
    registry.register("sampler", "cpu_ref", "torch", sampler.sample)
