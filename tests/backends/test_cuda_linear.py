"""The cuda backend's Triton decode GEMM (backends/cuda/linear.py) against torch's product, and its table.

Without CUDA the kernel runs under Triton's interpreter in float32 (test_cuda_kernels.py also compiles the
table's configurations for sm_90); with CUDA it runs compiled in bfloat16.
"""
import os

import pytest
import torch
from torch import nn

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # the interpreter must be on before any Triton kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="the Triton GEMM needs triton")
from nanovllm.backends.cuda import linear  # noqa: E402
from nanovllm.backends.cuda.linear import Config, TritonLinear, install_triton_linear, matmul, pick  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
TOL = 2e-2 if HAS_CUDA else 1e-4

# (M, N, K, configuration): odd sizes (masked rows, columns and K), every split path, a K that splits unevenly,
# plain and swapped operands
CASES = [(1, 64, 128, Config(16, 64, 64, 1, 4, 3)), (5, 96, 200, Config(16, 32, 64, 2, 4, 3)),
         (33, 130, 256, Config(32, 64, 64, 4, 4, 3)), (17, 64, 448, Config(16, 64, 64, 3, 4, 3)),
         (2, 48, 320, Config(16, 16, 32, 8, 4, 2)), (3, 80, 192, Config(16, 64, 64, 1, 4, 3, swap=True)),
         (40, 70, 256, Config(32, 64, 64, 2, 4, 3, swap=True))]


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("m,n,k,config", CASES)
def test_matmul_matches_torch_and_resets_its_counters(m, n, k, config):
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g).to(DEVICE, DTYPE)
    w = torch.randn(n, k, generator=g).to(DEVICE, DTYPE)
    want = x.float() @ w.float().t()
    for _ in range(2):  # the second call finds the split-K counters the first one left
        out = matmul(x, w, config)
        assert out.shape == (m, n) and out.dtype == DTYPE
        assert _relative_error(out, want) < TOL
    assert int(linear.split_counters(DEVICE).abs().sum()) == 0


@pytest.mark.parametrize("config", [Config(16, 32, 64, 1, 4, 3), Config(16, 32, 64, 3, 4, 3),
                                    Config(32, 64, 64, 2, 4, 3, swap=True)])
def test_gate_up_with_silu_in_the_epilogue_matches_the_two_ops(config):
    """glu=True: silu(x @ gate.T) * (x @ up.T) in one kernel, rounded as act.silu_mul rounds its bf16 input."""
    from nanovllm.backends.cpu_ref.elementwise import silu_mul
    g = torch.Generator().manual_seed(7)
    x = torch.randn(9, 192, generator=g).to(DEVICE, DTYPE)
    w = (torch.randn(2 * 72, 192, generator=g) / 8).to(DEVICE, DTYPE)
    want = silu_mul((x.float() @ w.float().t()).to(DTYPE)).float()
    got = matmul(x, w, config, glu=True)
    assert got.shape == (9, 72)
    assert _relative_error(got, want) < TOL
    with pytest.raises(ValueError, match="even N"):
        matmul(x, w[:-1], config, glu=True)


