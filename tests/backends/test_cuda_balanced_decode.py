"""The load-balanced decode schedule (triton_decode_balanced) against the cpu_ref decode, on fresh random paged
layouts: uneven lengths, context-0 rows (padded graph batches), sequences cut across several programs, programs
with no tiles, longest-first order, bf16/fp16/fp32 and FP8 caches. Same set-up as test_cuda_kernels.py (Triton's
interpreter in float32 on a machine without CUDA); outputs are poisoned with NaN first.
"""
import pytest
import torch

from tests.backends.test_cuda_fp8_kernels import fp8_caches, random_scales
from tests.backends.test_cuda_kernels import (DEVICES, assert_close, dtypes_for, fused_qkv_views, poison_allocator,
                                              random_caches, scattered_block_tables)
from nanovllm.backends.cpu_ref.attention import decode_attention as ref_decode
from nanovllm.core.step_metadata import DecodeMetadata, longest_first

# (context_lens, num_programs per KV head): with 64-token tiles (16-token pages) each row is a different split of
# the tile range: few programs holding several whole sequences, one sequence cut over many programs, more
# programs than tiles (empty programs inside a sequence), context 0 first, in the middle and at the very end
CASES = [
    ([0, 20, 0], 3),
    ([5, 130, 64, 1, 300], 7),
    ([300], 9),
    ([0, 0], 2),
    ([17, 0, 150, 0, 64, 0], 5),
    ([64, 64, 64, 65], 1),
    ([3, 3], 40),
]


def _inputs(context_lens, group, num_kv_heads, head_dim, block_size, dtype, kv_dtype, device, g):
    block_tables, num_blocks = scattered_block_tables(context_lens, block_size, g)
    scales = {}
    if kv_dtype is not None and kv_dtype.itemsize == 1:
        k_scale, v_scale = random_scales(num_kv_heads, g, device)
        k_cache, v_cache = fp8_caches(num_blocks, block_size, num_kv_heads, head_dim, kv_dtype, (k_scale, v_scale),
                                      device, g)
        scales = dict(k_scale=k_scale, v_scale=v_scale)
    else:
        k_cache, v_cache = random_caches(num_blocks, block_size, num_kv_heads, head_dim, dtype, device, g)
    q = fused_qkv_views(len(context_lens), group * num_kv_heads, num_kv_heads, head_dim, dtype, device, g)[0]
    meta = DecodeMetadata(torch.tensor(context_lens, dtype=torch.int32, device=device), block_tables.to(device),
                          max(context_lens + [1]))
    return q / (30 if scales else 1), k_cache, v_cache, meta, scales


