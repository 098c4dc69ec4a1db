"""The decode kernel with the new token's q/k norm, rotary and KV store in its prologue
(attention/triton_decode_new_token.py) against the two kernels it replaces: `rotary.qk_store`, then `paged_decode`.

Without CUDA both sides run under Triton's interpreter in float32 (the same rounding steps, so the same values);
with CUDA compiled, in bfloat16, float16 and float32. The engine-level check is in test_cuda_norm_folding.py.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # the interpreter must be on before any Triton kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.backends.test_cuda_kernels import DEVICES, TOLERANCES, dtypes_for, scattered_block_tables  # noqa: E402

DECODE = pytest.importorskip("nanovllm.backends.cuda.attention.triton_decode", reason="needs triton")
from nanovllm.backends.cuda.rotary_store import rotary_qk_store  # noqa: E402
from tests.backends.test_cuda_fused_products import _rope_cache  # noqa: E402


def _step(device, dtype, kv_dtype, num_seqs=12, heads=4, kv_heads=2, head_dim=64, hidden=96, block_size=16, seed=0):
    """A decode step: each sequence's context (the new token included) in scattered pages, the q/k/v product's
    output for the new tokens, the residual rows it came from; two padding rows (context 0, slot -1)."""
    g = torch.Generator().manual_seed(seed)
    lens = [1, block_size, block_size + 1, 70] + torch.randint(2, 90, (num_seqs - 6,), generator=g).tolist()
    table, num_blocks = scattered_block_tables(lens, block_size, g)
    lens += [0, 0]
    table = torch.cat([table, torch.zeros(2, table.shape[1], dtype=torch.int32)])
    positions = torch.tensor([max(n - 1, 0) for n in lens])
    slots = torch.tensor([int(table[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size if n else -1
                          for i, n in enumerate(lens)])
    shape = (num_blocks, block_size, kv_heads, head_dim)
    scales = (None, None)
    if kv_dtype.itemsize == 1:
        scales = tuple(torch.tensor([s, 1.5 * s][:kv_heads] + [s] * (kv_heads - 2), device=device)
                       for s in (0.05, 0.02))
    caches = [(torch.randn(shape, generator=g) / (scales[0][0].item() * 8 if scales[0] is not None else 1))
              .to(device).to(kv_dtype) for _ in range(2)]
    x = (torch.randn(num_seqs, hidden, generator=g) * 3).to(device, dtype)
    qkv = torch.randn(num_seqs, (heads + 2 * kv_heads) * head_dim, generator=g).to(device, dtype)
    norms = [(1 + 0.1 * torch.randn(head_dim, generator=g)).to(device, dtype) for _ in range(2)]
    order = torch.tensor(sorted(range(num_seqs), key=lambda i: -lens[i]), dtype=torch.int32, device=device)
    return dict(qkv=qkv, x=x, heads=heads, kv_heads=kv_heads, head_dim=head_dim, positions=positions.to(device),
                slots=slots.to(device), lens=torch.tensor(lens, dtype=torch.int32, device=device),
                table=table.to(device), caches=caches, scales=scales, norms=norms, order=order,
                cos_sin=_rope_cache(256, head_dim, device))


def _two_kernels(t, has_norm, row_scale, ordered):
    h, kv, d = t["heads"], t["kv_heads"], t["head_dim"]
    q, k, v = t["qkv"].split([h * d, kv * d, kv * d], -1)
    caches = [c.clone() for c in t["caches"]]
    q_w, k_w = t["norms"] if has_norm else (None, None)
    extra = dict(row_scale_of=t["x"], row_eps=1e-5) if row_scale else {}
    q_out, _ = rotary_qk_store(t["positions"], q.reshape(-1, h, d), k.reshape(-1, kv, d), v.reshape(-1, kv, d),
                               t["cos_sin"], q_w, k_w, 1e-6, *caches, t["slots"], False, *t["scales"], **extra)
    out = DECODE.paged_decode(q_out, *caches, t["lens"], t["table"], d ** -0.5, num_splits=1, k_scale=t["scales"][0],
                              v_scale=t["scales"][1], seq_order=t["order"] if ordered else None)
    return out, caches


def _one_kernel(t, has_norm, row_scale, ordered, config=None):
    """On a GPU decode_plan would split these few sequences; the test names the tile config, as num_splits=1 does
    for the two kernels."""
    d = t["head_dim"]
    config = config or DECODE.decode_config(DECODE.padded_head_dim(d), t["caches"][0].shape[1], t["qkv"].dtype,
                                            t["caches"][0].dtype)
    caches = [c.clone() for c in t["caches"]]
    q_w, k_w = t["norms"] if has_norm else (None, None)
    extra = dict(row_scale_of=t["x"], row_eps=1e-5) if row_scale else {}
    out = DECODE.decode_with_new_token(t["qkv"], t["heads"], t["positions"], t["cos_sin"], q_w, k_w, 1e-6, *caches,
                                       t["slots"], t["lens"], t["table"], t["head_dim"] ** -0.5, *t["scales"],
                                       seq_order=t["order"] if ordered else None, config=config, **extra)
    return out, caches


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("has_norm,row_scale", [(True, True), (False, True), (True, False)],
                         ids=["qk_norm-folded", "no_norm-folded", "qk_norm"])
@pytest.mark.parametrize("ordered", [False, True], ids=["in_order", "longest_first"])
def test_new_token_prologue_matches_rotary_store_then_decode(device, has_norm, row_scale, ordered):
    for dtype in dtypes_for(device):
        t = _step(device, dtype, dtype)
        want, want_caches = _two_kernels(t, has_norm, row_scale, ordered)
        got, caches = _one_kernel(t, has_norm, row_scale, ordered)
        rtol, atol = TOLERANCES[dtype]
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        for mine, theirs in zip(caches, want_caches):
            torch.testing.assert_close(mine, theirs, rtol=rtol, atol=atol)
        assert not got[-2:].any()  # padding rows: no context, zero output
        for mine, before in zip(caches, t["caches"]):  # exactly the new tokens' slots changed
            changed = (mine != before).flatten(2).any(-1).flatten()
            real = t["slots"][t["slots"] >= 0].cpu()
            assert set(changed.nonzero().flatten().tolist()) <= set(real.tolist())
            assert changed[real].float().mean() > 0.9


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [dict(heads=8, kv_heads=1, head_dim=32), dict(heads=6, kv_heads=2, head_dim=80)],
                         ids=["group8", "head_dim80"])
def test_new_token_prologue_other_head_shapes(device, shape):
    dtype = dtypes_for(device)[0]
    t = _step(device, dtype, dtype, num_seqs=18 if shape["kv_heads"] == 1 else 12, seed=2, **shape)
    want, want_caches = _two_kernels(t, True, True, True)
    got, caches = _one_kernel(t, True, True, True)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    for mine, theirs in zip(caches, want_caches):
        torch.testing.assert_close(mine, theirs, rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", ["float8_e4m3fn", "float8_e5m2"])
def test_new_token_prologue_with_an_fp8_cache(device, fp8):
    """Both sides quantise the new K/V in Triton (the same bits); attention reads them back from the cache."""
    dtype = dtypes_for(device)[0]
    t = _step(device, dtype, getattr(torch, fp8), seed=1)
    want, want_caches = _two_kernels(t, True, True, False)
    got, caches = _one_kernel(t, True, True, False)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    for mine, theirs in zip(caches, want_caches):
        assert torch.equal(mine.view(torch.uint8), theirs.view(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
def test_new_token_prologue_refuses_what_it_cannot_run(device):
    t = _step(device, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="split or balanced"):  # two sequences: the plan splits their contexts
        DECODE.decode_with_new_token(t["qkv"][:2], t["heads"], t["positions"][:2], t["cos_sin"], None, None, 0.0,
                                     *t["caches"], t["slots"][:2], t["lens"][:2], t["table"][:2], 0.125)
    with pytest.raises(ValueError, match="is not"):
        DECODE.decode_with_new_token(t["qkv"][:, :-1], t["heads"], t["positions"], t["cos_sin"], None, None, 0.0,
                                     *t["caches"], t["slots"], t["lens"], t["table"], 0.125)
    with pytest.raises(ValueError, match="one entry a sequence"):
        DECODE.decode_with_new_token(t["qkv"], t["heads"], t["positions"][:3], t["cos_sin"], None, None, 0.0,
                                     *t["caches"], t["slots"], t["lens"], t["table"], 0.125)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (the engine on the cuda backend)")
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_engine_with_the_new_token_in_the_decode_kernel_generates_its_tokens(tmp_path, monkeypatch, kv_cache_dtype):
    """float32 cuda engines, fuse_attention off and on (captured into the decode graphs): the same greedy tokens,
    logprobs within float32 rounding. 80 sequences x 2 KV heads fill the H200's 132 SMs with one program each, so
    the big decode steps take the fused kernel (the fused q/k/v product's table is bfloat16's, not in play)."""
    from nanovllm import LLM, SamplingParams
    from nanovllm.backends.cuda.attention import triton_decode
    from nanovllm.testing.tiny_models import make_tiny_model
    from tests.conftest import random_prompts
    path = make_tiny_model(str(tmp_path / "qwen3"), "qwen3", head_dim=64)
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    prompts = random_prompts(80, 512, (1, 40), seed=7)
    kwargs = dict(backend="cuda", dtype="float32", max_model_len=256, num_kvcache_blocks=800, max_num_seqs=80,
                  kv_cache_dtype=kv_cache_dtype)
    llm = LLM(path, fuse_attention=False, **kwargs)
    want = llm.generate(prompts, greedy, use_tqdm=False)
    llm.close()
    calls = []
    fused = triton_decode.decode_with_new_token
    monkeypatch.setattr(triton_decode, "decode_with_new_token", lambda *a, **k: calls.append(a[0].shape[0]) or
                        fused(*a, **k))
    llm = LLM(path, fuse_attention=True, **kwargs)
    assert llm.engine.runner.graphs is not None and calls  # captured
    got = llm.generate(prompts, greedy, use_tqdm=False)
    llm.close()
    assert [g["token_ids"] for g in got] == [w["token_ids"] for w in want]
    for g, w in zip(got, want):
        for token, mine, theirs in zip(g["token_ids"], g["logprobs"], w["logprobs"]):
            assert abs(mine[token] - theirs[token]) < 2e-3, (token, mine, theirs)
