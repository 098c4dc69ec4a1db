"""A decode step's new token, handled by the decode kernel itself: `rotary.qk_store`'s work moved into attention.

With the layer's RMSNorm folded into the q/k/v weight (backends/cuda/norm_folding.py), a decode layer runs the
product on cuBLAS, then `rotary.qk_store` (one program a token: 1/RMS of the residual row, q/k norm, rotary,
K and V into the paged cache), then the decode kernel. Where the decode kernel runs one program per (KV head,
sequence), the whole context in one split (batch >= 17 at Qwen3-0.6B's shape on an H200), that program can do
the new token's part for its own KV head first: its query group's rows normalised and rotated into the output
buffer (which it overwrites with attention's result at the end), its K and V into the cache. A barrier, then
the usual attention over the context, the new token read back from the cache like every other, so an FP8 cache
gives the values the separate kernels give. One launch fewer a layer: the store kernel's ~3.7 us at batch 256
(RESULTS.md, round seventeen) against a few hundred nanoseconds of dependent loads at each program's start.

The math is `rotary_store`'s (elementwise.norm_rope, kv_store.encode_for_cache), rounded where it rounds.
"""
import triton
import triton.language as tl

from nanovllm.backends.cuda.elementwise import norm_rope, row_rms_scale
from nanovllm.backends.cuda.kv_store import encode_for_cache


@triton.jit
def store_new_token(qkv_ptr, stride_qkv, q_out_ptr, stride_q_seq, stride_q_head, seq, kv_head, positions_ptr,
                    cos_sin_ptr, stride_cos_sin, q_w_ptr, k_w_ptr, eps, x_ptr, stride_x, x_eps,
                    k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
                    stride_cache_block, stride_cache_row, stride_cache_head,
                    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                    GROUP_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                    HAS_NORM: tl.constexpr, ROW_SCALE: tl.constexpr, X_SIZE: tl.constexpr, X_PAD: tl.constexpr,
                    PAGE_SIZE: tl.constexpr, FP8: tl.constexpr, FP8_MAX: tl.constexpr):
    """Sequence `seq`'s new token for KV head `kv_head`: the group's q rows [GROUP] normalised and rotated into
    q_out (rows kv_head * GROUP ..), K normalised, rotated and V (scaled by the row's 1/RMS with ROW_SCALE) into
    the cache at the token's slot (slot < 0: a padding row, nothing stored). qkv's row is the product's output
    [q heads | k heads | v heads], each head 2 * HALF wide."""
    seq = seq.to(tl.int64)
    position = tl.load(positions_ptr + seq).to(tl.int64)
    cols = tl.arange(0, HALF_PAD)
    col_ok = cols < HALF
    cos = tl.load(cos_sin_ptr + position * stride_cos_sin + cols, mask=col_ok, other=0.0)
    sin = tl.load(cos_sin_ptr + position * stride_cos_sin + HALF + cols, mask=col_ok, other=0.0)
    if ROW_SCALE:
        row_scale = row_rms_scale(x_ptr + seq * stride_x, x_eps, X_SIZE, X_PAD)
    else:
        row_scale = 1.0
    head_dim = 2 * HALF
    row = qkv_ptr + seq * stride_qkv
    dtype = q_out_ptr.dtype.element_ty

    rows = tl.arange(0, GROUP_PAD)
    q1, q2 = norm_rope(row + kv_head * GROUP * head_dim, head_dim, q_w_ptr, cos, sin, rows, cols, eps, q_out_ptr,
                       row_scale, GROUP, HALF, HAS_NORM, ROW_SCALE)
    q_dst = q_out_ptr + seq * stride_q_seq + (kv_head * GROUP + rows)[:, None] * stride_q_head + cols[None, :]
    q_mask = (rows < GROUP)[:, None] & col_ok[None, :]
    tl.store(q_dst, q1.to(dtype), mask=q_mask)
    tl.store(q_dst + HALF, q2.to(dtype), mask=q_mask)

    one = tl.arange(0, 1)  # K and V: one head, as [1, ...] tiles like the q group's
    k1, k2 = norm_rope(row + (NUM_HEADS + kv_head) * head_dim, head_dim, k_w_ptr, cos, sin, one, cols, eps,
                       q_out_ptr, row_scale, 1, HALF, HAS_NORM, ROW_SCALE)
    dims = tl.arange(0, HEAD_DIM_PAD)
    v_mask = (one < 1)[:, None] & (dims < head_dim)[None, :]
    value = tl.load(row + (NUM_HEADS + NUM_KV_HEADS + kv_head) * head_dim + one[:, None] * head_dim + dims[None, :],
                    mask=v_mask)
    if ROW_SCALE:
        value = (value.to(tl.float32) * row_scale).to(dtype)

    slot = tl.load(slot_mapping_ptr + seq).to(tl.int64)
    if slot >= 0:
        heads = kv_head + one
        cache_dtype = k_cache_ptr.dtype.element_ty
        base = (slot // PAGE_SIZE) * stride_cache_block + (slot % PAGE_SIZE) * stride_cache_row \
            + kv_head * stride_cache_head
        k_mask = (one < 1)[:, None] & col_ok[None, :]
        k_dst = k_cache_ptr + base + one[:, None] * head_dim + cols[None, :]
        tl.store(k_dst, encode_for_cache(k1, k_scale_ptr, heads, NUM_KV_HEADS, FP8, FP8_MAX).to(cache_dtype),
                 mask=k_mask)
        tl.store(k_dst + HALF, encode_for_cache(k2, k_scale_ptr, heads, NUM_KV_HEADS, FP8, FP8_MAX).to(cache_dtype),
                 mask=k_mask)
        tl.store(v_cache_ptr + base + one[:, None] * head_dim + dims[None, :],
                 encode_for_cache(value, v_scale_ptr, heads, NUM_KV_HEADS, FP8, FP8_MAX).to(cache_dtype), mask=v_mask)
