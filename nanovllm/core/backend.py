"""Backend: what a device plugin declares about itself, and the device-specific lifecycle it owns.

Static facts are class attributes; methods are only for runtime work. A backend is offered by a plugin's
`nanovllm_register_backends` hook; its kernels are registered separately in the kernel registry.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from nanovllm.core.parallel.communicator import Communicator

if TYPE_CHECKING:
    from nanovllm.core.config import EngineConfig


@dataclass(frozen=True)
class Fraction:
    """A backend option that is a fraction in (0, 1], e.g. how much of the device's memory the KV cache may take."""
    default: float
    help: str = ""

    def check(self, name: str, value) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"{name}={value!r} is invalid: expected a fraction in (0, 1]")


@dataclass(frozen=True)
class Switch:
    """A backend option that is on or off: True/False, or 1/0 (as `--backend-option NAME=0` gives it)."""
    default: bool
    help: str = ""

    def check(self, name: str, value) -> None:
        if value not in (True, False) or isinstance(value, float):
            raise ValueError(f"{name}={value!r} is invalid: expected on or off (True/False, or 1/0)")


class Backend:
    name: str = ""
    device_type: str = "cpu"
    default_dtype: torch.dtype = torch.float32
    supported_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    default_block_size: int = 16
    supports_graphs: bool = False
    compile_small_ops: bool = False  # torch.compile the elementwise layers (see models/fusion.py)
    pin_memory: bool = False  # stage host->device copies in pinned memory
    measures_peak_memory: bool = False  # run a warm-up prefill before sizing the KV cache
    dist_backend: str | None = None  # torch.distributed backend for tensor parallelism, None if refused
    block_table_multiple: int = 1  # pad block-table widths to a multiple of this (JIT kernels specialise on strides)
    # the engine options only this backend reads (e.g. {"gpu_memory_utilization": Fraction(0.9)}): LLM(..., name=x)
    options: dict[str, Fraction | Switch] = {}
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

    def configure_process(self, config: EngineConfig) -> None:
        """Called once per engine (and per rank) before the model is built: process-wide settings. The base
        applies the `threads` option to torch's CPU thread pool when it is set."""
        if config.threads is not None:
            torch.set_num_threads(config.threads)

    def prepare_model(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        """Called once per engine after the weights are loaded: a backend may adapt layers to its device here,
        e.g. give linear layers a `linear_op` that reads weights it pre-packed. The base does nothing."""

    def warm_up(self, runner) -> None:
        """Called once per engine on every rank, after the engine's warm-up steps and before graph capture: pay the
        backend's own first-use costs now (e.g. a library's set-up of each kernel it may pick), not in a request.
        Must run no collective. The base does nothing."""

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
        """Capture decode graphs for these batch sizes and return a replayer, or None to decline.

        The replayer has `can_run(num_seqs) -> bool` and `run(input_ids, positions, meta) -> logits`. Where the
        plan's `sampler` kernel is graph-safe it may capture it too, after the LM head, over static per-row
        temperatures and `runner.sampling.seed`: then `samples` is True and
        `run_and_sample(input_ids, positions, meta, params) -> token ids` copies params.temperatures in and
        returns the tokens; the runner calls it for decode steps whose sampling is plain
        (`StepSampler.plain`). Otherwise `samples` is False."""
        return None

    def option(self, config: EngineConfig, name: str):
        """The value of this backend's option `name`: the user's (`LLM(..., name=value)`), else its default."""
        return config.backend_options.get(name, self.options[name].default)

    def communicator(self, rank: int, world_size: int, init_method: str) -> Communicator:
        """The collectives tensor parallelism uses: torch.distributed over `dist_backend`, one device per rank.
        Raises RuntimeError with the reason if TP is refused (`dist_backend` None)."""
        if world_size == 1:
            return Communicator(rank, world_size)
        if self.dist_backend is None:
            raise RuntimeError(f"backend {self.name!r} does not support tensor parallelism; use "
                               f"tensor_parallel_size=1")
        from nanovllm.core.parallel.torch_dist import TorchDistCommunicator
        device = torch.device("cpu") if self.device_type == "cpu" else torch.device(self.device_type, rank)
        return TorchDistCommunicator(rank, world_size, init_method, self.dist_backend, device)

    def device_name(self, device: torch.device) -> str:
        """How benchmarks and tune name the device in their reports."""
        return f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"

    def synchronize(self, device: torch.device) -> None:
        pass

    def record_copier(self, device: torch.device):
        """How decode steps' records reach the device when the step builder builds them there (`supports_graphs`):
        a RecordCopier (`core/decode_record.py`). The default copies in the order of the device's work."""
        from nanovllm.core.decode_record import InOrderCopier
        return InOrderCopier()

    def record_event(self, device: torch.device):
        """An object whose .synchronize() waits for the work queued so far, or None if work is synchronous."""
        return None

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)