def _check(out, q, k_cache, v_cache, meta, scales, group, dtype):
    expected = ref_decode(q, k_cache, v_cache, meta, q.shape[-1] ** -0.5, *scales.values())
    empty = meta.context_lens == 0
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))  # padded rows: 0, not NaN
    per_head = scales["v_scale"].repeat_interleave(group)[:, None] if scales else 1.0
    assert_close(out[~empty] / per_head, expected[~empty] / per_head, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("context_lens,num_programs", CASES)
def test_balanced_decode_matches_reference(device, context_lens, num_programs):
    from nanovllm.backends.cuda.attention.triton_decode import paged_decode
    g = torch.Generator().manual_seed(len(context_lens) * 100 + num_programs)
    for dtype in dtypes_for(device):
        for group, num_kv_heads, head_dim, block_size in ((2, 2, 64, 16), (4, 1, 48, 32)):
            q, k_cache, v_cache, meta, _ = _inputs(context_lens, group, num_kv_heads, head_dim, block_size, dtype,
                                                   None, device, g)
            out = torch.full_like(q, float("nan"))
            poison_allocator(device)
            paged_decode(q, k_cache, v_cache, meta.context_lens, meta.block_tables, head_dim ** -0.5, out=out,
                         num_programs=num_programs)
            _check(out, q, k_cache, v_cache, meta, {}, group, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_balanced_decode_fp8_in_longest_first_order(device, kv_dtype):
    """FP8 caches (scales folded in), sequences in longest-first order and cut across programs: the same output
    rows as the reference, each where its sequence is."""
    from nanovllm.backends.cuda.attention.triton_decode import paged_decode
    g = torch.Generator().manual_seed(11)
    context_lens = [90, 0, 300, 17, 150] if device == "cpu" else [90, 0, 3000, 17, 1500, 4096, 0, 640]
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    group, num_kv_heads, head_dim = 2, 2, 64
    q, k_cache, v_cache, meta, scales = _inputs(context_lens, group, num_kv_heads, head_dim, 16, dtype, kv_dtype,
                                                device, g)
    order = torch.from_numpy(longest_first(context_lens)).to(device)
    for num_programs in (2, 6):
        out = torch.full_like(q, float("nan"))
        poison_allocator(device)
        paged_decode(q, k_cache, v_cache, meta.context_lens, meta.block_tables, head_dim ** -0.5, out=out,
                     seq_order=order, num_programs=num_programs, **scales)
        _check(out, q, k_cache, v_cache, meta, scales, group, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_balanced_decode_captured_once_serves_any_lengths():
    """One graph captured at some context lengths, replayed with others (longer, shorter, 0): each replay matches
    the reference, so nothing in the launch depends on the lengths."""
    from nanovllm.backends.cuda.attention.triton_decode import paged_decode
    g = torch.Generator().manual_seed(5)
    group, num_kv_heads, head_dim, block_size, num_seqs = 2, 8, 128, 16, 12
    max_blocks = 4096 // block_size
    k_cache, v_cache = random_caches(num_seqs * max_blocks, block_size, num_kv_heads, head_dim, torch.bfloat16,
                                     "cuda", g)
    tables = torch.randperm(num_seqs * max_blocks, generator=g).int().view(num_seqs, max_blocks).cuda()
    lens = torch.full((num_seqs,), 100, dtype=torch.int32, device="cuda")
    order = torch.arange(num_seqs, dtype=torch.int32, device="cuda")
    q = torch.randn(num_seqs, group * num_kv_heads, head_dim, generator=g).to(torch.bfloat16).cuda()
    out = torch.empty_like(q)

    def run():
        paged_decode(q, k_cache, v_cache, lens, tables, head_dim ** -0.5, out=out, seq_order=order, num_programs=17)

    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for context_lens in ([100] * num_seqs, [4096, 1] + [0] * 10, list(range(1, 4096, 4096 // num_seqs))[:num_seqs]):
        lens.copy_(torch.tensor(context_lens, dtype=torch.int32))
        order.copy_(torch.from_numpy(longest_first(context_lens)))
        out.fill_(float("nan"))
        graph.replay()
        meta = DecodeMetadata(lens, tables, max(context_lens))
        _check(out, q, k_cache, v_cache, meta, {}, group, torch.bfloat16)


def test_decode_plan_is_the_measured_table_and_a_function_of_the_launch_shape(monkeypatch):
    """On a 132-SM GPU at Qwen3-0.6B's shape (8 KV heads, head_dim 128, 16-token pages): the schedule measured best
    per batch (benchmarks/RESULTS.md); other shapes keep the split rule. The plan takes no context lengths, so a
    graph captured for a batch size serves any."""
    from nanovllm.backends.cuda.attention import triton_decode as dec
    monkeypatch.setattr(dec, "num_sms", lambda device: 132)
    cuda = torch.device("cuda")

    def plan(num_seqs, kv_dtype=torch.bfloat16, head_dim=128, dtype=torch.bfloat16):
        return dec.decode_plan(num_seqs, 8, head_dim, 16, dtype, kv_dtype, cuda)

    default, wide, deep = dec.DecodeConfig(64, 4, 3), dec.WIDE_TILES, dec.DEEP_PIPELINE
    expected = {1: (default, 16, None), 4: (default, 4, None), 8: (wide, 2, None), 16: (default, 1, 33),
                32: (default, 1, None), 48: (default, 1, None), 64: (deep, 1, None), 128: (default, 1, None)}
    for num_seqs, (config, num_splits, num_programs) in expected.items():
        assert plan(num_seqs) == dec.DecodePlan(config, num_splits, num_programs), num_seqs
        fp8 = plan(num_seqs, torch.float8_e4m3fn)
        assert fp8 == dec.DecodePlan(wide if 4 <= num_seqs <= 32 else default, num_splits), num_seqs
    assert plan(16, head_dim=64) == dec.DecodePlan(default, 1)
    assert plan(8, dtype=torch.float32, kv_dtype=torch.float32) == dec.DecodePlan(dec.DecodeConfig(32, 4, 3), 2)


@pytest.mark.parametrize("device", DEVICES)
def test_default_plan_matches_reference(device, monkeypatch):
    """paged_decode without a schedule takes decode_plan's: each branch (the split kernel with the default, wide
    and deep-pipeline tiles, the balanced schedule; bf16 and FP8) against the reference."""
    from nanovllm.backends.cuda.attention import triton_decode as dec
    monkeypatch.setattr(dec, "num_sms", lambda _: 16)  # the plan's unit: programs a SM
    if device == "cpu":  # float32 (the interpreter's dtype) has a tile of its own, outside the table: not here
        monkeypatch.setattr(dec, "decode_config", lambda *args: dec.DecodeConfig(64, 4, 3))
    g = torch.Generator().manual_seed(3)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    max_len = 90 if device == "cpu" else 2048
    # (num_seqs, kv dtype) over 2 KV heads and 16 "SMs": default, wide, balanced, deep pipeline, FP8 wide
    for num_seqs, kv_dtype in ((2, None), (3, None), (6, None), (28, None), (5, torch.float8_e4m3fn)):
        context_lens = torch.randint(0, max_len, (num_seqs,), generator=g).tolist()
        q, k_cache, v_cache, meta, scales = _inputs(context_lens, 2, 2, 128, 16, dtype, kv_dtype, device, g)
        plan = dec.decode_plan(num_seqs, 2, 128, 16, q.dtype, k_cache.dtype, q.device)
        out = torch.full_like(q, float("nan"))
        poison_allocator(device)
        dec.paged_decode(q, k_cache, v_cache, meta.context_lens, meta.block_tables, 128 ** -0.5, out=out, **scales)
        _check(out, q, k_cache, v_cache, meta, scales, 2, dtype)
        assert (plan.num_programs is not None) == (num_seqs == 6)


def test_outgrown_counters_stay_allocated(monkeypatch):
    """A larger launch replaces the shared counters, but the old buffer is not freed: CUDA graphs captured with it
    (another engine's, in the same process) keep reading and resetting that memory."""
    import gc
    import weakref
    balanced = pytest.importorskip("nanovllm.backends.cuda.attention.triton_decode_balanced", reason="needs triton")
    monkeypatch.setattr(balanced, "_COUNTERS", {})
    monkeypatch.setattr(balanced, "_OUTGROWN", [])
    device = torch.device("cpu")
    small = balanced._counters(device, 8)
    assert small.numel() == 4096 and not small.any()
    assert balanced._counters(device, 4096) is small
    big = balanced._counters(device, 5000)
    assert big.numel() == 5000 and big is not small and balanced._counters(device, 100) is big
    kept = weakref.ref(small)
    del small
    gc.collect()
    assert kept() is not None
