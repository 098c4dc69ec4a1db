"""The mps backend: Apple GPUs through PyTorch's MPS device, attention written in plain tensor ops.

It runs on device "mps" (the default) when `torch.backends.mps.is_available()`. With the engine option
`device="cpu"` it runs all of its own code (attention, KV store, KV budget) on CPU tensors: that is how
CI, which has no Mac, exercises it, and the only reason it accepts a device other than "mps".

No graph capture and no tensor parallelism. The KV cache gets a fixed budget (`memory.py`). float16 by
default on MPS, where bfloat16 support is limited; float32 on the CPU, to match the reference backend.
"""
import torch

import nanovllm
from nanovllm.core.backend import Backend
from nanovllm.core.config import EngineConfig
from nanovllm.core.parallel.communicator import Communicator
from nanovllm.core.registry import KernelQuery

NANOVLLM_PLUGIN_API = (1, 0)

DEVICES = ("mps", "cpu")


def device_kind(device: str | None) -> str:
    """"mps" for None, else the device type of the engine's `device` option ("mps:0" -> "mps")."""
    return str(device or "mps").split(":")[0]


def mps_unavailable_reason() -> str | None:
    """None when torch can use an Apple GPU here, else why not."""
    if not torch.backends.mps.is_built():
        reason = "this torch build has no MPS support; macOS wheels for Apple silicon have it"
    elif not torch.backends.mps.is_available():
        reason = "torch finds no usable Apple GPU; MPS needs Apple silicon and macOS 12.3+"
    else:
        return None
    return f"MPS is not available ({reason}); device='cpu' runs this backend's code on CPU tensors"


class MpsBackend(Backend):
    name = "mps"
    device_type = "mps"
    default_dtype = torch.float16
    supported_dtypes = (torch.float16, torch.float32, torch.bfloat16)
    # no warm-up run to measure peak memory (the KV budget is fixed), no graphs, no TP: the base defaults

    def availability(self, device: str | None = None) -> tuple[bool, str]:
        if device_kind(device) == "cpu":
            return True, ""
        reason = mps_unavailable_reason()
        return (False, reason) if reason else (True, "")

    def device(self, config: EngineConfig, rank: int = 0) -> torch.device:
        kind = device_kind(config.device)
        if kind not in DEVICES:
            raise ValueError(f"device={config.device!r}: the mps backend runs on 'mps' (the Apple GPU, the "
                             f"default) or 'cpu' (its own code on CPU tensors, as CI runs it)")
        return torch.device(kind)

    def default_dtype_for(self, device: torch.device) -> torch.dtype:
        return torch.float32 if device.type == "cpu" else self.default_dtype

    def kv_cache_budget(self, config: EngineConfig, device: torch.device, bytes_per_block: int) -> int:
        from nanovllm.backends.mps import memory
        return memory.kv_cache_budget(config, device, bytes_per_block)

    def communicator(self, rank: int, world_size: int, init_method: str) -> Communicator:
        if world_size == 1:
            return Communicator(rank, world_size)
        raise RuntimeError(f"tensor_parallel_size={world_size}: the mps backend does not support tensor "
                           f"parallelism (a Mac has one GPU and torch has no MPS collectives); use "
                           f"tensor_parallel_size=1")

    def synchronize(self, device: torch.device) -> None:
        if device.type == "mps":
            torch.mps.synchronize()


@nanovllm.hookimpl
def nanovllm_register_backends():
    return [MpsBackend()]


def check_query(query: KernelQuery) -> list[str]:
    reasons = []
    if query.device_type not in DEVICES:
        reasons.append(f"runs on {' or '.join(DEVICES)} tensors, not {query.device_type}")
    if query.dtype not in MpsBackend.supported_dtypes:
        reasons.append(f"dtype {query.dtype} is not one of {', '.join(map(str, MpsBackend.supported_dtypes))}")
    return reasons + query.head_reasons()


@nanovllm.hookimpl
def nanovllm_register_kernels(registry):
    from nanovllm.backends.mps import attention
    from nanovllm.core import kv_store, sampler
    registry.register("kv_cache.store", "mps", "torch_index", kv_store.store_kvcache, check=check_query)
    registry.register("attention.prefill", "mps", "torch_padded", attention.prefill_attention, check=check_query)
    registry.register("attention.decode", "mps", "torch_padded", attention.decode_attention, check=check_query)
    registry.register("sampler", "mps", "torch", sampler.sample, check=check_query)