def test_split_k_sums_its_partials_in_split_order():
    """The last split of a tile adds every partial in split order, so the output does not depend on which split
    ended last: repeated calls are bit-identical (on a GPU the splits finish in a different order each time), and
    equal the sum of the splits' own products in that order (float32 under the interpreter, whose dots are
    exact there)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 512, generator=g).to(DEVICE, DTYPE)
    w = torch.randn(640, 512, generator=g).to(DEVICE, DTYPE)
    config = Config(16, 64, 64, 8, 4, 3)
    first = matmul(x, w, config)
    for _ in range(20):
        assert torch.equal(matmul(x, w, config), first)
    if DEVICE.type == "cpu":
        parts = [matmul(x[:, i:i + 64].contiguous(), w[:, i:i + 64].contiguous(), Config(16, 64, 64, 1, 4, 3))
                 for i in range(0, 512, 64)]
        want = torch.zeros_like(parts[0])
        for part in parts:
            want += part
        assert torch.equal(first, want)


def test_matmul_reads_rows_with_a_stride_and_handles_no_rows():
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(6, 256, generator=g).to(DEVICE, DTYPE)
    x = wide[:, :128]  # as o_proj reads the first columns of a wider tensor
    w = torch.randn(64, 128, generator=g).to(DEVICE, DTYPE)
    assert _relative_error(matmul(x, w, Config(16, 64, 64, 2, 4, 3)), x.float() @ w.float().t()) < TOL
    assert matmul(x[:0], w, Config(16, 64, 64, 2, 4, 3)).shape == (0, 64)
    with pytest.raises(ValueError, match="unit stride on K"):
        matmul(x.t(), w, Config(16, 64, 64, 1, 4, 3))


def test_table_entries_grow_in_m_and_fit_their_shapes():
    for (n, k), entries in linear.TABLE.items():
        limits = [largest for largest, _ in entries]
        assert limits == sorted(set(limits)), (n, k)
        assert all(linear.fits(largest, n, k, config) for largest, config in entries)
        assert pick(limits[-1] + 1, n, k) is None and pick(1, n, k) == entries[0][1]
    assert pick(1, 3, 5) is None


def test_layers_in_the_table_get_the_kernel_at_the_batch_sizes_it_lists(monkeypatch):
    monkeypatch.setitem(linear.TABLE, (64, 128), [(4, Config(16, 32, 64, 2, 4, 3))])
    monkeypatch.setattr(linear, "TABLE_DTYPES", (DTYPE,))
    calls = []
    monkeypatch.setattr(linear, "matmul", lambda x, w, c: calls.append(c) or torch.nn.functional.linear(x, w))

    class Layer(nn.Module):
        def __init__(self, n, k):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n, k, dtype=DTYPE, device=DEVICE), requires_grad=False)
            self.linear_op = torch.nn.functional.linear

    model = nn.Sequential(Layer(64, 128), Layer(32, 128))
    assert install_triton_linear(model, DTYPE) == 1
    assert isinstance(model[0].linear_op, TritonLinear) and model[1].linear_op is torch.nn.functional.linear
    assert install_triton_linear(model, torch.float16 if DTYPE != torch.float16 else torch.float64) == 0
    op, w = model[0].linear_op, model[0].weight
    x = torch.randn(8, 128, dtype=DTYPE, device=DEVICE)
    op(x[:3], w)
    assert len(calls) == 1  # M = 3: in the table
    op(x, w)
    op(x[:3], w, torch.zeros(64, dtype=DTYPE, device=DEVICE))
    assert len(calls) == 1  # M = 8 beyond the table, and a bias: cuBLAS


def test_the_cuda_backend_installs_it_for_bfloat16_layers_in_the_table():
    from nanovllm.backends.cuda.plugin import CudaBackend
    (n, k), _ = next(iter(linear.TABLE.items()))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(n, k, dtype=torch.bfloat16), requires_grad=False)
            self.linear_op = torch.nn.functional.linear

    model = Layer()
    CudaBackend().prepare_model(model, torch.float32)  # not measured in float32: cuBLAS (and no TF32)
    assert model.linear_op is torch.nn.functional.linear
    CudaBackend().prepare_model(model, torch.bfloat16)
    assert isinstance(model.linear_op, TritonLinear)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (the engine on the cuda backend)")
def test_engine_runs_it_in_graphs_like_cublas(tmp_path, monkeypatch):
    """A tiny Qwen3 whose o projection and LM head are put in the table: greedy tokens as with cuBLAS, except where
    bf16 rounding flips a near-tie. This model's bf16 logits tie often (a first token's top two are sometimes
    equal), so the two runs may part there, and only there: up to each output's first difference the tokens are
    equal, and at it the cuBLAS run ranked the table run's token second, within a few bf16 steps of its own."""
    from nanovllm import LLM, SamplingParams
    from nanovllm.testing.tiny_models import make_tiny_model
    from tests.conftest import random_prompts
    path = make_tiny_model(str(tmp_path / "qwen3"), "qwen3", head_dim=64)  # o_proj 256 -> 128, vocab 512
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    prompts = random_prompts(6, 512, (1, 40), seed=3)
    kwargs = dict(backend="cuda", dtype="bfloat16", max_model_len=256, num_kvcache_blocks=64, max_num_seqs=8)
    want = LLM(path, **kwargs).generate(prompts, greedy, use_tqdm=False)
    monkeypatch.setitem(linear.TABLE, (128, 256), [(8, Config(16, 64, 64, 2, 4, 3))])
    monkeypatch.setitem(linear.TABLE, (512, 128), [(8, Config(16, 64, 64, 1, 4, 3, swap=True))])
    calls = []
    run = linear.matmul
    monkeypatch.setattr(linear, "matmul", lambda *a, **k: calls.append(a[2]) or run(*a, **k))
    llm = LLM(path, **kwargs)
    assert llm.engine.runner.graphs is not None and calls  # captured into the decode graphs
    got = llm.generate(prompts, greedy, use_tqdm=False)
    assert all(len(g["token_ids"]) == 12 for g in got)
    for g, w in zip(got, want):
        first = next((i for i, (a, b) in enumerate(zip(g["token_ids"], w["token_ids"])) if a != b), None)
        if first is not None:
            ranked = w["logprobs"][first]  # the cuBLAS run's top two at the first difference
            token, theirs = g["token_ids"][first], w["token_ids"][first]
            assert token in ranked and ranked[theirs] - ranked[token] <= 0.15, (first, token, theirs, ranked)
