"""Batched attention over the paged KV cache: one gather and one softmax for the whole step.

cpu_ref loops over sequences in Python; these pad every sequence of the step to the longest and mask,
so the work is a few large tensor ops. Math is float32 like the reference, cast back to q's dtype.
"""
import torch
import torch.nn.functional as F

from nanovllm.core.step_metadata import DecodeMetadata, PrefillMetadata


def gather_padded(cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                  max_len: int) -> torch.Tensor:
    """Every sequence's cached rows, padded: [num_seqs, max_len, num_kv_heads, head_dim] in float32.

    Rows past a sequence's context are zeroed: free cache rows hold garbage (possibly NaN), and NaN
    times a zero attention weight is still NaN.
    """
    block_size = cache.shape[1]
    num_blocks = -(-max_len // block_size)
    rows = cache[block_tables[:, :num_blocks].long()].flatten(1, 2)[:, :max_len].float()
    valid = torch.arange(rows.shape[1], device=cache.device) < context_lens.unsqueeze(1)
    return torch.where(valid[:, :, None, None], rows, 0.0)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: DecodeMetadata,
                     scale: float) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim], one token per sequence -> [num_seqs, num_heads, head_dim]."""
    num_seqs, num_heads, head_dim = q.shape
    dtype = q.dtype
    num_kv_heads = k_cache.shape[2]
    context_lens = meta.context_lens.long()
    k = gather_padded(k_cache, meta.block_tables, context_lens, meta.max_context_len)  # [S, L, KVH, D]
    v = gather_padded(v_cache, meta.block_tables, context_lens, meta.max_context_len)
    q = q.float().view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.einsum("skgd,slkd->skgl", q, k) * scale
    valid = torch.arange(k.shape[1], device=q.device) < context_lens.unsqueeze(1)  # [S, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.einsum("skgl,slkd->skgd", scores.softmax(dim=-1), v)
    return out.reshape(num_seqs, num_heads, head_dim).to(dtype)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, meta: PrefillMetadata, scale: float) -> torch.Tensor:
    """q, k, v: [num_tokens, heads, head_dim] of the step's query chunks -> [num_tokens, num_heads, head_dim].

    One F.scaled_dot_product_attention call over the step padded to [num_seqs, heads, max_len, head_dim].
    The mask is causal with each sequence's cached prefix in front of its chunk.
    """
    num_tokens, num_heads, head_dim = q.shape
    cu_q, cu_k = meta.cu_seqlens_q.long(), meta.cu_seqlens_k.long()
    query_lens, context_lens = cu_q.diff(), cu_k.diff()
    num_seqs = query_lens.numel()
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=q.device), query_lens, output_size=num_tokens)
    index_in_seq = torch.arange(num_tokens, device=q.device) - cu_q[seq_of_token]

    def pad(x: torch.Tensor, max_len: int) -> torch.Tensor:  # [num_tokens, h, d] -> [num_seqs, max_len, h, d]
        padded = x.new_zeros(num_seqs, max_len, *x.shape[1:], dtype=torch.float32)
        padded[seq_of_token, index_in_seq] = x.float()
        return padded

    if meta.block_tables is None:  # no cached prefix anywhere: keys are this step's own tokens
        max_k = meta.max_seqlen_q
        k_pad, v_pad = pad(k, max_k), pad(v, max_k)
    else:
        max_k = meta.max_seqlen_k
        k_pad = gather_padded(k_cache, meta.block_tables, context_lens, max_k)
        v_pad = gather_padded(v_cache, meta.block_tables, context_lens, max_k)
    q_pad = pad(q, meta.max_seqlen_q)
    # query i of sequence s sits at absolute position (context_len - query_len + i) and sees keys up to it
    q_pos = (context_lens - query_lens).unsqueeze(1) + torch.arange(meta.max_seqlen_q, device=q.device)
    mask = torch.arange(k_pad.shape[1], device=q.device) <= q_pos.unsqueeze(-1)  # [S, Lq, Lk]
    out = F.scaled_dot_product_attention(q_pad.transpose(1, 2), k_pad.transpose(1, 2), v_pad.transpose(1, 2),
                                         attn_mask=mask.unsqueeze(1), scale=scale, enable_gqa=True)
    return out.transpose(1, 2)[seq_of_token, index_in_seq].to(q.dtype)
