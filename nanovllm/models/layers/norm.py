"""RMSNorm, with the residual add fused in when a residual is given."""
import torch
from torch import nn

from nanovllm.core.kernel_output import check_pair_like


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, add_kernel=None, kernel_label=str):
        """`add_kernel`: the plan's `norm.add_rms` kernel for calls with a residual, or None for this module's own
        torch code; `kernel_label` names it in an error about its output."""
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.add_kernel, self.kernel_label = add_kernel, kernel_label

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x.to(dtype) * self.weight

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: norm(x). With it: (norm(x + residual), x + residual)."""
        if residual is not None and self.add_kernel is not None:
            out = self.add_kernel(x, residual, self.weight, self.eps)
            return check_pair_like(self.kernel_label, "norm.add_rms", out, x, x, "(normed, sum)")
        return self.torch_forward(x, residual)

    def torch_forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """forward in torch ops (what models/fusion.py compiles)."""
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
