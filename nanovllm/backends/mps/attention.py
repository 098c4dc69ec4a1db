"""Paged attention for MPS in plain tensor ops: gather through the block table, matmul, masked softmax
in float32, matmul.

Not F.scaled_dot_product_attention: its fused MPS path returns wrong results for decode (one query
against a longer key). Each call is one padded batch over all of the step's sequences (padded to the
longest query and context, the padding masked), so no Python loop runs over sequences. Three cases:

  warm-up   the KV cache does not exist yet (empty tensors): attend over this step's k, v
  prefill   no cached prefix (block_tables is None): attend over this step's k, v
  paged     decode, or prefill with a cached prefix / earlier chunk: read whole contexts from the cache
"""
import torch

from nanovllm.core.logging import get_logger
from nanovllm.core.step_metadata import DecodeMetadata, PrefillMetadata

logger = get_logger(__name__)

# The float32 scores of a padded batch are [num_seqs, num_heads, query rows, context]; long prompts are
# processed a slice of query rows at a time so that this tensor stays under this size in unified memory.
MAX_SCORES_BYTES = 256 << 20


def gather_context(cache: torch.Tensor, block_tables: torch.Tensor, max_context_len: int) -> torch.Tensor:
    """Each sequence's first max_context_len cached rows: [num_seqs, max_context_len, num_kv_heads, head_dim].

    cache: [num_blocks, block_size, num_kv_heads, head_dim]; block_tables: [num_seqs, max_num_blocks].
    Rows past a sequence's own context length hold whatever those cache slots hold (NaN included).
    """
    block_size = cache.shape[1]
    num_blocks = -(-max_context_len // block_size)
    rows = cache[block_tables[:, :num_blocks].long()]  # [num_seqs, num_blocks, block_size, kv_heads, head_dim]
    return rows.flatten(1, 2)[:, :max_context_len]


def attend_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor,
                  context_lens: torch.Tensor, scale: float, max_q_offset: int | None = None) -> torch.Tensor:
    """Causal attention over a padded batch -> [num_seqs, max_q, num_heads, head_dim].

    q: [num_seqs, max_q, num_heads, head_dim]; k, v: [num_seqs, max_k, num_kv_heads, head_dim];
    q_positions: [num_seqs, max_q], each query's position in its context; context_lens: [num_seqs].
    A query at position p sees its context's keys 0..p, never a key at or past context_lens.
    `max_q_offset`, when known, bounds q_positions[:, j] - j, so query rows j < end read only keys
    below max_q_offset + end (0 without a cached prefix: the causal triangle is skipped).
    """
    num_seqs, max_q, num_heads, _ = q.shape
    max_k = k.shape[1]
    key_positions = torch.arange(max_k, device=q.device)
    key_valid = key_positions < context_lens.unsqueeze(1)  # [num_seqs, max_k]
    # Padding rows may hold NaN, and a zero probability times NaN is NaN: zero the padded values.
    v = v.masked_fill(~key_valid[:, :, None, None], 0)
    keys = k.permute(0, 2, 3, 1)  # [num_seqs, num_kv_heads, head_dim, max_k]
    values = v.transpose(1, 2)  # [num_seqs, num_kv_heads, max_k, head_dim]
    out = torch.empty_like(q)
    rows = max(1, MAX_SCORES_BYTES // (4 * num_seqs * num_heads * max_k))
    for start in range(0, max_q, rows):
        end = min(max_q, start + rows)
        key_end = max_k if max_q_offset is None else min(max_k, max_q_offset + end)
        visible = ((key_positions[:key_end] <= q_positions[:, start:end, None])
                   & key_valid[:, None, :key_end])  # [num_seqs, rows, key_end]
        out[:, start:end] = attend_rows(q[:, start:end], keys[..., :key_end], values[:, :, :key_end], visible, scale)
    return out


def attend_rows(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                scale: float) -> torch.Tensor:
    """q: [num_seqs, rows, num_heads, head_dim]; keys: [num_seqs, num_kv_heads, head_dim, max_k];
    values: [num_seqs, num_kv_heads, max_k, head_dim]; visible: [num_seqs, rows, max_k] bool.
    """
    num_seqs, rows, num_heads, head_dim = q.shape
    num_kv_heads, max_k = keys.shape[1], keys.shape[3]
    group = num_heads // num_kv_heads
    # Query head h reads KV head h // group: line each KV head's query heads up as extra query rows.
    q = q.reshape(num_seqs, rows, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    q = q.reshape(num_seqs, num_kv_heads, group * rows, head_dim)
    scores = torch.matmul(q, keys).float().view(num_seqs, num_kv_heads, group, rows, max_k) * scale
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    probs = scores.softmax(dim=-1).to(values.dtype).view(num_seqs, num_kv_heads, group * rows, max_k)
    out = torch.matmul(probs, values)  # [num_seqs, num_kv_heads, group * rows, head_dim]
    out = out.view(num_seqs, num_kv_heads, group, rows, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(num_seqs, rows, num_heads, head_dim)


def padded_index(cu_seqlens: torch.Tensor, num_tokens: int, max_len: int) -> torch.Tensor:
    """[num_tokens] int64: where each packed token sits in a [num_seqs * max_len] padded layout.

    Built without a host sync (no boolean indexing, no .tolist()).
    """
    cu_seqlens = cu_seqlens.long()
    num_seqs = cu_seqlens.numel() - 1
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=cu_seqlens.device), cu_seqlens.diff(),
                                           output_size=num_tokens)
    token = torch.arange(num_tokens, device=cu_seqlens.device)
    return seq_of_token * max_len + token - cu_seqlens[seq_of_token]


def pad(x: torch.Tensor, index: torch.Tensor, num_seqs: int, max_len: int) -> torch.Tensor:
    """x: [num_tokens, heads, head_dim] packed -> [num_seqs, max_len, heads, head_dim], zeros in the padding."""
    padded = x.new_zeros(num_seqs * max_len, *x.shape[1:])
    padded[index] = x
    return padded.view(num_seqs, max_len, *x.shape[1:])


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, meta: PrefillMetadata, scale: float) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim], this step's query
    chunks packed by meta.cu_seqlens_q -> [num_tokens, num_heads, head_dim].
    """
    num_tokens = q.shape[0]
    num_seqs, max_q = meta.num_seqs, meta.max_seqlen_q
    q_lens = meta.cu_seqlens_q.diff()
    index = padded_index(meta.cu_seqlens_q, num_tokens, max_q)
    if meta.block_tables is None:
        case = "warm-up" if k_cache.numel() == 0 else "prefill"
        context_lens, max_k = q_lens, max_q
        k_ctx, v_ctx = pad(k, index, num_seqs, max_q), pad(v, index, num_seqs, max_q)
    else:
        if k_cache.numel() == 0:
            raise RuntimeError("prefill with a cached prefix needs the KV cache, which is not allocated yet")
        case = "paged prefill"
        context_lens, max_k = meta.cu_seqlens_k.diff(), meta.max_seqlen_k
        k_ctx = gather_context(k_cache, meta.block_tables, max_k)
        v_ctx = gather_context(v_cache, meta.block_tables, max_k)
    logger.debug("mps attention %s: %d seqs, %d tokens, q %s, padded to %d queries x %d keys", case, num_seqs,
                 num_tokens, tuple(q.shape), max_q, max_k)
    # The query chunk is the last q_len positions of its context.
    q_positions = (context_lens - q_lens).long().unsqueeze(1) + torch.arange(max_q, device=q.device)
    out = attend_padded(pad(q, index, num_seqs, max_q), k_ctx, v_ctx, q_positions, context_lens, scale,
                        max_q_offset=0 if meta.block_tables is None else None)
    return out.flatten(0, 1)[index]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: DecodeMetadata,
                     scale: float) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim], one token per sequence attending to its whole cached context
    (meta.context_lens tokens, itself included) -> [num_seqs, num_heads, head_dim].
    """
    max_k = meta.max_context_len
    logger.debug("mps attention decode: %d seqs, q %s, padded to %d keys", q.shape[0], tuple(q.shape), max_k)
    k_ctx = gather_context(k_cache, meta.block_tables, max_k)
    v_ctx = gather_context(v_cache, meta.block_tables, max_k)
    q_positions = (meta.context_lens.long() - 1).unsqueeze(1)  # [num_seqs, 1]
    return attend_padded(q.unsqueeze(1), k_ctx, v_ctx, q_positions, meta.context_lens, scale).squeeze(1)
