"""The reference KV store: this step's K/V written into the paged cache through the slot mapping.

Plain indexed writes, so it runs on any device: it is the `kv_cache.store` op's reference kernel (cpu_ref
registers it) and the mps backend's store, as `core/sampler.py` is the reference sampler.
"""
import torch


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """key, value: [num_tokens, num_kv_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim].

    Slot s is row s % block_size of block s // block_size; slots < 0 (padding) are not written.
    """
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = key[valid].to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = value[valid].to(v_cache.dtype)
