"""The fused decode kernel (backends/cuda/attention/triton_decode_fused.py) against the two kernels it replaces
(`rotary_qk_store`, then the paged decode kernel) and against cpu_ref's rotary, store and decode attention.

Random paged layouts (scattered blocks, NaN where no sequence owns a row), GQA groups, several splits a
sequence and one, launch order given and not, a padding row (context 0, slot -1) as CUDA graphs replay them,
FP8 caches with per-head scales, the folded norms' row scale and q/k norms on and off, and the shapes that go
to the two kernels instead (a head dim that is not a power of two; on a GPU, the balanced schedule's batches).
On the CPU the Triton kernels run under the interpreter, in float32.
"""
import pytest
import torch

from tests.backends.test_cuda_kernels import DEVICES, assert_close, dtypes_for, fused_qkv_views
from nanovllm.backends.cpu_ref.attention import decode_attention as ref_decode
from nanovllm.backends.cpu_ref.elementwise import rotary_qk as ref_rotary_qk
from nanovllm.core.step_metadata import DecodeMetadata
from nanovllm.testing.layouts import ParityCase, random_layout

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# (num_heads, num_kv_heads, head_dim, block_size, kv cache dtype (None: the model's), num_seqs)
CASES = [(4, 2, 64, 16, None, 3), (4, 2, 64, 16, None, 9), (8, 2, 128, 32, E4M3, 3), (6, 2, 64, 16, E5M2, 5),
         (4, 2, 48, 16, None, 3)]
GPU_CASES = [(16, 8, 128, 16, None, 12), (16, 8, 128, 16, None, 256), (16, 8, 128, 16, E4M3, 256)]


def bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def run_case(device, dtype, num_heads, num_kv_heads, head_dim, block_size, kv_dtype, num_seqs, seed):
    from nanovllm.backends.cuda.attention.triton_decode import paged_decode
    from nanovllm.backends.cuda.attention.triton_decode_fused import fused_decode, fused_plan
    from nanovllm.backends.cuda.rotary_store import rotary_qk_store
    g = torch.Generator().manual_seed(seed)
    case = ParityCase(dtype, head_dim, num_heads, num_kv_heads, block_size, num_seqs=num_seqs, max_context_len=70,
                      seed=seed, kv_cache_dtype=kv_dtype)
    layout = random_layout(case, device, "decode", g)
    context_lens = torch.tensor(layout.context_lens, dtype=torch.int32)
    slots = layout.slot_mapping.clone()
    if num_seqs > 2:  # the last row pads a graph's batch: nothing attended, nothing stored
        context_lens[-1], slots[-1] = 0, -1
    order = torch.argsort(-context_lens, stable=True).to(torch.int32)
    q, k, v = fused_qkv_views(num_seqs, num_heads, num_kv_heads, head_dim, dtype, device, g)
    if kv_dtype is not None:
        k, v = k * 30 * layout.kv_scales[0][:, None], v * 30 * layout.kv_scales[1][:, None]
    positions = torch.randint(0, 64, (num_seqs,), generator=g).to(device)
    cos_sin = torch.randn(64, head_dim, generator=g).to(device)
    residual = torch.randn(num_seqs, 96, generator=g).to(dtype).to(device) * 3
    fused = fused_plan(q, layout.k_cache)
    assert (fused is not None) == (head_dim in (64, 128) and not (device == "cuda" and num_seqs == 12))
    if fused is not None and device == "cpu" and num_seqs in (3, 9):  # 16 "SMs" interpreted: 6 or 18 programs
        assert (fused.num_splits > 1) == (num_seqs == 3), fused
    for scaled, with_norm, ordered in ((True, True, True), (False, False, False)):
        weights = tuple(torch.randn(head_dim, generator=g).to(dtype).to(device) for _ in "qk") if with_norm else \
            (None, None)
        row = {"row_scale_of": residual, "row_eps": 1e-6} if scaled else {}
        meta = DecodeMetadata(context_lens.to(device), layout.block_tables, int(context_lens.max()),
                              order.to(device) if ordered else None)
        caches = [layout.k_cache.clone(), layout.v_cache.clone(), layout.k_cache.clone(), layout.v_cache.clone()]
        scales = dict(zip(("k_scale", "v_scale"), layout.kv_scales))
        q_rot, _ = rotary_qk_store(positions, q, k, v, cos_sin, *weights, 1e-6, caches[0], caches[1], slots, False,
                                   *layout.kv_scales, **row)
        want = paged_decode(q_rot, caches[0], caches[1], meta.context_lens, meta.block_tables, head_dim ** -0.5,
                            seq_order=meta.seq_order, **scales)
        got = fused_decode(positions, q, k, v, cos_sin, *weights, 1e-6, caches[2], caches[3], slots, meta,
                           head_dim ** -0.5, *layout.kv_scales, **row)
        assert torch.equal(bytes_of(caches[2]), bytes_of(caches[0])), "K cache differs from rotary_qk_store's"
        assert torch.equal(bytes_of(caches[3]), bytes_of(caches[1])), "V cache differs from rotary_qk_store's"
        assert torch.isfinite(got).all()
        assert_close(got, want, dtype)
        # cpu_ref: the scaled q/k/v (float32, rounded to the dtype as the kernels do), rotary, decode attention
        if scaled:
            s = torch.rsqrt(residual.float().pow(2).mean(-1) + 1e-6)[:, None, None]
            q_in, k_in = ((t.float() * s).to(dtype) for t in (q, k))
        else:
            q_in, k_in = q, k
        q_ref, _ = ref_rotary_qk(positions, q_in, k_in, cos_sin, *weights, 1e-6)
        ref = ref_decode(q_ref, caches[2], caches[3], meta, head_dim ** -0.5, *layout.kv_scales)
        ref[context_lens.to(device) == 0] = 0
        assert_close(got, ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,kv_dtype,num_seqs", CASES,
                         ids=lambda x: str(x).removeprefix("torch."))
def test_fused_decode_matches_the_two_kernels_and_cpu_ref(device, num_heads, num_kv_heads, head_dim, block_size,
                                                          kv_dtype, num_seqs):
    for dtype in dtypes_for(device):
        run_case(device, dtype, num_heads, num_kv_heads, head_dim, block_size, kv_dtype, num_seqs, seed=num_seqs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the engine's shapes (8 KV heads of 128, 256 sequences) and "
                    "the balanced schedule's batches need a GPU's SM count; the CPU cases above cover the kernel")
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,kv_dtype,num_seqs", GPU_CASES,
                         ids=lambda x: str(x).removeprefix("torch."))
def test_fused_decode_at_engine_shapes(num_heads, num_kv_heads, head_dim, block_size, kv_dtype, num_seqs):
    run_case("cuda", torch.bfloat16, num_heads, num_kv_heads, head_dim, block_size, kv_dtype, num_seqs, seed=7)
