"""Triton KV store: write this step's K/V into the paged cache through the slot mapping.

One program per token copies all of its KV heads, so a token's K and V rows are written by one program
with wide, contiguous loads and stores. Padding tokens (slot < 0) are skipped. An FP8 cache stores
value / scale (one float32 scale per KV head, an IEEE division as in `core/kv_quant.quantize`), saturated to
the FP8 range, rounded to nearest: bit-exact against the reference quantiser on a GPU.
"""
import torch
import triton
import triton.language as tl

from nanovllm.core.kv_quant import fp8_max, is_fp8


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
    stride_key_token, stride_key_head, stride_value_token, stride_value_head,
    stride_k_block, stride_k_row, stride_k_head, stride_v_block, stride_v_row, stride_v_head,
    NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, FP8: tl.constexpr, FP8_MAX: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    row = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    mask = (heads < NUM_KV_HEADS)[:, None] & (dims < HEAD_DIM)[None, :]
    token64 = token.to(tl.int64)

    src = key_ptr + token64 * stride_key_token + heads[:, None] * stride_key_head + dims[None, :]
    dst = k_cache_ptr + block * stride_k_block + row * stride_k_row + heads[:, None] * stride_k_head + dims[None, :]
    tl.store(dst, encode_for_cache(tl.load(src, mask=mask), k_scale_ptr, heads, NUM_KV_HEADS, FP8, FP8_MAX)
             .to(k_cache_ptr.dtype.element_ty), mask=mask)

    src = value_ptr + token64 * stride_value_token + heads[:, None] * stride_value_head + dims[None, :]
    dst = v_cache_ptr + block * stride_v_block + row * stride_v_row + heads[:, None] * stride_v_head + dims[None, :]
    tl.store(dst, encode_for_cache(tl.load(src, mask=mask), v_scale_ptr, heads, NUM_KV_HEADS, FP8, FP8_MAX)
             .to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def encode_for_cache(x, scale_ptr, heads, NUM_KV_HEADS: tl.constexpr, FP8: tl.constexpr, FP8_MAX: tl.constexpr):
    """x: [HEADS_PAD, HEAD_DIM_PAD] as loaded -> what the cache stores (before the cast to its dtype)."""
    if FP8:
        scale = tl.load(scale_ptr + heads, mask=heads < NUM_KV_HEADS, other=1.0)
        # div_rn: IEEE round-to-nearest, as torch divides; `/` on float32 is an approximate division on the GPU
        # whose last-bit errors flip FP8 roundings against the reference quantiser
        quotient = tl.math.div_rn(x.to(tl.float32), tl.broadcast_to(scale[:, None], x.shape))
        return tl.minimum(tl.maximum(quotient, -FP8_MAX), FP8_MAX)
    else:
        return x


def _num_warps(num_kv_heads: int, head_dim: int) -> int:
    """Eight elements (16 bytes of bf16) per thread, so loads and stores are full-width vectors."""
    return max(1, min(8, triton.next_power_of_2(num_kv_heads) * head_dim // 256))


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> None:
    """key, value: [num_tokens, num_kv_heads, head_dim] (views with unit last stride are fine);
    caches: [num_blocks, block_size, num_kv_heads, head_dim]; slot_mapping: [num_tokens], -1 = not stored;
    k_scale, v_scale: [num_kv_heads] float32, needed by an FP8 cache."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if value.shape != key.shape or k_cache.shape[2:] != key.shape[1:] or v_cache.shape != k_cache.shape:
        raise ValueError(f"kv store: key {tuple(key.shape)}, value {tuple(value.shape)}, caches "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)} do not match")
    if any(t.stride(-1) != 1 for t in (key, value, k_cache, v_cache)):
        raise ValueError("kv store: key, value and the caches need a unit stride on head_dim")
    fp8 = is_fp8(k_cache.dtype)
    if fp8 and (k_scale is None or v_scale is None):
        raise ValueError(f"kv store: a {k_cache.dtype} cache needs k_scale and v_scale")
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, k_scale if fp8 else key, v_scale if fp8 else value,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=k_cache.shape[1],
        FP8=fp8, FP8_MAX=fp8_max(k_cache.dtype) if fp8 else 0.0,
        num_warps=_num_warps(num_kv_heads, head_dim),
    )
