"""SiLU-and-mul: the gated activation of SwiGLU MLPs."""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.core.kernel_output import check_shape


class SiluAndMul(nn.Module):
    def __init__(self, kernel=None, kernel_label=str):
        """`kernel`: the plan's `act.silu_mul` kernel, or None for this module's own torch code; `kernel_label` names
        it in an error about its output."""
        super().__init__()
        self.kernel, self.kernel_label = kernel, kernel_label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., 2 * d] (gate then up) -> [..., d]"""
        if self.kernel is not None:
            return check_shape(self.kernel_label, "act.silu_mul", self.kernel(x), (*x.shape[:-1], x.shape[-1] // 2),
                               x.dtype)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
