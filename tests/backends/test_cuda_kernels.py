"""The cuda backend's kernels against the cpu_ref kernels on fresh random paged layouts.

On a machine without CUDA the Triton kernels run under Triton's interpreter (float32, small shapes), and
are also compiled for sm_90 to catch what the interpreter cannot; with CUDA they run compiled, in
bfloat16, float16 and float32 with contexts up to 4096. Outputs are poisoned with NaN first, so an
element a kernel fails to write fails the comparison.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # the interpreter must be on before any Triton kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401
    TRITON_REASON = ""
except ImportError as e:
    TRITON_REASON = f"triton is not importable ({e})"

from nanovllm.backends.cpu_ref.attention import decode_attention as ref_decode  # noqa: E402
from nanovllm.backends.cpu_ref.attention import prefill_attention as ref_prefill  # noqa: E402
from nanovllm.backends.cpu_ref.kv_store import store_kvcache as ref_store  # noqa: E402
from nanovllm.backends.cuda.kernels import register_cuda_kernels  # noqa: E402
from nanovllm.core.registry import KernelQuery, KernelRegistry  # noqa: E402
from nanovllm.core.step_metadata import DecodeMetadata, PrefillMetadata  # noqa: E402


def _cpu_skip_reason() -> str:
    if TRITON_REASON:
        return TRITON_REASON
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton's interpreter is off (TRITON_INTERPRET is not 1), so Triton kernels cannot run on the CPU"
    return ""


DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(bool(_cpu_skip_reason()), reason=_cpu_skip_reason() or "-")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA or bool(TRITON_REASON),
                                                                     reason=TRITON_REASON or "needs a CUDA GPU")]),
]
# (rtol, atol): outputs are rounded to the dtype, so two correct kernels may differ by an ulp or two
TOLERANCES = {torch.float32: (1e-3, 2e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}


def dtypes_for(device: str) -> list[torch.dtype]:
    """The interpreter runs float32 only; on a GPU float32 is kept for the engine's exact-comparison runs."""
    return [torch.float32] if device == "cpu" else [torch.bfloat16, torch.float16, torch.float32]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def poison_allocator(device: str):
    """Fill memory the caching allocator will hand out next with NaN, so unwritten scratch shows up."""
    if device == "cuda":  # the caching allocator keeps large (> 1 MiB) and small blocks in separate pools
        torch.full((64 << 20,), float("nan"), device=device)
        [torch.full((128 << 10,), float("nan"), device=device) for _ in range(32)]


# ---- random paged layouts -------------------------------------------------------------------------
def random_caches(num_blocks, block_size, num_kv_heads, head_dim, dtype, device, g):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return (torch.randn(shape, generator=g).to(dtype=dtype, device=device),
            torch.randn(shape, generator=g).to(dtype=dtype, device=device))


def scattered_block_tables(context_lens, block_size, g, extra_blocks=3):
    """Each sequence gets distinct blocks in a shuffled order; rows are 0-padded, at times wider than needed."""
    needed = [(n + block_size - 1) // block_size for n in context_lens]
    num_blocks = sum(needed) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(needed + [1]) + int(torch.randint(0, 3, (1,), generator=g))
    table = torch.zeros(len(context_lens), width, dtype=torch.int32)
    start = 0
    for i, n in enumerate(needed):
        table[i, :n] = torch.tensor(perm[start:start + n], dtype=torch.int32)
        start += n
    return table, num_blocks


def fused_qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, g):
    """q, k, v as the strided views of one qkv projection output that the model hands to attention."""
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, generator=g).to(dtype=dtype, device=device)
    return qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=1)


def random_context_lens(num_seqs, max_len, block_size, g):
    """Edge lengths first (1, a full block, one past it), then random ones."""
    fixed = [1, block_size, block_size + 1, max_len]
    rand = torch.randint(1, max_len + 1, (max(0, num_seqs - len(fixed)),), generator=g).tolist()
    return (fixed + rand)[:num_seqs]


# ---- kv_cache.store --------------------------------------------------------------------------------
STORE_CASES = [(2, 64, 16), (8, 128, 32), (1, 48, 16), (4, 128, 256)]  # (num_kv_heads, head_dim, block_size)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", STORE_CASES)
def test_kv_store_matches_reference(device, num_kv_heads, head_dim, block_size):
    from nanovllm.backends.cuda.kv_store import store_kvcache
    g = torch.Generator().manual_seed(num_kv_heads * 1000 + head_dim + block_size)
    num_tokens = 37 if device == "cpu" else 3000
    num_heads = 2 * num_kv_heads
    for dtype in dtypes_for(device):
        num_blocks = (num_tokens + 20) // block_size + 2
        _, key, value = fused_qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, g)
        slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
        slots[torch.rand(num_tokens, generator=g) < 0.2] = -1  # padding tokens must not be written
        slots = slots.to(device)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
        v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        store_kvcache(key, value, k_cache, v_cache, slots)
        ref_store(key, value, k_ref, v_ref, slots)
        torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)


