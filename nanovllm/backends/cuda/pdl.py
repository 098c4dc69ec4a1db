"""Programmatic dependent launch (PDL) for the cuda backend's Triton kernels.

On Hopper and later a kernel launched with PDL may be scheduled while the kernel before it in the stream is still
finishing: its launch and start overlap the other's tail, and it waits for that kernel's results at a
`griddepcontrol.wait`. A decode step is ~280 short kernels, so each boundary's fixed cost counts. Every Triton
kernel here starts with `enter(PDL)`: with PDL it waits for the previous grid (all its writes are then visible,
and, transitively, those of every grid before it), then lets its own dependents launch. Nothing touches global
memory before the wait, so the order of results is the stream's order; CUDA graphs capture the launches as
programmatic edges.

Measured on an H200 (Triton 3.6, torch 2.11+cu130), so it is off by default: in `benchmarks/pdl_chain.py` (28 decode
layers of Qwen3-0.6B's shape in one graph, cuBLAS products between the Triton kernels) it saved 2.3-3.1 us a layer
at 256 rows and 0.4-0.6 at 32-128 (2.1-2.3 us a layer with the products left out), but in the engine the seed
benchmark ran no faster with it: bf16 5.07 and 5.06 s against 5.04 and 5.05 s without, FP8 3.73 and 3.67 against
3.63 and 3.63 (one call, alternated; `--backend-option programmatic_launch=1`). It stays an option
(`programmatic_launch`) for other GPUs and Triton versions, tested to change no token.

One setting a process (applied in `CudaBackend.configure_process`); launches read it, so graphs keep what they were
captured with. Off where it cannot work, whatever the option: before sm_90, under Triton's interpreter, or with a
Triton without grid dependency control.
"""
import os
from functools import cache

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control: PDL stays off
    gdc_launch_dependents = gdc_wait = None

_wanted = False  # the programmatic_launch option's default


def configure(enabled: bool) -> None:
    """The process's setting (the backend option): launches after this call follow it."""
    global _wanted
    _wanted = bool(enabled)


@cache
def supported(device_index: int) -> tuple[bool, str]:
    """(True, "") where PDL can run on this CUDA device, else (False, why)."""
    if gdc_wait is None:
        return False, f"Triton {triton.__version__} has no grid dependency control"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False, "Triton's interpreter runs the kernels"
    major, minor = torch.cuda.get_device_capability(device_index)
    if major < 9:
        return False, f"the GPU is sm_{major}{minor}; PDL needs sm_90 or later"
    return True, ""


def enabled(device: torch.device) -> bool:
    if not _wanted or device.type != "cuda":
        return False
    return supported(device.index if device.index is not None else torch.cuda.current_device())[0]


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for a Triton launch on `device`: the kernel's PDL constexpr, and launch_pdl with it."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {"PDL": False}


@triton.jit
def enter(PDL: tl.constexpr):
    """A kernel's first statement: with PDL, wait for the grid before it, then let the next grid launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
