"""The folded decoder's fused products (backends/cuda/qkv_rotary_store.py, linear.py's row-scaled GLU) against the
two kernels each replaces: cuBLAS's (here torch's) product, then `rotary.qk_store` or `act.silu_mul`.

Without CUDA the kernels run under Triton's interpreter in float32, against the cuda backend's own (interpreted)
second kernels, and a cpu_ref engine with the cuda kernels folded and every batch size fused generates the
unfolded engine's tokens. With CUDA they run compiled in bfloat16 (and float16, float32), and an engine with the
tables forced on every batch size generates the tokens of one with them off.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # the interpreter must be on before any Triton kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.backends.test_cuda_kernels import DEVICES, TOLERANCES, _cpu_skip_reason, dtypes_for  # noqa: E402

QKV = pytest.importorskip("nanovllm.backends.cuda.qkv_rotary_store", reason="needs triton")
from nanovllm.backends.cuda import linear, norm_folding  # noqa: E402
from nanovllm.backends.cuda.elementwise import silu_mul  # noqa: E402
from nanovllm.backends.cuda.rotary_store import rotary_qk_store  # noqa: E402

QKV_CONFIGS = [QKV.Config(16, 32, 4, 2, False), QKV.Config(32, 64, 4, 2, True), QKV.Config(16, 64, 4, 3, True),
               QKV.Config(16, 32, 4, 2, True, split_k=4), QKV.Config(32, 64, 4, 2, False, split_k=2)]


def _rope_cache(max_pos: int, head_dim: int, device) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], -1).to(device)


def _layer(device, dtype, m=21, k=256, heads=4, kv_heads=2, head_dim=64, blocks=12, block_size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = (heads + 2 * kv_heads) * head_dim
    x = (torch.randn(m, k, generator=g) * 3).to(device, dtype)
    weight = (torch.randn(n, k, generator=g) / 16).to(device, dtype)
    positions = torch.randint(0, 500, (m,), generator=g).to(device)
    slots = torch.randperm(blocks * block_size, generator=g)[:m]
    slots[[i for i in (2, 7) if i < m]] = -1  # padding rows of a graph batch store nothing
    norms = [(1 + 0.1 * torch.randn(head_dim, generator=g)).to(device, dtype) for _ in range(2)]
    return dict(x=x, weight=weight, heads=heads, kv_heads=kv_heads, head_dim=head_dim, positions=positions,
                slots=slots.to(device), cos_sin=_rope_cache(512, head_dim, device), norms=norms,
                cache_shape=(blocks, block_size, kv_heads, head_dim))


def _two_kernels(t, cache_dtype, scales, has_norm):
    """What norm_folding.attention_block does without the fusion: the product, then rotary.qk_store."""
    x, d, h, kv = t["x"], t["head_dim"], t["heads"], t["kv_heads"]
    qkv = (x.float() @ t["weight"].float().t()).to(x.dtype)
    q, k, v = qkv.split([h * d, kv * d, kv * d], -1)
    caches = [torch.zeros(t["cache_shape"], dtype=cache_dtype, device=x.device) for _ in range(2)]
    q_w, k_w = t["norms"] if has_norm else (None, None)
    q_out, _ = rotary_qk_store(t["positions"], q.view(-1, h, d), k.view(-1, kv, d), v.view(-1, kv, d), t["cos_sin"],
                               q_w, k_w, 1e-6, *caches, t["slots"], False, *scales, row_scale_of=x, row_eps=1e-5)
    return q_out, caches


def _fused(t, cache_dtype, scales, has_norm, config):
    caches = [torch.zeros(t["cache_shape"], dtype=cache_dtype, device=t["x"].device) for _ in range(2)]
    q_w, k_w = t["norms"] if has_norm else (None, None)
    q = QKV.qkv_rotary_store(t["x"], t["weight"], t["heads"], t["kv_heads"], t["positions"], t["cos_sin"], q_w, k_w,
                             1e-6, 1e-5, *caches, t["slots"], *scales, config)
    return q, caches


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", QKV_CONFIGS, ids=str)
@pytest.mark.parametrize("has_norm", [True, False], ids=["qk_norm", "no_norm"])
def test_fused_qkv_matches_the_product_then_rotary_store(device, config, has_norm):
    for dtype in dtypes_for(device):
        t = _layer(device, dtype)
        want_q, want_caches = _two_kernels(t, dtype, (None, None), has_norm)
        q, caches = _fused(t, dtype, (None, None), has_norm, config)
        rtol, atol = TOLERANCES[dtype]
        torch.testing.assert_close(q, want_q, rtol=rtol, atol=atol)
        for got, want in zip(caches, want_caches):
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        again, caches_again = _fused(t, dtype, (None, None), has_norm, config)  # split K: the same bits each time
        assert torch.equal(again, q) and all(torch.equal(a, b) for a, b in zip(caches_again, caches))
        assert int(linear.split_counters(t["x"].device).abs().sum()) == 0  # split K left its counters at 0
        stored = torch.zeros(t["cache_shape"][0] * t["cache_shape"][1], dtype=torch.bool)
        stored[t["slots"][t["slots"] >= 0].cpu()] = True
        flat = caches[0].view(-1, t["kv_heads"] * t["head_dim"]).cpu()
        assert bool((flat[~stored] == 0).all()) and bool((flat[stored] != 0).any())  # only the real tokens' slots


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", [QKV_CONFIGS[1], QKV_CONFIGS[3]], ids=str)
def test_fused_qkv_quantises_an_fp8_cache_as_rotary_store_does(device, config):
    """Both sides are Triton kernels, so they cast float32 to FP8 alike (the interpreter casts differently from
    torch near powers of two); the products differ in summation order only, so a byte may differ by one step."""
    dtype = dtypes_for(device)[0]
    t = _layer(device, dtype, seed=1)
    scales = tuple(torch.full((t["kv_heads"],), s, device=device) for s in (0.05, 0.02))
    want_q, want_caches = _two_kernels(t, torch.float8_e4m3fn, scales, True)
    q, caches = _fused(t, torch.float8_e4m3fn, scales, True, config)
    torch.testing.assert_close(q, want_q, rtol=TOLERANCES[dtype][0], atol=TOLERANCES[dtype][1])
    for got, want, scale in zip(caches, want_caches, scales):
        assert (got.view(torch.uint8) == want.view(torch.uint8)).float().mean() > 0.98
        torch.testing.assert_close(got.float() * scale[0], want.float() * scale[0], rtol=0.13, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_qkv_refuses_what_it_cannot_run(device):
    t = _layer(device, torch.float32, head_dim=48)
    with pytest.raises(ValueError, match="head_dim 48"):
        _fused(t, torch.float32, (None, None), True, QKV_CONFIGS[0])
    t = _layer(device, torch.float32, k=200)
    with pytest.raises(ValueError, match="K = 200"):
        _fused(t, torch.float32, (None, None), True, QKV_CONFIGS[0])
    t = _layer(device, torch.float32, k=256)
    with pytest.raises(ValueError, match="K = 256 is not a multiple of the tile's 64 times its 8 split"):
        _fused(t, torch.float32, (None, None), True, QKV.Config(16, 64, 4, 2, True, split_k=8))
    t = _layer(device, torch.float32, m=0)
    q, caches = _fused(t, torch.float32, (None, None), True, QKV_CONFIGS[0])
    assert q.shape == (0, t["heads"], t["head_dim"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", [linear.Config(16, 32, 64, 1, 4, 3), linear.Config(32, 64, 64, 1, 4, 3, swap=True)],
                         ids=str)
def test_row_scaled_glu_matches_the_product_then_silu_mul(device, config):
    """gate/up with act.silu_mul's row scale (the folded post-attention RMSNorm) in the epilogue."""
    for dtype in dtypes_for(device):
        g = torch.Generator().manual_seed(9)
        x = (torch.randn(19, 192, generator=g) * 2).to(device, dtype)
        w = (torch.randn(2 * 72, 192, generator=g) / 8).to(device, dtype)
        want = silu_mul((x.float() @ w.float().t()).to(dtype), row_scale_of=x, eps=1e-5)
        got = linear.matmul(x, w, config, glu=True, row_scale_eps=1e-5)
        torch.testing.assert_close(got, want, rtol=TOLERANCES[dtype][0], atol=TOLERANCES[dtype][1])
    with pytest.raises(ValueError, match="one split"):
        linear.matmul(x, w, config._replace(split_k=2), glu=True, row_scale_eps=1e-5)
    with pytest.raises(ValueError, match="glu=True"):
        linear.matmul(x, w, config, row_scale_eps=1e-5)


