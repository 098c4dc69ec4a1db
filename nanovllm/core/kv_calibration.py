"""FP8 KV scales: how each layer's K and V scales are obtained, once, at start-up.

`kv_cache_scale` chooses the method:
- "per_head" (the default): per layer and KV head, one scale for K and one for V, from the largest |K| and
  |V| a calibration prefill produces, times HEADROOM, mapped onto the FP8 maximum;
- "per_tensor": the same, one scale per layer for all heads (what vLLM calibrates);
- "unit": every scale 1.0, as vLLM does without calibration (values are stored as they are).
The kernels take per-head scales in every case, so the methods cost the same at run time; per_head is the
default because it gave the smallest log-probability error on SmolLM2 (README, "FP8 KV cache").

The calibration prefill runs the model once over CALIBRATION_TOKENS seeded random token ids with no cache
writes (every rank of a TP group the same ids, in the same order, since the forward runs collectives).
Random ids stand in for text: K/V magnitudes come from the weights and norms, and FP8's dynamic range
(2^-9 to 448 for e4m3) makes the exact amax matter little; HEADROOM keeps rarer, larger activations of real
prompts from saturating. The scales are fixed afterwards, so the prefix cache and the captured graphs see
one encoding for the whole run.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nanovllm.core.kv_quant import fp8_max
from nanovllm.core.logging import get_logger
from nanovllm.core.step_metadata import PrefillMetadata, StepMetadata

if TYPE_CHECKING:
    from nanovllm.core.model_runner import ModelRunner

logger = get_logger(__name__)

CALIBRATION_TOKENS = 512
HEADROOM = 4.0  # the calibrated amax lands at fp8_max / HEADROOM
CALIBRATION_SEED = 0


def scales_from_amax(amax: torch.Tensor, method: str, dtype: torch.dtype) -> torch.Tensor:
    """amax: [num_kv_heads] largest |value| per head -> the scales that map amax * HEADROOM onto the FP8 max."""
    if method == "per_tensor":
        amax = amax.max().expand_as(amax)
    scale = amax.float() * HEADROOM / fp8_max(dtype)
    return torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero head: any scale will do


@torch.inference_mode()
def calibrate_kv_scales(runner: ModelRunner, scales: torch.Tensor, method: str) -> None:
    """Fill `scales` ([num_layers, 2 (K, V), num_kv_heads] float32, on the device) for `method`."""
    scales.fill_(1.0)
    if method == "unit":
        return
    c = runner.config
    n = max(1, min(CALIBRATION_TOKENS, c.max_model_len, c.max_num_batched_tokens))
    amax = torch.zeros_like(scales)

    def record(index: int):
        def hook(module, args):
            k, v = args[1], args[2]  # Attention.forward(q, k, v, meta); [num_tokens, num_kv_heads, head_dim]
            amax[index, 0] = torch.maximum(amax[index, 0], k.detach().abs().amax(dim=(0, 2)).float())
            amax[index, 1] = torch.maximum(amax[index, 1], v.detach().abs().amax(dim=(0, 2)).float())
        return hook

    handles = [attn.register_forward_pre_hook(record(i)) for i, attn in enumerate(runner.attention_layers)]
    try:
        generator = torch.Generator().manual_seed(CALIBRATION_SEED)
        vocab_size = runner.hf_config.vocab_size
        input_ids = torch.randint(0, vocab_size, (n,), generator=generator).to(runner.device)
        cu = torch.tensor([0, n], dtype=torch.int32, device=runner.device)
        meta = StepMetadata(slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=runner.device),
                            num_prefill_tokens=n, prefill=PrefillMetadata(cu, cu, n, n), decode=None,
                            logits_indices=cu[1:].long() - 1)
        runner.model(input_ids, torch.arange(n, device=runner.device), meta)
    finally:
        for handle in handles:
            handle.remove()
    for layer in range(scales.shape[0]):
        for kv in range(2):
            scales[layer, kv] = scales_from_amax(amax[layer, kv], method, runner.kv_dtype)
    logger.info("FP8 KV scales (%s, calibrated on %d random tokens): K %.3g-%.3g, V %.3g-%.3g", method, n,
                scales[:, 0].min().item(), scales[:, 0].max().item(), scales[:, 1].min().item(),
                scales[:, 1].max().item())
