"""KV store for the cpu backend: this step's K/V written into the paged cache with one index_copy_ per cache."""
import torch


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """key, value: [num_tokens, num_kv_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim].

    Slot s is row s % block_size of block s // block_size; slots < 0 (padding) are not written. Steps
    built by the runner have no padding, so the common case is one index_copy_ without a boolean mask.
    """
    num_kv_heads, head_dim = k_cache.shape[-2:]
    if slot_mapping.numel() and int(slot_mapping.min()) < 0:
        valid = slot_mapping >= 0
        slot_mapping, key, value = slot_mapping[valid], key[valid], value[valid]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(v_cache.dtype))
