"""Fuse the model's small elementwise layers with torch.compile, where the backend says it pays.

RMSNorm (with its residual add), the q/k norm + rotary of attention, and SiLU-and-mul are chains of
tiny kernels eagerly: at decode batch sizes each launch costs more than its work. Compiled, each chain
becomes one kernel (or a few). The matrix products and attention stay as they are (library and registry
kernels), and so does the elementwise work the kernel plan gives to a backend's own fused kernel
(`rotary.qk`, `act.silu_mul`, `norm.add_rms` served by anything but the reference; an RMSNorm's calls without a
residual, which `norm.add_rms` does not serve, are still compiled).
"""
import torch
from torch import nn

from nanovllm.core.logging import get_logger
from nanovllm.core.registry import REFERENCE_BACKEND, KernelPlan

logger = get_logger(__name__)


def native(plan: KernelPlan | None, op: str) -> bool:
    """Whether the plan serves `op` with a backend's own kernel (then compiling around it gains nothing)."""
    return plan is not None and op in plan.choices and plan.choices[op].impl.backend != REFERENCE_BACKEND


def fuse_small_ops(model: nn.Module, plan: KernelPlan | None = None) -> int:
    """Compile the elementwise sub-layers of `model` in place; returns how many were compiled."""
    from nanovllm.models.decoder import SelfAttention
    from nanovllm.models.layers.activation import SiluAndMul
    from nanovllm.models.layers.norm import RMSNorm
    count = 0
    inside_qk_transform = set()  # the q/k norms, compiled as part of their attention's qk_transform (or fused)
    for module in model.modules():  # a parent comes before its children
        if isinstance(module, SelfAttention):
            inside_qk_transform.update(id(m) for m in (module.q_norm, module.k_norm) if m is not None)
            if not native(plan, "rotary.qk"):
                module.qk_transform = torch.compile(module.qk_transform, dynamic=True)
                count += 1
        elif isinstance(module, SiluAndMul) and native(plan, "act.silu_mul"):
            continue
        elif isinstance(module, RMSNorm) and native(plan, "norm.add_rms") and id(module) not in inside_qk_transform:
            module.torch_forward = torch.compile(module.torch_forward, dynamic=True)  # the calls without a residual
            count += 1
        elif isinstance(module, (RMSNorm, SiluAndMul)) and id(module) not in inside_qk_transform:
            module.forward = torch.compile(module.forward, dynamic=True)
            count += 1
    logger.info("fused %d elementwise layers with torch.compile", count)
    return count
