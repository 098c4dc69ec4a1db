"""The cuda backend's kernels with an FP8 KV cache, against the cpu_ref FP8 reference (quantise/dequantise in torch).

Same set-up as test_cuda_kernels.py: Triton's interpreter on a machine without CUDA (float32 queries, small
shapes), compiled kernels in bfloat16/float16/float32 on a GPU. Both sides read the same FP8 bytes, so the
outputs agree to the query dtype's tolerance. The store is exact against torch's cast on a GPU; Triton's
interpreter rounds float32 -> FP8 without carrying into the exponent (125.7 becomes 64, not 128), so on the
CPU the reference's scaled, saturated values go through the interpreter's own cast instead.
"""
import pytest
import torch

from tests.backends.test_cuda_kernels import (DEVICES, TRITON_REASON, assert_close, dtypes_for, fused_qkv_views,
                                              poison_allocator, random_context_lens, scattered_block_tables)
from nanovllm.backends.cpu_ref.attention import decode_attention as ref_decode
from nanovllm.backends.cpu_ref.attention import prefill_attention as ref_prefill
from nanovllm.backends.cpu_ref.kv_store import store_kvcache as ref_store
from nanovllm.core.kv_quant import quantize
from nanovllm.core.step_metadata import DecodeMetadata, PrefillMetadata

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]

if not TRITON_REASON:  # module level: a jitted kernel sees this module's globals
    import triton
    import triton.language as tl

    from nanovllm.backends.cuda.attention.triton_common import widen_fp8_pairs

    @triton.jit
    def _widen_kernel(words_ptr, even_ptr, odd_ptr, FP8_DTYPE: tl.constexpr, ASM: tl.constexpr,
                      BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        even, odd = widen_fp8_pairs(tl.load(words_ptr + i), FP8_DTYPE, ASM)
        tl.store(even_ptr + i, even)
        tl.store(odd_ptr + i, odd)


def interpreter_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 -> `dtype` through Triton's (interpreted) conversion."""
    import triton
    import triton.language as tl

    @triton.jit
    def cast(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n).to(y_ptr.dtype.element_ty), mask=i < n)

    flat = x.float().contiguous().flatten()
    out = torch.empty(flat.shape, dtype=dtype)
    cast[(triton.cdiv(flat.numel(), 1024),)](flat, out, flat.numel(), BLOCK=1024)
    return out.view(x.shape)


def reference_store(key, value, k_cache, v_cache, slots, k_scale, v_scale, device):
    if device == "cuda":
        return ref_store(key, value, k_cache, v_cache, slots, k_scale, v_scale)
    valid = slots >= 0
    limit = torch.finfo(k_cache.dtype).max
    for rows, cache, scale in ((key[valid], k_cache, k_scale), (value[valid], v_cache, v_scale)):
        scaled = (rows.float() / scale[:, None]).clamp(-limit, limit)
        cache.view(-1, *cache.shape[2:])[slots[valid]] = interpreter_cast(scaled, cache.dtype)


def random_scales(num_kv_heads: int, g: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head scales spread over two decades, so a kernel that ignores the head index fails."""
    k = 10 ** (torch.rand(num_kv_heads, generator=g) * 2 - 1.5)
    v = 10 ** (torch.rand(num_kv_heads, generator=g) * 2 - 1.5)
    return k.to(device), v.to(device)


VALUE_SCALE = 30  # cached values are ~VALUE_SCALE x each head's scale (stored FP8 numbers ~30 x N(0, 1))


def fp8_caches(num_blocks, block_size, num_kv_heads, head_dim, kv_dtype, scales, device, g):
    """Caches holding quantised random values (magnitude ~ the scale times VALUE_SCALE)."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    out = []
    for scale in scales:
        values = torch.randn(shape, generator=g) * VALUE_SCALE * scale.cpu()[:, None]
        out.append(quantize(values.flatten(0, 1), scale.cpu(), kv_dtype).view(shape).to(device))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_dtype", FP8, ids=str)
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(2, 64, 16), (1, 48, 16), (4, 128, 32)])
def test_fp8_store_matches_reference(device, kv_dtype, num_kv_heads, head_dim, block_size):
    from nanovllm.backends.cuda.kv_store import store_kvcache
    g = torch.Generator().manual_seed(num_kv_heads * 100 + head_dim)
    num_tokens = 37 if device == "cpu" else 3000
    k_scale, v_scale = random_scales(num_kv_heads, g, device)
    for dtype in dtypes_for(device):
        num_blocks = (num_tokens + 20) // block_size + 2
        _, key, value = fused_qkv_views(num_tokens, 2 * num_kv_heads, num_kv_heads, head_dim, dtype, device, g)
        key = key * 1000  # some values beyond the FP8 range (also at the largest scale): they saturate, not NaN
        slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
        slots[torch.rand(num_tokens, generator=g) < 0.2] = -1
        slots = slots.to(device)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        k_cache = torch.full(shape, float("nan"), device=device).to(kv_dtype)
        v_cache = torch.full(shape, float("nan"), device=device).to(kv_dtype)
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        store_kvcache(key, value, k_cache, v_cache, slots, k_scale, v_scale)
        reference_store(key, value, k_ref, v_ref, slots, k_scale, v_scale, device)
        written = slots[slots >= 0]
        assert torch.isfinite(k_ref.float().flatten(0, 1)[written]).all()
        if device == "cuda" and kv_dtype == torch.float8_e4m3fn:  # some values saturated (e5m2 reaches 57344;
            # the interpreter's cast never reaches the FP8 maximum)
            assert k_ref.float().abs().nan_to_num(0).max() == torch.finfo(kv_dtype).max
        for got, want in ((k_cache, k_ref), (v_cache, v_ref)):
            torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_dtype", FP8, ids=str)
