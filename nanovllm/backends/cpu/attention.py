"""Paged attention on the CPU: each call is one padded batch through torch's fused SDPA, no Python loop.

Three cases:
  prefill   no cached prefix (block_tables is None): this step's k, v padded to the longest prompt,
            causal SDPA (right padding: a real query row never sees a padded key)
  paged     prefill after a cached prefix or an earlier chunk: whole contexts gathered from the cache
            by block table, a mask for causality and each context's length
  decode    one query per sequence against its gathered context

Measured on an AVX-512 CPU (torch 2.13): SDPA's `enable_gqa` is as fast as repeating the KV heads for
prefill but 7x slower for bfloat16 decode, so decode lines each KV head's query heads up as extra query
rows instead. Cache rows past a context are never read: a masked key must not carry NaN
into the softmax (uninitialised cache memory can hold any bit pattern), so the gather reads each
sequence's first row in their place. The gather index is built once per step, not once per layer.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nanovllm.core.step_metadata import DecodeMetadata, PrefillMetadata


class ContextIndex(NamedTuple):
    """Where each sequence's context rows sit in the flattened cache, shared by K and V of every layer."""
    slots: torch.Tensor  # [num_seqs * max_len] int64; past a context: the sequence's first slot (finite data)
    key_valid: torch.Tensor  # [num_seqs, max_len] bool


_last_index: list = [None]  # (block_tables, lengths source, max_len, block_size, ContextIndex) of the last call


def context_index(block_tables: torch.Tensor, context_lens: torch.Tensor, max_len: int, block_size: int,
                  source: torch.Tensor) -> ContextIndex:
    """The step's ContextIndex, computed once per step: every layer calls with the same metadata tensors
    (`source` is the metadata tensor the lengths come from), so the last result is reused while they match."""
    last = _last_index[0]
    if last is not None and last[0] is block_tables and last[1] is source and last[2:4] == (max_len, block_size):
        return last[4]
    positions = torch.arange(max_len)
    key_valid = positions < context_lens.unsqueeze(1)
    blocks = block_tables.long().gather(1, (positions // block_size).expand(len(block_tables), -1))
    slots = blocks * block_size + positions % block_size
    index = ContextIndex(torch.where(key_valid, slots, slots[:, :1]).flatten(), key_valid)
    _last_index[0] = (block_tables, source, max_len, block_size, index)
    return index


def gather_context(cache: torch.Tensor, index: ContextIndex) -> torch.Tensor:
    """Each sequence's cached rows: [num_seqs, num_kv_heads, max_len, head_dim] (a copy).

    cache: [num_blocks, block_size, num_kv_heads, head_dim]. Rows past a context repeat the sequence's first
    row: finite whatever the cache holds elsewhere, and masked out of the softmax.
    """
    num_seqs, max_len = index.key_valid.shape
    rows = cache.flatten(0, 1).index_select(0, index.slots)
    return rows.view(num_seqs, max_len, *cache.shape[2:]).transpose(1, 2)


def seq_index(cu_seqlens: torch.Tensor, num_tokens: int, max_len: int) -> torch.Tensor:
    """[num_tokens] int64: where each packed token sits in a [num_seqs * max_len] padded layout."""
    cu_seqlens = cu_seqlens.long()
    lens = cu_seqlens.diff()
    seq_of_token = torch.repeat_interleave(torch.arange(lens.numel()), lens, output_size=num_tokens)
    return seq_of_token * max_len + torch.arange(num_tokens) - cu_seqlens[seq_of_token]


def to_padded(x: torch.Tensor, index: torch.Tensor | None, num_seqs: int, max_len: int) -> torch.Tensor:
    """x: [num_tokens, heads, head_dim] packed -> [num_seqs, heads, max_len, head_dim] (zeros in the padding)."""
    if index is None:  # one sequence: nothing to pad
        return x.unsqueeze(0).transpose(1, 2)
    padded = x.new_zeros(num_seqs * max_len, *x.shape[1:])
    padded.index_copy_(0, index, x)
    return padded.view(num_seqs, max_len, *x.shape[1:]).transpose(1, 2)


def from_padded(out: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """out: [num_seqs, heads, max_len, head_dim] -> packed [num_tokens, heads, head_dim]."""
    out = out.transpose(1, 2)
    return out[0] if index is None else out.flatten(0, 1)[index]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, meta: PrefillMetadata, scale: float) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim], this step's query
    chunks packed by meta.cu_seqlens_q -> [num_tokens, num_heads, head_dim].
    """
    num_tokens, num_heads, _ = q.shape
    num_seqs, max_q = meta.num_seqs, meta.max_seqlen_q
    index = None if num_seqs == 1 else seq_index(meta.cu_seqlens_q, num_tokens, max_q)
    q_pad = to_padded(q, index, num_seqs, max_q)
    if meta.block_tables is None:
        out = F.scaled_dot_product_attention(q_pad, to_padded(k, index, num_seqs, max_q),
                                             to_padded(v, index, num_seqs, max_q), is_causal=True, scale=scale,
                                             enable_gqa=True)
        return from_padded(out, index)
    context_lens = meta.cu_seqlens_k.diff().long()
    q_lens = meta.cu_seqlens_q.diff().long()
    context = context_index(meta.block_tables, context_lens, meta.max_seqlen_k, k_cache.shape[1], meta.cu_seqlens_k)
    group = num_heads // k_cache.shape[2]
    k_ctx = gather_context(k_cache, context).repeat_interleave(group, dim=1)
    v_ctx = gather_context(v_cache, context).repeat_interleave(group, dim=1)
    # The query chunk is the last q_len positions of its context; padded query rows see key 0 only.
    q_positions = (context_lens - q_lens).unsqueeze(1) + torch.arange(max_q)  # [num_seqs, max_q]
    visible = (torch.arange(meta.max_seqlen_k) <= q_positions.unsqueeze(-1)) & context.key_valid.unsqueeze(1)
    visible[:, :, 0] = True
    out = F.scaled_dot_product_attention(q_pad, k_ctx, v_ctx, attn_mask=visible.unsqueeze(1), scale=scale)
    return from_padded(out, index)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: DecodeMetadata,
                     scale: float) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim], one token per sequence attending to its whole cached context
    (meta.context_lens tokens, itself included) -> [num_seqs, num_heads, head_dim].
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    context = context_index(meta.block_tables, meta.context_lens, meta.max_context_len, k_cache.shape[1],
                            meta.context_lens)
    k_ctx, v_ctx = gather_context(k_cache, context), gather_context(v_cache, context)
    # query head h reads KV head h // group: each KV head's group of query heads becomes its query rows
    q_rows = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(q_rows, k_ctx, v_ctx, attn_mask=context.key_valid[:, None, None, :], scale=scale)
    return out.reshape(num_seqs, num_heads, head_dim)
