"""The reference KV store: this step's K/V written into the paged cache through the slot mapping.

Plain indexed writes, so it runs on any device: it is the `kv_cache.store` op's reference kernel (cpu_ref
registers it) and the mps backend's store, as `core/sampler.py` is the reference sampler.
"""
import torch

from nanovllm.core.kv_quant import is_fp8, quantize


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> None:
    """key, value: [num_tokens, num_kv_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim].

    Slot s is row s % block_size of block s // block_size; slots < 0 (padding) are not written. An FP8 cache
    stores value / scale, saturated (k_scale, v_scale: [num_kv_heads] float32).
    """
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    num_kv_heads, head_dim = k_cache.shape[-2:]
    for rows, cache, scale in ((key[valid], k_cache, k_scale), (value[valid], v_cache, v_scale)):
        if is_fp8(cache.dtype):
            rows = quantize(rows, scale, cache.dtype)
        cache.view(-1, num_kv_heads, head_dim)[slots] = rows.to(cache.dtype)
