"""The reference KV store (cpu_ref's and mps's) against a slot-by-slot loop."""
import pytest
import torch

from nanovllm.core import kv_store

NUM_KV_HEADS, HEAD_DIM = 2, 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_store_matches_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    num_blocks, block_size, num_tokens = 12, 16, 50
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::7] = -1  # padding tokens are not written
    key = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    value = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    caches = [torch.full((num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM), float("nan"), dtype=dtype)
              for _ in range(4)]
    kv_store.store_kvcache(key, value, caches[0], caches[1], slots)
    for token, slot in enumerate(slots.tolist()):  # the obvious way, one token at a time
        if slot >= 0:
            caches[2][slot // block_size, slot % block_size] = key[token]
            caches[3][slot // block_size, slot % block_size] = value[token]
    torch.testing.assert_close(caches[0], caches[2], equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(caches[1], caches[3], equal_nan=True, atol=0, rtol=0)
    assert (~caches[0].isnan()).all(-1).all(-1).sum() == (slots >= 0).sum()
