"""The attention front: store this step's K/V in the paged cache (unless a fused kernel did), then run the
resolved kernels.

The kernels come from the engine's KernelPlan (op name -> function, through the LayerContext); this layer
never knows which backend provided them.
"""
import torch
from torch import nn

from nanovllm.core.kernel_output import check_like
from nanovllm.core.step_metadata import StepMetadata
from nanovllm.models.layers.context import LayerContext


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, ctx: LayerContext):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.store = ctx.kernels["kv_cache.store"]
        self.prefill = ctx.kernels["attention.prefill"]
        self.decode = ctx.kernels["attention.decode"]
        self.kernel_label = ctx.kernel_label
        self.k_cache = self.v_cache = torch.empty(0)  # bound by the model runner once the cache exists
        self.kv_scales: tuple[torch.Tensor, ...] = ()  # FP8 cache: (k_scale, v_scale), each [num_kv_heads]

    def forward(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor, meta: StepMetadata,
                stored: bool = False) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]. `stored`: K/V are in
        the cache already (a fused `rotary.qk_store` wrote them; k may then be None in a decode-only step)."""
        if self.k_cache.numel() and not stored:
            self.store(k, v, self.k_cache, self.v_cache, meta.slot_mapping, *self.kv_scales)
        if meta.decode is None:
            return self._prefill(q, k, v, meta)
        if meta.prefill is None:
            return self._decode(q, meta)
        p = meta.num_prefill_tokens
        return torch.cat([self._prefill(q[:p], k[:p], v[:p], meta), self._decode(q[p:], meta)])

    def _prefill(self, q, k, v, meta: StepMetadata) -> torch.Tensor:
        out = self.prefill(q, k, v, self.k_cache, self.v_cache, meta.prefill, self.scale, *self.kv_scales)
        return check_like(self.kernel_label, "attention.prefill", out, q)

    def _decode(self, q, meta: StepMetadata) -> torch.Tensor:
        return check_like(self.kernel_label, "attention.decode", self.decode(q, self.k_cache, self.v_cache, meta.decode,
                                                                     self.scale, *self.kv_scales), q)