@pytest.mark.parametrize("group,num_kv_heads,head_dim,block_size,num_splits", [
    (2, 2, 64, 16, 1), (4, 1, 128, 32, 3), (1, 2, 48, 16, None)])
def test_fp8_decode_matches_reference(device, kv_dtype, group, num_kv_heads, head_dim, block_size, num_splits):
    from nanovllm.backends.cuda.attention.triton_decode import paged_decode
    g = torch.Generator().manual_seed(group * 10 + head_dim)
    num_seqs, max_len = (4, 200) if device == "cpu" else (24, 4096)
    k_scale, v_scale = random_scales(num_kv_heads, g, device)
    for dtype in dtypes_for(device):
        context_lens = random_context_lens(num_seqs, max_len, block_size, g)
        block_tables, num_blocks = scattered_block_tables(context_lens, block_size, g)
        k_cache, v_cache = fp8_caches(num_blocks, block_size, num_kv_heads, head_dim, kv_dtype,
                                      (k_scale, v_scale), device, g)
        q = fused_qkv_views(num_seqs, group * num_kv_heads, num_kv_heads, head_dim, dtype, device, g)[0] / 30
        meta = DecodeMetadata(torch.tensor(context_lens, dtype=torch.int32, device=device), block_tables.to(device),
                              max(context_lens))
        out = torch.full_like(q, float("nan"))
        poison_allocator(device)
        paged_decode(q, k_cache, v_cache, meta.context_lens, meta.block_tables, head_dim ** -0.5,
                     num_splits=num_splits, out=out, k_scale=k_scale, v_scale=v_scale)
        expected = ref_decode(q, k_cache, v_cache, meta, head_dim ** -0.5, k_scale, v_scale)
        per_head = v_scale.repeat_interleave(group)[:, None]
        assert_close(out / per_head, expected / per_head, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_dtype", FP8, ids=str)
@pytest.mark.parametrize("group,num_kv_heads,head_dim,block_size", [(2, 2, 64, 16), (4, 1, 48, 32)])
def test_fp8_paged_prefill_matches_reference(device, kv_dtype, group, num_kv_heads, head_dim, block_size):
    """Query chunks after cached prefixes: the whole context read back from the FP8 cache."""
    from nanovllm.backends.cuda.attention.triton_prefill import paged_prefill
    g = torch.Generator().manual_seed(group + head_dim)
    k_scale, v_scale = random_scales(num_kv_heads, g, device)
    q_lens, cached = ([5, 40, 1], [30, 0, 70]) if device == "cpu" else ([300, 700, 1], [500, 0, 2000])
    context_lens = [a + b for a, b in zip(q_lens, cached)]
    for dtype in dtypes_for(device):
        block_tables, num_blocks = scattered_block_tables(context_lens, block_size, g)
        k_cache, v_cache = fp8_caches(num_blocks, block_size, num_kv_heads, head_dim, kv_dtype,
                                      (k_scale, v_scale), device, g)
        q = torch.randn(sum(q_lens), group * num_kv_heads, head_dim, generator=g).to(dtype=dtype, device=device) / 30
        k = v = torch.full((sum(q_lens), num_kv_heads, head_dim), float("nan"), dtype=dtype, device=device)  # unread

        def cumulative(lengths):
            return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)

        meta = PrefillMetadata(cumulative(q_lens), cumulative(context_lens), max(q_lens), max(context_lens),
                               block_tables.to(device))
        out = paged_prefill(q, k, v, k_cache, v_cache, meta, head_dim ** -0.5, k_scale=k_scale, v_scale=v_scale)
        expected = ref_prefill(q, k, v, k_cache, v_cache, meta, head_dim ** -0.5, k_scale, v_scale)
        # in units of the V values' own scale, which the dtype tolerances are for: an output row near a
        # sequence's start mixes a few V rows of ~30 x v_scale, so an fp16 kernel's rounding of its softmax
        # weights (2^-11, as in any flash kernel) is ~0.006 x v_scale there (seen on an H200: 3 of 450k elements
        # past 4e-3 x v_scale; a kernel with bf16 weights is off by 0.04 x v_scale)
        per_head = VALUE_SCALE * v_scale.repeat_interleave(group)[:, None]
        assert_close(out / per_head, expected / per_head, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_kernels_refuse_a_cache_without_scales(device):
    from nanovllm.backends.cuda.attention.triton_decode import paged_decode
    from nanovllm.backends.cuda.kv_store import store_kvcache
    cache = torch.zeros(4, 16, 1, 64, device=device).to(torch.float8_e4m3fn)
    key = torch.zeros(3, 1, 64, device=device)
    with pytest.raises(ValueError, match="needs k_scale and v_scale"):
        store_kvcache(key, key, cache, cache.clone(), torch.arange(3, device=device))
    with pytest.raises(ValueError, match="needs k_scale and v_scale"):
        paged_decode(torch.zeros(1, 2, 64, device=device), cache, cache.clone(),
                     torch.tensor([3], dtype=torch.int32, device=device),
                     torch.zeros(1, 1, dtype=torch.int32, device=device), 0.125)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_dtype", FP8, ids=str)
def test_fp8_pair_widening_is_exact_on_every_code(device, kv_dtype):
    """widen_fp8_pairs on all 65,536 16-bit words (every pair of FP8 codes): each byte's float16 equals torch's
    cast of that code. On a GPU this runs the inline assembly (e5m2: byte moves into the high
    byte of a float16; e4m3: cvt), on the CPU the interpreter's plain-integer path."""
    import triton.language as tl
    codes = torch.arange(65536, dtype=torch.int32)
    words = codes.to(torch.int16).to(device)  # bit patterns 0..65535 (int16: torch has no uint16 arithmetic)
    even = torch.empty(65536, dtype=torch.float16, device=device)
    odd = torch.empty_like(even)
    fp8 = tl.float8e5 if kv_dtype == torch.float8_e5m2 else tl.float8e4nv
    _widen_kernel[(65536 // 1024,)](words.view(torch.uint16), even, odd, FP8_DTYPE=fp8, ASM=device == "cuda", BLOCK=1024)
    as_fp8 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(kv_dtype).to(torch.float16)
    # e4m3's two NaN codes (0x7F, 0xFF) are left out: the store saturates and never writes them, and the
    # interpreter's cast does not keep them NaN (the GPU's cvt does)
    lo, hi = codes & 0xFF, codes >> 8
    keep = ~(torch.isnan(as_fp8[lo]) | torch.isnan(as_fp8[hi])) if kv_dtype == torch.float8_e4m3fn else slice(None)
    torch.testing.assert_close(even.cpu()[keep], as_fp8[lo][keep], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(odd.cpu()[keep], as_fp8[hi][keep], rtol=0, atol=0, equal_nan=True)
    if kv_dtype == torch.float8_e5m2:  # the identity the e5m2 path relies on: the code is a float16's high byte
        assert torch.equal((torch.arange(256, dtype=torch.int16) << 8).view(torch.float16).nan_to_num(7),
                           as_fp8.nan_to_num(7))


@pytest.mark.parametrize("device", DEVICES)
def test_decode_in_longest_first_order_gives_the_same_output(device):
    """seq_order only changes which programs start first: every sequence's output stays where it was."""
    from nanovllm.backends.cuda.attention.triton_decode import paged_decode
    from nanovllm.core.step_metadata import longest_first
    g = torch.Generator().manual_seed(7)
    num_seqs, num_kv_heads, group, head_dim, block_size = 6, 2, 2, 64, 16
    k_scale, v_scale = random_scales(num_kv_heads, g, device)
    for kv_dtype in (torch.float32 if device == "cpu" else torch.bfloat16, torch.float8_e4m3fn):
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        context_lens = [17, 150, 3, 90, 150, 64]
        block_tables, num_blocks = scattered_block_tables(context_lens, block_size, g)
        if kv_dtype.itemsize == 1:
            k_cache, v_cache = fp8_caches(num_blocks, block_size, num_kv_heads, head_dim, kv_dtype,
                                          (k_scale, v_scale), device, g)
            scales = dict(k_scale=k_scale, v_scale=v_scale)
        else:
            shape = (num_blocks, block_size, num_kv_heads, head_dim)
            k_cache, v_cache = (torch.randn(shape, generator=g).to(dtype=kv_dtype, device=device) for _ in "kv")
            scales = {}
        q = torch.randn(num_seqs, group * num_kv_heads, head_dim, generator=g).to(dtype=dtype, device=device)
        lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
        order = torch.from_numpy(longest_first(context_lens)).to(device)
        assert order.tolist() == [1, 4, 3, 5, 0, 2]  # longest first, ties in batch order
        for num_splits in (1, 2):
            plain = paged_decode(q, k_cache, v_cache, lens, block_tables.to(device), head_dim ** -0.5,
                                 num_splits=num_splits, **scales)
            ordered = paged_decode(q, k_cache, v_cache, lens, block_tables.to(device), head_dim ** -0.5,
                                   num_splits=num_splits, seq_order=order, **scales)
            torch.testing.assert_close(ordered, plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="seq_order must be"):
        paged_decode(q, k_cache, v_cache, lens, block_tables.to(device), head_dim ** -0.5,
                     seq_order=order.long(), **scales)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_dtype", FP8, ids=str)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size", [(4, 2, 64, 16), (6, 2, 48, 16), (16, 8, 128, 32)])
def test_fp8_rotary_qk_store_matches_reference(device, kv_dtype, num_heads, num_kv_heads, head_dim, block_size):
    """The fused q/k norm + rotary + KV store into an FP8 cache: q and k as rotary.qk's reference, the cache exactly
    what the reference store writes from the kernel's own rotated K (saturating; slots -1 untouched), and the same
    q and cache without returning k. Prefill-sized (many tokens) and decode-sized (a few) calls."""
    from nanovllm.backends.cpu_ref.elementwise import rotary_qk
    from nanovllm.backends.cuda.rotary_store import rotary_qk_store
    g = torch.Generator().manual_seed(num_heads * 100 + head_dim)
    k_scale, v_scale = random_scales(num_kv_heads, g, device)
    for dtype in dtypes_for(device):
        for num_tokens in ((29, 3) if device == "cpu" else (3000, 256)):
            num_blocks = (num_tokens + 20) // block_size + 2
            q, k, v = fused_qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, g)
            k, v = k * 100, v * 100  # beyond the FP8 range at the smaller scales: saturated, not NaN
            slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
            slots[torch.rand(num_tokens, generator=g) < 0.2] = -1
            slots[0] = -1
            slots = slots.to(device)
            positions = torch.randint(0, 64, (num_tokens,), generator=g).to(device)
            cos_sin = torch.randn(64, head_dim, generator=g).to(device)
            for weights in ((None, None), tuple(torch.randn(head_dim, generator=g).to(dtype).to(device) for _ in "qk")):
                shape = (num_blocks, block_size, num_kv_heads, head_dim)
                caches = [torch.full(shape, float("nan"), device=device).to(kv_dtype) for _ in range(6)]
                q_out, k_out = rotary_qk_store(positions, q, k, v, cos_sin, *weights, 1e-6, caches[0], caches[1],
                                               slots, True, k_scale, v_scale)
                q_ref, k_ref = rotary_qk(positions, q, k, cos_sin, *weights, 1e-6)
                assert_close(q_out, q_ref, dtype)
                assert_close(k_out, k_ref, dtype)
                reference_store(k_out, v, caches[2], caches[3], slots, k_scale, v_scale, device)
                q_only, k_none = rotary_qk_store(positions, q, k, v, cos_sin, *weights, 1e-6, caches[4], caches[5],
                                                 slots, False, k_scale, v_scale)
                assert k_none is None and torch.equal(q_only, q_out)
                written = slots[slots >= 0]
                assert torch.isfinite(caches[2].float().flatten(0, 1)[written]).all()
                for got, want in ((caches[0], caches[2]), (caches[1], caches[3]), (caches[4], caches[2]),
                                  (caches[5], caches[3])):
                    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0, equal_nan=True)
