"""SiLU-and-mul: the gated activation of SwiGLU MLPs."""
import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    def __init__(self, kernel=None):
        """`kernel`: the plan's `act.silu_mul` kernel, or None for this module's own torch code."""
        super().__init__()
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., 2 * d] (gate then up) -> [..., d]"""
        if self.kernel is not None:
            return self.kernel(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
