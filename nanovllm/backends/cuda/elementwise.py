"""Triton kernels for the elementwise work between a layer's matrix products, one launch each.

`rotary.qk`: per-head RMSNorm of q and k (Qwen3) and neox rotary in one pass over the q/k/v projection's
output; torch.compile made six kernels of it (two reductions, two normalise-and-rotate, two copies),
~12 us a layer at decode batch 256 on an H200. `act.silu_mul`: SiLU(gate) * up, one read and one
write. `norm.add_rms`: the residual add and RMSNorm between sub-layers, one program a row; torch.compile fuses
it as well on the GPU, but an eager (prefill) call of the compiled function costs the host ~80-160 us in
dynamo's wrappers against one Triton launch here, and a 16,384-token prefill step makes 56 of them. All round
where their references (backends/cpu_ref/elementwise.py) round, so float32 runs match.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def norm_rope(src, stride_head, w_ptr, cos, sin, heads, cols, eps, dtype_ptr, row_scale,
              NUM: tl.constexpr, HALF: tl.constexpr, HAS_NORM: tl.constexpr, SCALED: tl.constexpr):
    """The two halves of each head (rows `heads`, columns `cols`) normalised and rotated, as float32 values already
    rounded to the dtype `dtype_ptr` points to (where the reference rounds), so a cast to it stores them exactly.
    SCALED: the loaded values are first multiplied by `row_scale` (and rounded): the 1/RMS of the input row of a
    product whose RMSNorm was folded into it (backends/cuda/norm_folding.py)."""
    cmask = cols < HALF
    mask = (heads < NUM)[:, None] & cmask[None, :]
    offsets = heads[:, None] * stride_head + cols[None, :]
    x1 = tl.load(src + offsets, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + offsets + HALF, mask=mask, other=0.0).to(tl.float32)
    return norm_rope_values(x1, x2, w_ptr, cos[None, :], sin[None, :], cols, eps, dtype_ptr.dtype.element_ty,
                            row_scale, HALF, HAS_NORM, SCALED)


@triton.jit
def norm_rope_values(x1, x2, w_ptr, cos, sin, cols, eps, dtype: tl.constexpr, row_scale,
                     HALF: tl.constexpr, HAS_NORM: tl.constexpr, SCALED: tl.constexpr):
    """`norm_rope` of values already in registers: x1, x2 [rows, HALF_PAD] float32 (the halves of a head, one row
    each), cos and sin broadcastable to them, row_scale a number or [rows, 1]."""
    if SCALED:
        x1 = (x1 * row_scale).to(dtype).to(tl.float32)
        x2 = (x2 * row_scale).to(dtype).to(tl.float32)
    if HAS_NORM:
        cmask = cols < HALF
        rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)
        w1 = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + cols, mask=cmask, other=0.0).to(tl.float32)
        x1 = ((x1 * rstd[:, None]).to(dtype).to(tl.float32) * w1[None, :]).to(dtype).to(tl.float32)
        x2 = ((x2 * rstd[:, None]).to(dtype).to(tl.float32) * w2[None, :]).to(dtype).to(tl.float32)
    y1 = (x1 * cos - x2 * sin).to(dtype).to(tl.float32)
    y2 = (x2 * cos + x1 * sin).to(dtype).to(tl.float32)
    return y1, y2


@triton.jit
def _norm_rope_heads(src, stride_head, dst, w_ptr, cos, sin, cols, eps,
                     NUM: tl.constexpr, NUM_PAD: tl.constexpr, HALF: tl.constexpr, HAS_NORM: tl.constexpr):
    heads = tl.arange(0, NUM_PAD)
    y1, y2 = norm_rope(src, stride_head, w_ptr, cos, sin, heads, cols, eps, dst, 1.0, NUM, HALF, HAS_NORM, False)
    mask = (heads < NUM)[:, None] & (cols < HALF)[None, :]
    out = heads[:, None] * (2 * HALF) + cols[None, :]
    dtype = dst.dtype.element_ty
    tl.store(dst + out, y1.to(dtype), mask=mask)
    tl.store(dst + out + HALF, y2.to(dtype), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, positions_ptr, cache_ptr, q_w_ptr, k_w_ptr, eps,
                         stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_cache,
                         NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                         KV_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, HAS_NORM: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    cols = tl.arange(0, HALF_PAD)
    cos = tl.load(cache_ptr + position * stride_cache + cols, mask=cols < HALF, other=0.0)
    sin = tl.load(cache_ptr + position * stride_cache + HALF + cols, mask=cols < HALF, other=0.0)
    _norm_rope_heads(q_ptr + token * stride_q_token, stride_q_head, q_out_ptr + token * (NUM_HEADS * 2 * HALF),
                     q_w_ptr, cos, sin, cols, eps, NUM_HEADS, HEADS_PAD, HALF, HAS_NORM)
    _norm_rope_heads(k_ptr + token * stride_k_token, stride_k_head, k_out_ptr + token * (NUM_KV_HEADS * 2 * HALF),
                     k_w_ptr, cos, sin, cols, eps, NUM_KV_HEADS, KV_PAD, HALF, HAS_NORM)


def rotary_qk(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
              q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float):
    """The `rotary.qk` op (see backends/cpu_ref/elementwise.py): q [T, H, D], k [T, KV, D] with unit stride on D."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if head_dim % 2 or cos_sin_cache.shape[-1] != head_dim or q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"rotary.qk: q {tuple(q.shape)} / k {tuple(k.shape)} need an even head_dim with unit stride "
                         f"matching the cos/sin cache's last dim {cos_sin_cache.shape[-1]}")
    q_out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    k_out = torch.empty(num_tokens, num_kv_heads, head_dim, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    has_norm = q_weight is not None
    half = head_dim // 2
    _qk_norm_rope_kernel[(num_tokens,)](
        q, k, q_out, k_out, positions, cos_sin_cache, q_weight if has_norm else q, k_weight if has_norm else k,
        eps, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        NUM_HEADS=num_heads, HEADS_PAD=triton.next_power_of_2(num_heads), NUM_KV_HEADS=num_kv_heads,
        KV_PAD=triton.next_power_of_2(num_kv_heads), HALF=half, HALF_PAD=triton.next_power_of_2(half),
        HAS_NORM=has_norm, num_warps=4)
    return q_out, k_out


@triton.jit
def row_rms_scale(x_ptr, eps, SIZE: tl.constexpr, PAD: tl.constexpr):
    """1 / RMS of the row at `x_ptr` (SIZE values): rsqrt(mean(x^2) + eps) in float32, as RMSNorm computes it."""
    cols = tl.arange(0, PAD)
    x = tl.load(x_ptr + cols, mask=cols < SIZE, other=0.0).to(tl.float32)
    return tl.rsqrt(tl.sum(x * x, 0) / SIZE + eps)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, d, stride_x, stride_out, r_ptr, stride_r, r_eps, BLOCK: tl.constexpr,
                     ROW_SCALE: tl.constexpr, R_SIZE: tl.constexpr, R_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    if ROW_SCALE:  # gate and up of a row whose RMSNorm was folded into the product: scaled by its 1/RMS first
        scale = row_rms_scale(r_ptr + row * stride_r, r_eps, R_SIZE, R_PAD)
        gate = (gate * scale).to(dtype).to(tl.float32)
        up = (up * scale).to(dtype).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (silu * up).to(dtype), mask=mask)


