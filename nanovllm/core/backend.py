"""Backend: what a device plugin declares about itself, and the device-specific lifecycle it owns.

Static facts are class attributes; methods are only for runtime work. A backend is offered by a plugin's
`nanovllm_register_backends` hook; its kernels are registered separately in the kernel registry.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nanovllm.core.parallel import Communicator

if TYPE_CHECKING:
    from nanovllm.core.config import EngineConfig


class Backend:
    name: str = ""
    device_type: str = "cpu"
    default_dtype: torch.dtype = torch.float32
    supported_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    default_block_size: int = 16
    supports_graphs: bool = False
    compile_small_ops: bool = False  # torch.compile the elementwise layers (see core/fusion.py)
    pin_memory: bool = False  # stage host->device copies in pinned memory
    measures_peak_memory: bool = False  # run a warm-up prefill before sizing the KV cache
    dist_backend: str | None = None  # torch.distributed backend for tensor parallelism, None if refused
    # kv_cache_dtype options this backend's KV cache and kernels can hold ("auto": the model dtype)
    kv_cache_dtypes: tuple[str, ...] = ("auto",)
    # op -> kernel names, best first: the plugin's own preference; plugins.toml [kernels.<name>] overrides per op
    kernel_preferences: dict[str, list[str]] = {}

    def availability(self, device: str | None = None) -> tuple[bool, str]:
        """(True, "") when this machine can run the backend on `device`, else (False, the reason).

        `device` is the engine's `device` option; None asks about the backend's own device type.
        """
        return True, ""

    def device(self, config: EngineConfig, rank: int = 0) -> torch.device:
        return torch.device(config.device or self.device_type)

    def default_dtype_for(self, device: torch.device) -> torch.dtype:
        """The dtype used when the user sets none; a backend that runs on several devices may vary it."""
        return self.default_dtype

    def check_block_size(self, block_size: int) -> list[str]:
        """Reasons the KV block size cannot be used (empty: usable)."""
        return []

    def kv_cache_budget(self, config: EngineConfig, device: torch.device, bytes_per_block: int) -> int:
        """How many KV blocks to allocate once the model is loaded and warmed up."""
        raise NotImplementedError

    def allocate_kv_cache(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                          head_dim: int, dtype: torch.dtype, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One (k_cache, v_cache) pair per layer, each [num_blocks, block_size, num_kv_heads, head_dim]."""
        shape = (2, num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        cache = torch.empty(shape, dtype=dtype, device=device)
        return [(cache[0, i], cache[1, i]) for i in range(num_layers)]

    def capture_graphs(self, runner, batch_sizes: list[int]):
        """Capture decode graphs for these batch sizes and return a replayer, or None to decline."""
        return None

    def communicator(self, rank: int, world_size: int, init_method: str) -> Communicator:
        """The collectives tensor parallelism uses; raises RuntimeError with the reason if TP is refused."""
        if world_size == 1:
            return Communicator(rank, world_size)
        raise RuntimeError(f"backend {self.name!r} does not support tensor parallelism; use tensor_parallel_size=1")

    def synchronize(self, device: torch.device) -> None:
        pass

    def record_event(self, device: torch.device):
        """An object whose .synchronize() waits for the work queued so far, or None if work is synchronous."""
        return None

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def memory_info(self, device: torch.device) -> tuple[int, int] | None:
        """(free bytes, total bytes) of the device, or None when it cannot be known."""
        return None
