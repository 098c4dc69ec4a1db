"""Adapter for the `flash_attn` package, used only where it is installed (imported on first call).

Its paged kernels read the cache through the block table directly; they need block sizes that are
multiples of 256, which the registry check enforces.
"""
import torch

from nanovllm.core.step_metadata import DecodeMetadata, PrefillMetadata


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, meta: PrefillMetadata, scale: float) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim] -> like q."""
    from flash_attn import flash_attn_varlen_func
    if meta.block_tables is not None:  # the whole context, this chunk included, is in the paged cache
        k, v = k_cache, v_cache
    return flash_attn_varlen_func(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q,
                                  meta.max_seqlen_k, softmax_scale=scale, causal=True,
                                  block_table=meta.block_tables)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: DecodeMetadata,
                     scale: float) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim], one token per sequence -> like q."""
    from flash_attn import flash_attn_with_kvcache
    out = flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.context_lens,
                                  block_table=meta.block_tables, softmax_scale=scale, causal=True)
    return out.squeeze(1)