def _every_batch(monkeypatch, n_qkv, k_qkv, n_gu, k_gu, dtype):
    """Put the model's q/k/v and gate/up shapes in the fused tables for every batch size."""
    monkeypatch.setitem(QKV.TABLE, (n_qkv, k_qkv), [(1 << 20, QKV.Config(16, 64, 4, 2, True))])
    monkeypatch.setitem(linear.GLU_TABLE, (n_gu, k_gu), [(1 << 20, linear.Config(16, 64, 64, 1, 4, 3, swap=True))])
    monkeypatch.setattr(norm_folding, "TABLE_DTYPES", (dtype,))
    calls = []
    fused, glu = QKV.qkv_rotary_store, linear.matmul
    monkeypatch.setattr(QKV, "qkv_rotary_store", lambda *a: calls.append("qkv") or fused(*a))
    monkeypatch.setattr(norm_folding, "matmul", lambda *a, **k: calls.append("glu") or glu(*a, **k))
    return calls


@pytest.mark.skipif(HAS_CUDA or bool(_cpu_skip_reason()),
                    reason=_cpu_skip_reason() or "with CUDA: test_fused_engine_generates_the_unfused_tokens")
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_folded_engine_with_fused_products_generates_the_unfolded_tokens(tmp_path, monkeypatch, kv_cache_dtype):
    """cpu_ref engines in float32 with the cuda kernels (interpreted): chunked prefills beside decode steps, then
    prefix-cache hits. The fused q/k/v runs in every decode step (prefills keep the two-kernel path), the fused
    SiLU in every step."""
    from tests.backends.test_cuda_norm_folding import GREEDY, engine, fold_engine, with_cuda_kernels
    from nanovllm.testing.tiny_models import make_tiny_model
    from tests.conftest import random_prompts
    path = make_tiny_model(str(tmp_path / "qwen3"), "qwen3", head_dim=64)  # 4 heads, 2 KV heads, hidden 128
    prompts = random_prompts(5, 512, (3, 40), seed=3)
    options = dict(max_num_batched_tokens=24, kv_cache_dtype=kv_cache_dtype)
    want = [o["token_ids"] for o in with_cuda_kernels(engine(path, **options)).generate(prompts, GREEDY,
                                                                                       use_tqdm=False)]
    calls = _every_batch(monkeypatch, 8 * 64, 128, 2 * 384, 128, torch.float32)
    llm = fold_engine(engine(path, **options))
    for _ in range(2):
        assert [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == want
    assert 0 < calls.count("qkv") < calls.count("glu")  # GLU_TABLE is by rows: prefill steps fuse SiLU as well


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (the engine on the cuda backend)")
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_fused_engine_generates_the_unfused_tokens(tmp_path, monkeypatch, kv_cache_dtype):
    """float32 engines (three-pass TF32 dots in both fused kernels) with the fused tables on every batch size,
    captured into the decode graphs, generate the greedy tokens of the engine with fuse_products off, with
    logprobs within float32 rounding. (In bfloat16 a near-tie may flip either way: rounding differs with the
    product's kernel, and cuBLAS's choice of kernel may follow the operands' addresses; the kernel tests above
    compare bfloat16 within its tolerance.)"""
    from nanovllm import LLM, SamplingParams
    from nanovllm.testing.tiny_models import make_tiny_model
    from tests.conftest import random_prompts
    path = make_tiny_model(str(tmp_path / "qwen3"), "qwen3", head_dim=64)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    prompts = random_prompts(6, 512, (1, 40), seed=3)
    kwargs = dict(backend="cuda", dtype="float32", max_model_len=256, num_kvcache_blocks=64, max_num_seqs=8,
                  kv_cache_dtype=kv_cache_dtype)
    llm = LLM(path, fuse_products=False, **kwargs)
    want = llm.generate(prompts, greedy, use_tqdm=False)
    llm.close()
    calls = _every_batch(monkeypatch, 8 * 64, 128, 2 * 384, 128, torch.float32)
    llm = LLM(path, fuse_products=True, **kwargs)
    assert llm.engine.runner.graphs is not None and "qkv" in calls and "glu" in calls  # captured
    got = llm.generate(prompts, greedy, use_tqdm=False)
    llm.close()
    assert [g["token_ids"] for g in got] == [w["token_ids"] for w in want]
    for g, w in zip(got, want):
        for token, mine, theirs in zip(g["token_ids"], g["logprobs"], w["logprobs"]):
            assert abs(mine[token] - theirs[token]) < 2e-3, (token, mine, theirs)


def test_fused_tables_grow_in_m_and_fit_their_shapes():
    """Entries in increasing M; every configuration's K tile times its splits divides its weight's K and, for the
    GLU, has one split (the row scale needs all of K in one program); the weights are [N, K] with an even N for
    gate/up. Qwen3-0.6B's q/k/v fuses to M 64, K split in 4 to M 16."""
    for table in (QKV.TABLE, linear.GLU_TABLE):
        for (n, k), entries in table.items():
            ms = [m for m, _ in entries]
            assert ms == sorted(ms) and len(set(ms)) == len(ms)
            for _, config in entries:
                assert config is None or k % (config.block_k * config.split_k) == 0
                if table is linear.GLU_TABLE:
                    assert n % 2 == 0 and (config is None or config.split_k == 1)
    assert QKV.pick(1, 4096, 1024).split_k == 4 and QKV.pick(64, 4096, 1024).split_k == 1
    assert QKV.pick(65, 4096, 1024) is None