# ---- attention.decode ------------------------------------------------------------------------------
# (group, num_kv_heads, head_dim, block_size, num_splits, block_n): None = the kernel's own choice.
# block_n 16 with block_size 32 takes the one-lookup-per-tile path; block_size 16 with the default 64
# the per-token lookup; 48 exercises a padded head dim.
DECODE_CASES = [
    (1, 2, 64, 16, None, None),
    (2, 2, 128, 16, 1, None),
    (4, 1, 64, 32, 4, None),
    (8, 1, 64, 16, None, None),
    (2, 2, 64, 256, 3, None),
    (2, 1, 48, 16, 2, None),
    (4, 1, 128, 32, None, 16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group,num_kv_heads,head_dim,block_size,num_splits,block_n", DECODE_CASES)
def test_triton_decode_matches_reference(device, group, num_kv_heads, head_dim, block_size, num_splits, block_n):
    from nanovllm.backends.cuda.attention.triton_decode import DecodeConfig, decode_config, paged_decode
    g = torch.Generator().manual_seed(group * 100 + head_dim + block_size)
    num_seqs, max_len = (5, 300) if device == "cpu" else (24, 4096)
    num_heads = group * num_kv_heads
    config = DecodeConfig(block_n, 4, 2) if block_n else decode_config(head_dim, block_size)
    for dtype in dtypes_for(device):
        context_lens = random_context_lens(num_seqs, max_len, block_size, g)
        block_tables, num_blocks = scattered_block_tables(context_lens, block_size, g)
        k_cache, v_cache = random_caches(num_blocks, block_size, num_kv_heads, head_dim, dtype, device, g)
        q = fused_qkv_views(num_seqs, num_heads, num_kv_heads, head_dim, dtype, device, g)[0]
        meta = DecodeMetadata(torch.tensor(context_lens, dtype=torch.int32, device=device), block_tables.to(device),
                              max_context_len=1)  # deliberately stale: the kernel must not rely on it
        out = torch.full_like(q, float("nan"))
        poison_allocator(device)
        paged_decode(q, k_cache, v_cache, meta.context_lens, meta.block_tables, head_dim ** -0.5,
                     num_splits=num_splits, config=config, out=out)
        meta.max_context_len = max(context_lens)
        assert_close(out, ref_decode(q, k_cache, v_cache, meta, head_dim ** -0.5), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 2])
def test_triton_decode_never_uses_table_entries_past_the_context(device, num_splits):
    """An unsplit launch reads its first tile's block-table entries before it knows the context length (bounded by
    the row's width only): entries past the context may hold anything (the engine leaves stale ids there) and must
    not change the output."""
    from nanovllm.backends.cuda.attention.triton_decode import paged_decode
    g = torch.Generator().manual_seed(11)
    context_lens = [1, 17, 70, 5]
    block_tables, num_blocks = scattered_block_tables(context_lens, 16, g)
    block_tables = torch.cat([block_tables, torch.zeros(4, 6, dtype=torch.int32)], dim=1)  # wider than any context
    wild = block_tables.clone()
    for i, n in enumerate(context_lens):
        used = -(-n // 16)
        pad = wild.shape[1] - used
        wild[i, used:] = torch.tensor([2**30, -7] * pad, dtype=torch.int32)[:pad]
    k_cache, v_cache = random_caches(num_blocks, 16, 2, 64, torch.float32, device, g)
    q = torch.randn(4, 4, 64, generator=g).to(device)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
    got = paged_decode(q, k_cache, v_cache, lens, wild.to(device), 0.125, num_splits=num_splits)
    meta = DecodeMetadata(lens, block_tables.to(device), max(context_lens))
    assert_close(got, ref_decode(q, k_cache, v_cache, meta, 0.125), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_decode_empty_context_gives_zeros(device, num_splits):
    """Padded batches under CUDA graphs may carry context_len 0: the output must be finite (zero)."""
    from nanovllm.backends.cuda.attention.triton_decode import paged_decode
    g = torch.Generator().manual_seed(7)
    context_lens = [0, 20, 0]
    block_tables, num_blocks = scattered_block_tables(context_lens, 16, g)
    k_cache, v_cache = random_caches(num_blocks, 16, 2, 64, torch.float32, device, g)
    q = torch.randn(3, 4, 64, generator=g).to(device)
    out = torch.full_like(q, float("nan"))
    poison_allocator(device)
    paged_decode(q, k_cache, v_cache, torch.tensor(context_lens, dtype=torch.int32, device=device),
                 block_tables.to(device), 0.125, num_splits=num_splits, out=out)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    meta = DecodeMetadata(torch.tensor([20], dtype=torch.int32, device=device), block_tables[1:2].to(device), 20)
    assert_close(out[1:2], ref_decode(q[1:2], k_cache, v_cache, meta, 0.125), torch.float32)


# ---- attention.prefill -----------------------------------------------------------------------------
# (group, num_kv_heads, head_dim, block_size, paged)
PREFILL_CASES = [
    (1, 2, 64, 16, True),
    (2, 1, 128, 32, True),
    (4, 1, 64, 16, True),
    (8, 1, 64, 32, True),
    (2, 1, 64, 256, True),
    (2, 1, 48, 16, True),
    (1, 1, 64, 16, False),
    (4, 1, 128, 16, False),
    (2, 1, 48, 16, False),
]


def prefill_batch(paged: bool, device: str, g):
    """Query-chunk lengths and cached-prefix lengths; cached prefixes only exist with a block table."""
    if device == "cpu":
        q_lens, cached = [1, 70, 130, 9], [0, 33, 64, 250]
    else:
        q_lens = [1, 1024, 700, 333, 2048, 64] + torch.randint(1, 1025, (4,), generator=g).tolist()
        cached = [0, 0, 3000, 17, 2048, 4000] + torch.randint(0, 3000, (4,), generator=g).tolist()
    return q_lens, (cached if paged else [0] * len(q_lens))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group,num_kv_heads,head_dim,block_size,paged", PREFILL_CASES)
def test_triton_prefill_matches_reference(device, group, num_kv_heads, head_dim, block_size, paged):
    from nanovllm.backends.cuda.attention.triton_prefill import paged_prefill
    g = torch.Generator().manual_seed(group * 100 + head_dim + block_size + paged)
    num_heads = group * num_kv_heads
    for dtype in dtypes_for(device):
        q_lens, cached = prefill_batch(paged, device, g)
        meta, q, k, v, k_cache, v_cache = make_prefill_inputs(q_lens, cached, paged, num_heads, num_kv_heads,
                                                              head_dim, block_size, dtype, device, g)
        out = torch.full_like(q, float("nan"))
        paged_prefill(q, k, v, k_cache, v_cache, meta, head_dim ** -0.5, out=out)
        assert_close(out, ref_prefill(q, k, v, k_cache, v_cache, meta, head_dim ** -0.5), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("context", [None, 1024])
def test_triton_prefill_tiles_for_long_and_short_contexts_match_reference(device, paged, context):
    """The head_dim-128 tile configs (`prefill_config` picks by the step's longest context and the cache's dtype;
    the short-context ones take two query heads a program) on the same batch."""
    from nanovllm.backends.cuda.attention.triton_prefill import paged_prefill, prefill_config
    g = torch.Generator().manual_seed(11 + paged)
    for dtype in dtypes_for(device):
        q_lens, cached = prefill_batch(paged, device, g)
        meta, q, k, v, k_cache, v_cache = make_prefill_inputs(q_lens, cached, paged, 4, 2, 128, 16, dtype, device, g)
        out = torch.full_like(q, float("nan"))
        expected = ref_prefill(q, k, v, k_cache, v_cache, meta, 128 ** -0.5)
        for kv_fp8 in (False, True):  # the FP8 cache's tiles, here on a cache of q's dtype
            paged_prefill(q, k, v, k_cache, v_cache, meta, 128 ** -0.5, out=out,
                          config=prefill_config(128, dtype, context, kv_fp8))
            assert_close(out, expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("group,pack,packed", [(2, 2, 2), (4, 4, 4), (4, 2, 2), (8, 4, 4), (6, 4, 2), (3, 2, 1)])
def test_triton_prefill_packed_heads_match_reference(device, paged, group, pack, packed):
    """A program may take several query heads of one KV head (their rows stacked in one tile): the largest power of
    two dividing both the group and `pack` (6 heads a KV head with pack 4: 2; 3 heads: 1). Every packing gives the
    reference's output, on short and long tiles."""
    from nanovllm.backends.cuda.attention.triton_prefill import PrefillConfig, paged_prefill
    g = torch.Generator().manual_seed(group * 10 + pack + paged)
    small = device == "cpu"
    configs = [PrefillConfig(16 if small else 64, 16 if small else 64, 4, 2, pack),
               PrefillConfig(32 if small else 128, 16 if small else 64, 4 if small else 8, 2, pack)]
    for dtype in dtypes_for(device):
        q_lens, cached = prefill_batch(paged, device, g)
        meta, q, k, v, k_cache, v_cache = make_prefill_inputs(q_lens, cached, paged, 2 * group, 2, 64, 16, dtype,
                                                              device, g)
        expected = ref_prefill(q, k, v, k_cache, v_cache, meta, 0.125)
        for config in configs:
            assert config.heads_per_program(group) == packed
            out = torch.full_like(q, float("nan"))
            paged_prefill(q, k, v, k_cache, v_cache, meta, 0.125, out=out, config=config)
            assert_close(out, expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_prefill_reads_this_steps_kv_for_sequences_with_no_cached_prefix(device):
    """In a paged step a cache in k's dtype holds exactly this chunk's k and v, so a sequence with no cached prefix
    reads them from k and v, not through the block table; a sequence continuing a prefix reads the cache. Shown by
    poisoning the cache rows of the prefix-free sequences after their k/v were taken: the output stays the
    reference's on the intact cache."""
    from nanovllm.backends.cuda.attention.triton_prefill import paged_prefill
    g = torch.Generator().manual_seed(5)
    for dtype in dtypes_for(device):
        q_lens, cached = [40, 70, 1, 90], [0, 33, 0, 0]
        meta, q, k, v, k_cache, v_cache = make_prefill_inputs(q_lens, cached, True, 4, 2, 64, 16, dtype, device, g)
        expected = ref_prefill(q, k, v, k_cache, v_cache, meta, 0.125)
        poisoned_k, poisoned_v = k_cache.clone(), v_cache.clone()
        for i in (0, 2, 3):
            used = -(-q_lens[i] // 16)
            blocks = meta.block_tables[i, :used].long()
            poisoned_k[blocks] = float("nan")
            poisoned_v[blocks] = float("nan")
        out = paged_prefill(q, k, v, poisoned_k, poisoned_v, meta, 0.125)
        assert_close(out, expected, dtype)
        poisoned_k[meta.block_tables[1, 0].long()] = float("nan")  # the continued sequence reads its prefix there
        out = paged_prefill(q, k, v, poisoned_k, poisoned_v, meta, 0.125)
        assert torch.isnan(out[40:110]).all() and not torch.isnan(out[:40]).any()
        meta.prefix_free_tokens = 131  # the step says how many: too few tokens for a launch of their own
        out = paged_prefill(q, k, v, poisoned_k, poisoned_v, meta, 0.125)
        assert torch.isnan(out).all()


def test_prefill_reads_prefix_free_sequences_apart_only_in_big_enough_steps():
    from nanovllm.backends.cuda.attention.triton_prefill import SPLIT_LAUNCH_TOKENS, split_launch
    from nanovllm.core.step_metadata import PrefillMetadata
    n = SPLIT_LAUNCH_TOKENS

    def meta(prefix_free):
        return PrefillMetadata(torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32), 1, 1,
                               torch.zeros(1, 1, dtype=torch.int32), prefix_free)
    assert split_launch(meta(None), 10)  # not known: read apart (correct either way)
    assert split_launch(meta(n - 100), n) and split_launch(meta(n // 2), n)
    assert not split_launch(meta(n // 2 - 1), n)  # fewer than half the tokens
    assert not split_launch(meta(n), n)  # every sequence prefix-free: nothing to read apart
    assert not split_launch(meta(n - 100), n - 1)  # fewer tokens than a launch of their own pays for
    assert not split_launch(meta(0), 2 * n)  # every sequence continued
    assert not split_launch(meta(100), 128)  # a small step: a second launch costs more than it saves


def test_prefill_tiles_follow_the_longest_context():
    from nanovllm.backends.cuda.attention.triton_prefill import SHORT_CONTEXT, PrefillConfig, prefill_config
    long, short = PrefillConfig(128, 64, 8, 3), PrefillConfig(64, 32, 4, 3, pack=2)
    short_fp8 = PrefillConfig(64, 64, 4, 3, pack=2)
    assert prefill_config(128, torch.bfloat16, SHORT_CONTEXT) == short
    assert prefill_config(128, torch.bfloat16, SHORT_CONTEXT, kv_fp8=True) == short_fp8
    assert prefill_config(128, torch.bfloat16, SHORT_CONTEXT + 1) == long
    assert prefill_config(128, torch.bfloat16, SHORT_CONTEXT + 1, kv_fp8=True) == long
    assert prefill_config(128, torch.bfloat16) == long  # no context given: the tiles that serve any
    assert short.heads_per_program(2) == 2 and short.heads_per_program(1) == 1 and long.heads_per_program(2) == 1
    assert prefill_config(64, torch.bfloat16, 100) == prefill_config(64, torch.bfloat16, 10_000)


def make_prefill_inputs(q_lens, cached, paged, num_heads, num_kv_heads, head_dim, block_size, dtype, device, g):
    context_lens = [a + b for a, b in zip(q_lens, cached)]
    block_tables, num_blocks = scattered_block_tables(context_lens, block_size, g)
    k_cache, v_cache = random_caches(num_blocks, block_size, num_kv_heads, head_dim, dtype, device, g)
    q, k, v = fused_qkv_views(sum(q_lens), num_heads, num_kv_heads, head_dim, dtype, device, g)
    if paged:  # this chunk's K/V were stored before attention runs: take them from the cache
        rows = [block_tables[i, t // block_size] * block_size + t % block_size
                for i, (c, n) in enumerate(zip(cached, context_lens)) for t in range(c, n)]
        flat = torch.tensor(rows, dtype=torch.long, device=device)
        k = k_cache.flatten(0, 1)[flat]
        v = v_cache.flatten(0, 1)[flat]

    def cumulative(lengths):
        return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)

    meta = PrefillMetadata(cumulative(q_lens), cumulative(context_lens), max(q_lens), max(context_lens),
                           block_tables.to(device) if paged else None)
    return meta, q, k, v, k_cache, v_cache


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("group", [1, 4])
def test_torch_flash_prefill_matches_reference(paged, group):
    from nanovllm.backends.cuda.attention.torch_flash import prefill_attention
    g = torch.Generator().manual_seed(11 + group)
    for dtype in (torch.bfloat16, torch.float16):  # FlashAttention has no float32
        q_lens, cached = prefill_batch(paged, "cuda", g)
        meta, q, k, v, k_cache, v_cache = make_prefill_inputs(q_lens, cached, paged, 4 * group, 4, 128, 16,
                                                              dtype, "cuda", g)
        out = prefill_attention(q, k, v, k_cache, v_cache, meta, 128 ** -0.5)
        assert_close(out, ref_prefill(q, k, v, k_cache, v_cache, meta, 128 ** -0.5), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_flash_attn_adapter_matches_reference():
    pytest.importorskip("flash_attn", reason="flash_attn is not installed")
    from nanovllm.backends.cuda.attention import flash_attn as adapter
    g = torch.Generator().manual_seed(3)
    q_lens, cached = prefill_batch(True, "cuda", g)
    meta, q, k, v, k_cache, v_cache = make_prefill_inputs(q_lens, cached, True, 16, 8, 128, 256,
                                                          torch.bfloat16, "cuda", g)
    out = adapter.prefill_attention(q, k, v, k_cache, v_cache, meta, 128 ** -0.5)
    assert_close(out, ref_prefill(q, k, v, k_cache, v_cache, meta, 128 ** -0.5), torch.bfloat16)
    context_lens = torch.diff(meta.cu_seqlens_k).to(torch.int32)
    decode_meta = DecodeMetadata(context_lens, meta.block_tables, int(context_lens.max()))
    qd = q[meta.cu_seqlens_q[1:].long() - 1]
    out = adapter.decode_attention(qd, k_cache, v_cache, decode_meta, 128 ** -0.5)
    assert_close(out, ref_decode(qd, k_cache, v_cache, decode_meta, 128 ** -0.5), torch.bfloat16)


# ---- compiled for an H100 without one --------------------------------------------------------------
@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the tests above compile the kernels for real")
@pytest.mark.skipif(bool(TRITON_REASON) or importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason=TRITON_REASON or "triton has no NVIDIA backend")
def test_kernels_compile_for_h100_without_spills():
    """The interpreter runs kernels as numpy; this lowers them to sm_90 machine code, as on the device."""
    script = os.path.join(os.path.dirname(__file__), "compile_cuda_kernels.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_compiled_variants_counts_every_launched_kernel():
    """compiled_variants (start-up compiles everything a run needs: the e2e tests and profile_steps --first-times
    compare its counts) finds the kernels of every module of the backend, nested folders included, none compiled
    before a launch. In a process without the interpreter, where triton.jit gives compilable functions."""
    code = ("from nanovllm.backends.cuda.compiled import compiled_variants; c = compiled_variants(); "
            "print(sorted(c)); print(sum(c.values()))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    names, total = result.stdout.splitlines()[-2:]
    for kernel in ("attention.triton_decode._decode_split_kernel", "attention.triton_prefill._prefill_kernel",
                   "attention.triton_decode_balanced._balanced_decode_kernel", "kv_store._store_kv_kernel",
                   "linear._linear_kernel", "qkv_rotary_store._qkv_rotary_store_kernel",
                   "rotary_store._qk_norm_rope_store_kernel", "elementwise._silu_mul_kernel", "sampler._pick_kernel"):
        assert repr(kernel) in names, (kernel, names)
    assert total == "0"


# ---- registration and checks (no GPU or triton needed) ---------------------------------------------
def test_registers_every_kernel_with_a_check():
    registry = KernelRegistry()
    register_cuda_kernels(registry)
    names = {op: sorted(i.name for i in registry.candidates(op, "cuda")) for op in registry.impls}
    assert names["kv_cache.store"] == ["triton"]
    assert names["attention.prefill"] == ["flash_attn", "torch_flash", "triton_paged"]
    assert names["attention.decode"] == ["flash_attn", "triton_paged"]
    assert names["rotary.qk"] == ["triton"] and names["act.silu_mul"] == ["triton"]
    assert names["rotary.qk_store"] == ["triton"]
    cpu_query = KernelQuery("cpu", torch.float32, 128, 16, 8, 16)
    for impls in registry.impls.values():
        for impl in impls:
            assert "needs CUDA (device_type is cpu)" in impl.reasons(cpu_query)


def test_default_plan_runs_prefill_on_triton_where_every_kernel_could_serve():
    """On a GPU with triton and flash-attn (every check passes but flash-attn's block-size rule), at the default
    16-token blocks the packaged plugins.toml order and the priorities both pick triton_paged over torch_flash
    (round twenty-three: torch's FA2 varlen measured 1.4-1.7x slower)."""
    import dataclasses
    from nanovllm.core.plugins import DEFAULT_TOML
    from nanovllm.core.plugins_toml import read_toml
    registry = KernelRegistry()
    register_cuda_kernels(registry)
    for impls in registry.impls.values():
        impls[:] = [dataclasses.replace(i, check=lambda query: []) if i.name != "flash_attn" else
                    dataclasses.replace(i, check=lambda query: [] if query.block_size % 256 == 0 else ["blocks"])
                    for i in impls]
    query = KernelQuery("cuda", torch.bfloat16, 128, 16, 8, 16)
    preferences = read_toml(DEFAULT_TOML)["kernels"]["cuda"]
    for prefs in (preferences, {}):
        plan = registry.resolve("cuda", query, prefs, ops=["attention.prefill"])
        assert plan.choices["attention.prefill"].impl.name == "triton_paged", prefs


def test_checks_explain_unsupported_queries():
    from nanovllm.backends.cuda.kernels import check_flash_attn, check_torch_flash, check_triton
    query = KernelQuery("cuda", torch.float64, 512, 12, 8, 16)
    assert any("head_dim 512" in r for r in check_triton(query))
    assert any("float64" in r for r in check_triton(query))
    assert any("not a multiple of num_kv_heads" in r for r in check_triton(query))
    assert any("float64" in r for r in check_torch_flash(query))
    assert any("block_size must be a multiple of 256" in r for r in check_flash_attn(query))


def test_importing_the_kernel_table_loads_no_triton():
    code = ("import sys, nanovllm.backends.cuda.kernels; "
            "sys.exit('triton' in sys.modules or 'flash_attn' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("device", DEVICES)
def test_triton_sampler_greedy_rows_and_distribution(device):
    """Greedy rows equal argmax exactly; sampled rows follow softmax(logits / T) (chi-square, fixed seed)."""
    from nanovllm.backends.cuda.sampler import sample
    from nanovllm.core.sampler import SamplingTensors
    torch.manual_seed(0)
    vocab, draws = 50, 1500 if device == "cpu" else 20000
    base = torch.randn(vocab, device=device) * 2
    logits = base.expand(draws, vocab).contiguous()
    logits[:8] = torch.randn(8, vocab, device=device)  # greedy rows: their own argmax
    temperatures = torch.full((draws,), 0.7, device=device)
    temperatures[:8] = 0
    tokens = sample(logits, SamplingTensors(temperatures))
    assert tokens.dtype == torch.int64 and tokens.shape == (draws,)
    assert torch.equal(tokens[:8], logits[:8].argmax(-1))
    counts = torch.bincount(tokens[8:].cpu(), minlength=vocab).double()
    expected = (base.cpu().double() / 0.7).softmax(-1) * (draws - 8)
    keep = expected > 5  # chi-square over the cells with enough mass
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5, f"chi-square {chi2:.1f} with {dof} degrees of freedom"


@pytest.mark.parametrize("device", DEVICES)
def test_triton_sampler_across_vocabulary_slices(device):
    """Rows cut into several slices: greedy rows take the first of tied maxima wherever they fall, and sampled rows
    follow softmax(logits / T) across slice boundaries (chi-square, fixed seed); the seed advances in place, and the
    same seed draws the same tokens."""
    from nanovllm.backends.cuda.sampler import split_sample
    torch.manual_seed(1)
    vocab, draws = 200, 800 if device == "cpu" else 20000
    base = torch.randn(vocab, device=device)
    base[[10, 70, 130, 190]] += 3  # mass in four different slices of 64
    logits = base.expand(draws, vocab).contiguous()
    logits[:6] = torch.randn(6, vocab, device=device)
    logits[5, [150, 66, 199]] = 50.0  # a tie across slices: the lowest index wins, as torch.argmax
    temperatures = torch.full((draws,), 0.8, device=device)
    temperatures[:6] = 0
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    tokens = split_sample(logits, temperatures, seed, slice_size=64, block=32)
    assert seed.item() == 1235
    assert torch.equal(tokens[:6], logits[:6].argmax(-1)) and tokens[5].item() == 66
    counts = torch.bincount(tokens[6:].cpu(), minlength=vocab).double()
    expected = (base.cpu().double() / 0.8).softmax(-1) * (draws - 6)
    keep = expected > 5
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5, f"chi-square {chi2:.1f} with {dof} degrees of freedom"
    again = split_sample(logits, temperatures, torch.tensor([1234], dtype=torch.int64, device=device), 64, 32)
    assert torch.equal(tokens, again)  # the same seed draws the same tokens
    assert not torch.equal(tokens, split_sample(logits, temperatures, seed, 64, 32))  # the advanced one others


@pytest.mark.parametrize("device", DEVICES)
def test_triton_sampler_never_draws_masked_tokens(device):
    """-inf logits (min_tokens, structured masks, allowed tokens act before the sampler) are never drawn, also when
    whole slices are masked; the finite ones keep softmax's proportions; a row with one finite token draws it."""
    from nanovllm.backends.cuda.sampler import split_sample
    torch.manual_seed(2)
    vocab, draws = 300, 600 if device == "cpu" else 20000
    base = torch.randn(vocab, device=device)
    allowed = torch.zeros(vocab, dtype=torch.bool, device=device)
    allowed[[3, 5, 130, 131, 299]] = True  # slices 0, 2 and 4 of 64; slices 1 and 3 are all -inf
    logits = base.masked_fill(~allowed, float("-inf")).expand(draws, vocab).contiguous()
    logits[0] = float("-inf")
    logits[0, 200] = -30.0  # the only finite token of its row
    temperatures = torch.full((draws,), 0.5, device=device)
    tokens = split_sample(logits, temperatures, torch.tensor([7], device=device), slice_size=64, block=32).cpu()
    assert tokens[0].item() == 200
    assert allowed.cpu()[tokens[1:]].all(), sorted(set(tokens[1:].tolist()) - set(allowed.nonzero().flatten().tolist()))
    counts = torch.bincount(tokens[1:], minlength=vocab).double()[allowed.cpu()]
    expected = (base.cpu().double()[allowed.cpu()] / 0.5).softmax(-1) * (draws - 1)
    keep = expected > 5
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5 + 10, f"chi-square {chi2:.1f} with {dof} degrees of freedom"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or bool(TRITON_REASON), reason=TRITON_REASON or "needs a CUDA GPU")
def test_triton_sampler_captured_in_a_graph_draws_fresh_tokens_on_every_replay():
    """Captured with a device seed (as the decode graphs capture it), each replay advances the seed: replays draw
    new tokens that follow softmax(logits / T), and greedy rows stay the argmax of Qwen3-sized rows."""
    from nanovllm.backends.cuda.sampler import sample
    from nanovllm.core.sampler import SamplingTensors
    torch.manual_seed(3)
    rows, vocab, replays = 64, 151936, 300
    logits = torch.full((rows, vocab), -40.0, device="cuda")
    base = torch.randn(40, device="cuda")
    logits[:, 100_000:100_040] = base  # the mass in one slice but the last
    logits[:4] = torch.randn(4, vocab, device="cuda")
    logits = logits.bfloat16()
    temperatures = torch.full((rows,), 0.9, device="cuda")
    temperatures[:4] = 0
    params = SamplingTensors(temperatures, seed=torch.tensor([11], device="cuda"))
    sample(logits, params)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = sample(logits, params)
    draws = []
    for _ in range(replays):
        graph.replay()
        draws.append(tokens.clone())
    draws = torch.stack(draws)
    assert params.seed.item() == 11 + 1 + replays
    assert torch.equal(draws[:, :4], logits[:4].argmax(-1).expand(replays, 4))
    sampled = draws[:, 4:].flatten().cpu() - 100_000
    assert ((sampled >= 0) & (sampled < 40)).all()
    assert not torch.equal(draws[0, 4:], draws[1, 4:])
    counts = torch.bincount(sampled, minlength=40).double()
    probs = torch.cat([base.cpu().double(), torch.full((vocab - 40,), -40.0, dtype=torch.float64)])
    expected = (probs / 0.9).softmax(-1)[:40] * sampled.numel()
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 39 + 6 * (2 * 39) ** 0.5, f"chi-square {chi2:.1f} with 39 degrees of freedom"


ELEMENTWISE_CASES = [(torch.float32, 64, 4, 2), (torch.float32, 48, 6, 3), (torch.bfloat16, 128, 16, 8)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["rotary.qk", "act.silu_mul", "rotary.qk_store", "norm.add_rms"])
@pytest.mark.parametrize("dtype,head_dim,num_heads,num_kv_heads", ELEMENTWISE_CASES)
def test_elementwise_kernels_match_reference(device, op, dtype, head_dim, num_heads, num_kv_heads):
    """The fused q/k norm + rotary (+ KV store), SiLU-and-mul and residual add + RMSNorm kernels against their cpu_ref
    twins (the parity checks: prefill- and decode-shaped, slots -1 skipped; rows not a power of two wide)."""
    from nanovllm.testing.layouts import ParityCase
    from nanovllm.testing.parity import CHECKS
    if dtype not in dtypes_for(device):
        pytest.skip(f"the interpreter runs float32 only ({dtype} runs on a GPU)")
    registry = KernelRegistry()
    register_cuda_kernels(registry)
    fn = registry.candidates(op, "cuda")[0].fn
    case = ParityCase(dtype, head_dim, num_heads, num_kv_heads)
    for _, check in CHECKS[op]:
        check(fn, case, torch.device(device), torch.Generator().manual_seed(head_dim))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,d", [(5, 3072), (3, 1500), (1, 64), (520, 3072)])
def test_row_scaled_silu_mul_matches_torch(device, rows, d):
    """The folded norms' SiLU (backends/cuda/norm_folding.py): gate and up scaled by 1/RMS of another tensor's row,
    rounded to the dtype, then silu(gate) * up (a width of several column blocks, one not a multiple of the block,
    one below it, and a prefill-sized call, whose rows take one padded block each)."""
    from nanovllm.backends.cuda.elementwise import silu_mul
    g = torch.Generator().manual_seed(rows * d)
    for dtype in dtypes_for(device):
        x = (torch.randn(rows, 2 * d, generator=g) * 3).to(dtype).to(device)
        r = (torch.randn(rows, 96, generator=g) * 5).to(dtype).to(device)
        s = torch.rsqrt(r.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        gate, up = ((half.float() * s).to(dtype).float() for half in x.chunk(2, dim=-1))
        want = ((gate * torch.sigmoid(gate)).to(dtype).float() * up).to(dtype)
        assert_close(silu_mul(x, row_scale_of=r, eps=1e-6), want, dtype)
        with pytest.raises(ValueError, match="row_scale_of"):
            silu_mul(x, row_scale_of=r[:1] if rows > 1 else r.t(), eps=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_tokens", [7, 520])
def test_rotary_qk_store_launch_shapes_agree(device, num_tokens):
    """rotary.qk_store with a token's heads shared out over 1, 2, 4 or 8 programs of 1-4 warps (the shapes
    `launch_shape` picks by batch size, and its choice): the same q, k, V rows and cache contents (a bf16 cache,
    the folded norm's row scale, slots -1 skipped), exactly under the interpreter and within the dtype's rounding
    compiled (another warp count sums in another order); head_groups that do not divide the heads are refused."""
    from nanovllm.backends.cuda.rotary_store import launch_shape, rotary_qk_store
    heads, kv_heads, head_dim, block = 16, 8, 128, 16
    g = torch.Generator().manual_seed(num_tokens)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = fused_qkv_views(num_tokens, heads, kv_heads, head_dim, dtype, device, g)
    x = torch.randn(num_tokens, 96, generator=g).to(dtype).to(device)
    positions = torch.randint(0, 64, (num_tokens,), generator=g).to(device)
    cos_sin = torch.randn(64, head_dim, generator=g).to(device)
    weights = tuple(torch.randn(head_dim, generator=g).to(dtype).to(device) for _ in "qk")
    num_blocks = num_tokens // block + 2
    slots = torch.randperm(num_blocks * block, generator=g)[:num_tokens]
    slots[::5] = -1
    slots = slots.to(device)
    results = []
    shapes = [(1, 4), (2, 4), (4, 1), (8, 1), (1, 2)] if num_tokens <= 192 else [(1, 4)]  # None: a prefill's (1, 2)
    for shape in shapes + [(None, None)]:
        caches = [torch.full((num_blocks, block, kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
                  for _ in "kv"]
        v_in = v.clone()
        q_out, k_out = rotary_qk_store(positions, q, k, v_in, cos_sin, *weights, 1e-6, *caches, slots, True,
                                       row_scale_of=x, row_eps=1e-6, head_groups=shape[0], warps=shape[1])
        results.append((q_out, k_out, v_in, *caches))
    for got in results[1:]:
        for a, b in zip(results[0], got):
            if device == "cpu":
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
            else:
                torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, equal_nan=True)
    written = slots[slots >= 0]
    assert not results[0][3].flatten(0, 1)[written].isnan().any()
    for h, kv, fp8 in ((14, 2, False), (6, 3, False), (16, 8, True), (32, 4, False)):
        groups, warps = launch_shape(num_tokens, h, kv, fp8)
        assert h % groups == 0 and kv % groups == 0 and warps in (1, 2, 4, 8)
    with pytest.raises(ValueError, match="head_groups=3"):
        rotary_qk_store(positions, q, k, v.clone(), cos_sin, *weights, 1e-6, *caches, slots, False, head_groups=3)