def silu_mul(x: torch.Tensor, row_scale_of: torch.Tensor | None = None, eps: float = 0.0, block: int | None = None,
             warps: int | None = None) -> torch.Tensor:
    """The `act.silu_mul` op: x [..., 2 * d] -> silu(gate) * up [..., d]. `row_scale_of` [rows, n] (unit stride on
    n): gate and up of each row are first multiplied by rsqrt(mean(row^2) + eps) of that row of it, the RMSNorm
    folded into the gate/up product (backends/cuda/norm_folding.py). `block` (columns a program) and `warps`
    override the launch shape."""
    d = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    scaled = row_scale_of is not None
    if scaled and (row_scale_of.dim() != 2 or row_scale_of.shape[0] != rows.shape[0] or row_scale_of.stride(-1) != 1):
        raise ValueError(f"silu_mul: row_scale_of {tuple(row_scale_of.shape)} needs one row [n] with unit stride for "
                         f"each of the {rows.shape[0]} rows of x")
    out = torch.empty(rows.shape[0], d, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        big = rows.shape[0] > 512  # prefill: a row a program (16,384 x 3,072: 79 against 95 us a layer on an H200,
        # benchmarks/elementwise_shapes.py); decode: 1,024 columns in 4 warps (no other shape was faster)
        block = min(block or (4096 if big else 1024), triton.next_power_of_2(d))
        warps = warps or (8 if big else 4)
        r = row_scale_of if scaled else rows
        _silu_mul_kernel[(rows.shape[0], triton.cdiv(d, block))](
            rows, out, d, rows.stride(0), out.stride(0), r, r.stride(0), eps, BLOCK=block, ROW_SCALE=scaled,
            R_SIZE=r.shape[1] if scaled else 1, R_PAD=triton.next_power_of_2(r.shape[1]) if scaled else 1,
            num_warps=warps)
    return out.view(*x.shape[:-1], d)


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, n, eps, stride_x, stride_r,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    summed = (x + r).to(dtype)
    tl.store(sum_ptr + row * n + cols, summed, mask=mask)
    s = summed.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(s * s, 0) / n + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + cols, ((s * rstd).to(dtype).to(tl.float32) * w).to(dtype), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """The `norm.add_rms` op: x, residual [..., n] and weight [n] of one dtype -> (normed, x + residual)."""
    n = x.shape[-1]
    if residual.shape != x.shape or tuple(weight.shape) != (n,) or not x.dtype == residual.dtype == weight.dtype:
        raise ValueError(f"norm.add_rms: x {tuple(x.shape)} {x.dtype}, residual {tuple(residual.shape)} "
                         f"{residual.dtype} and weight {tuple(weight.shape)} {weight.dtype} need one shape [..., n], "
                         f"a weight [n] and one dtype")
    rows_x, rows_r = x.reshape(-1, n), residual.reshape(-1, n)
    if rows_x.stride(-1) != 1:
        rows_x = rows_x.contiguous()
    if rows_r.stride(-1) != 1:
        rows_r = rows_r.contiguous()
    out = torch.empty(rows_x.shape, dtype=x.dtype, device=x.device)
    summed = torch.empty_like(out)
    if rows_x.shape[0]:
        block = triton.next_power_of_2(n)
        _add_rms_norm_kernel[(rows_x.shape[0],)](rows_x, rows_r, weight, out, summed, n, eps, rows_x.stride(0),
                                                 rows_r.stride(0), BLOCK=block,
                                                 num_warps=4 if block <= 1024 else 8 if block <= 4096 else 16)
    return out.view(x.shape), summed.view(x.shape)
