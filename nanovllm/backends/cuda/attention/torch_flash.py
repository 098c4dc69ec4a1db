"""Prefill through PyTorch's built-in FlashAttention-2 varlen kernel (CUDA, fp16/bf16, GQA included).

It serves batches with no cached prefix, where K/V are this step's tensors, when plugins.toml or `nanovllm
tune` choose it: on an H200 the Triton prefill took 0.6-0.7 of its time on such steps, so the default plan runs
that. When a block table is set (prefix-cache hit or a later chunk) the context lives in the paged cache, which
this kernel cannot read, so the Triton paged prefill serves the batch.
"""
import torch

from nanovllm.core.step_metadata import PrefillMetadata


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, meta: PrefillMetadata, scale: float, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim] -> like q. The scales
    ([num_kv_heads] float32) are for an FP8 cache, read only through the paged path."""
    if meta.block_tables is not None:
        from nanovllm.backends.cuda.attention.triton_prefill import paged_prefill
        return paged_prefill(q, k, v, k_cache, v_cache, meta, scale, k_scale=k_scale, v_scale=v_scale)
    # (query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask)
    out, *_ = torch.ops.aten._flash_attention_forward(
        q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q, meta.max_seqlen_k,
        0.0, True, False, scale=scale)
    return out
