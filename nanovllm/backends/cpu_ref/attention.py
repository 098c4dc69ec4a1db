"""Reference attention over the paged KV cache: clear float32 math, one sequence at a time.

This is the oracle every other backend's kernels are compared with. It runs on any device's tensors.
"""
import torch

from nanovllm.core.kv_quant import dequantize
from nanovllm.core.step_metadata import DecodeMetadata, PrefillMetadata


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, context_len: int,
                   scale: torch.Tensor | None = None) -> torch.Tensor:
    """The first `context_len` cached rows of one sequence: [context_len, num_kv_heads, head_dim], float32
    (an FP8 cache dequantised with `scale`)."""
    block_size = cache.shape[1]
    num_blocks = (context_len + block_size - 1) // block_size
    return dequantize(cache[block_table[:num_blocks].long()].flatten(0, 1)[:context_len], scale)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last len(q) positions of a context of len(k) tokens, in float32.

    q: [num_q, num_heads, head_dim]; k, v: [num_k, num_kv_heads, head_dim] -> [num_q, num_heads, head_dim]
    """
    num_q, num_heads, _ = q.shape
    num_k, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    q_pos = torch.arange(num_k - num_q, num_k, device=q.device).unsqueeze(1)
    k_pos = torch.arange(num_k, device=q.device).unsqueeze(0)
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v).to(q.dtype)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, meta: PrefillMetadata, scale: float, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v: [num_tokens, heads, head_dim] of this step's query chunks -> [num_tokens, num_heads, head_dim].
    Without block tables K/V come from k and v; with them from the caches (FP8 ones dequantised)."""
    out = torch.empty_like(q)
    cu_q, cu_k = meta.cu_seqlens_q.tolist(), meta.cu_seqlens_k.tolist()
    for i in range(len(cu_q) - 1):
        q_i = q[cu_q[i]:cu_q[i + 1]]
        context_len = cu_k[i + 1] - cu_k[i]
        if meta.block_tables is None:
            k_i, v_i = k[cu_q[i]:cu_q[i + 1]], v[cu_q[i]:cu_q[i + 1]]
        else:
            k_i = gather_context(k_cache, meta.block_tables[i], context_len, k_scale)
            v_i = gather_context(v_cache, meta.block_tables[i], context_len, v_scale)
        out[cu_q[i]:cu_q[i + 1]] = attend(q_i, k_i, v_i, scale)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: DecodeMetadata,
                     scale: float, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim], one token per sequence, attending to its whole cached context."""
    out = torch.empty_like(q)
    for i, context_len in enumerate(meta.context_lens.tolist()):
        k_i = gather_context(k_cache, meta.block_tables[i], context_len, k_scale)
        v_i = gather_context(v_cache, meta.block_tables[i], context_len, v_scale)
        out[i:i + 1] = attend(q[i:i + 1], k_i, v_i, scale)
    return out
