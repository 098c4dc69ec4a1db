"""The cpu backend's pieces that the parity matrix does not reach: thread choice, KV budget, sampling
distribution, attention over caches that hold NaN outside every context, and the OpenMP spin settings."""
import os
import subprocess
import sys

import pytest
import torch

from nanovllm.backends.cpu import memory, sampler, threads
from nanovllm.core.config import EngineConfig
from nanovllm.core.sampler import SamplingTensors, inverse_cdf


@pytest.mark.parametrize("cores, load, expected", [(2, 0.9, 2), (2, 1.2, 2), (2, 2.0, 1), (2, 7.5, 1), (8, 3.0, 6),
                                                   (1, 0.0, 1)])
def test_free_cores_leave_room_for_other_work(cores, load, expected):
    assert threads.free_cores(cores, load) == expected


def test_thread_choice_order(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads(5) == (5, "the threads option")
    assert threads.choose_threads(None) == (3, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    count, why = threads.choose_threads(None)
    assert 1 <= count <= threads.allowed_cores() and "usable cores" in why


def test_kv_budget_sized_to_the_need_and_capped():
    config = EngineConfig(model="", max_model_len=512, max_num_seqs=8)
    assert memory.kv_cache_budget(config, 16, 1024) == 8 * 32
    big = EngineConfig(model="", max_model_len=4096, max_num_seqs=256)
    bytes_per_block = 1 << 20
    assert memory.kv_cache_budget(big, 16, bytes_per_block) == memory.MAX_KV_CACHE_BYTES // bytes_per_block
    huge_blocks = EngineConfig(model="", max_model_len=4096, max_num_seqs=2)
    assert memory.kv_cache_budget(huge_blocks, 16, 8 << 20) == 256  # never below one max_model_len sequence
    assert memory.kv_cache_budget(EngineConfig(model="", num_kvcache_blocks=7), 16, 1024) == 7


def test_sampled_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 3.0]).log_softmax(-1).expand(4000, 5).contiguous()
    params = SamplingTensors(torch.full((4000,), 1.0), top_k=torch.full((4000,), 3, dtype=torch.int64))
    torch.manual_seed(0)
    counts = torch.bincount(sampler.sample(logits, params), minlength=5).float() / 4000
    expected = torch.tensor([2.0, 1.0, -float("inf"), -float("inf"), 3.0]).softmax(-1)
    assert counts[2] == 0 and counts[3] == 0
    assert torch.allclose(counts, expected, atol=0.03), (counts, expected)


def test_seeded_rows_depend_on_their_generator_only():
    logits = torch.randn(3, 1000)
    temps = torch.ones(3)

    def draw(row_gens):
        return sampler.sample(logits, SamplingTensors(temps, generators=row_gens))

    gens = lambda: [torch.Generator().manual_seed(1), None, torch.Generator().manual_seed(2)]  # noqa: E731
    first, second = draw(gens()), draw(gens())
    assert first[0] == second[0] and first[2] == second[2]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [0, 1, 17])
def test_packed_linear_matches_f_linear(dtype, tol, rows):
    from nanovllm.backends.cpu.linear import PackedLinear
    gen = torch.Generator().manual_seed(rows)
    weight = (torch.randn(96, 40, generator=gen) * 0.1).to(dtype)
    bias = torch.randn(96, generator=gen).to(dtype)
    x = torch.randn(rows, 40, generator=gen).to(dtype)
    out = PackedLinear(weight)(x, weight, bias)
    assert out.shape == (rows, 96) and out.dtype == dtype
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias), atol=tol, rtol=tol)


def test_prepare_model_packs_every_linear_and_the_lm_head(tiny_qwen3):
    from nanovllm import LLM
    from nanovllm.backends.cpu.linear import PackedLinear, can_pack
    llm = LLM(tiny_qwen3, backend="cpu", dtype="float32", max_model_len=128)
    ops = [m.linear_op for m in llm.engine.runner.model.modules() if hasattr(m, "linear_op")]
    assert len(ops) == 4 * 2 + 1  # qkv, o, gate_up, down per layer (2 layers) and the LM head
    assert all(isinstance(op, PackedLinear) for op in ops) == can_pack(torch.float32)


@pytest.mark.parametrize("seed", range(3))
def test_candidate_filters_give_the_reference_distribution(seed):
    """Rows the candidates resolve get exactly the reference's filtered distribution; the others (flat rows whose
    top-p mass lies past the candidates, top-k ties outside them, no filter) are sent to the full path."""
    from nanovllm.core.sampler import apply_top_k_top_p_min_p
    gen = torch.Generator().manual_seed(seed)
    rows, vocab = 12, 5000
    logits = torch.randn(rows, vocab, generator=gen) * torch.tensor([8.0] * 6 + [0.5] * 6).unsqueeze(-1)
    logits[9, :300] = 50.0  # 300 tokens tied at the top: top-k 20 keeps all of them, past the 256 candidates
    params = SamplingTensors(torch.full((rows,), 0.8),
                             top_k=torch.tensor([0, 20, 0, 5, 0, 0, 0, 300, 0, 20, 0, 0]),
                             top_p=torch.tensor([0.9, 1, 0.5, 0.8, 1, 0.95, 0.9, 0.9, 1, 1, 0.3, 0.99]),
                             min_p=torch.tensor([0, 0, 0.1, 0, 0.05, 0, 0, 0, 0, 0, 0, 0]))
    scaled = logits / 0.8
    values, ids, kept, resolved = sampler.filter_candidates(scaled, params, sampler.CANDIDATES[0])
    expected = apply_top_k_top_p_min_p(scaled, params).softmax(-1)
    # sharp rows with a filter resolve; top-k 300 (past the candidates), flat rows' top-p, the tie row and
    # unfiltered rows do not
    assert resolved.tolist() == [True, True, True, True, False, True,
                                 False, False, False, False, False, False], resolved
    for row in resolved.nonzero().flatten().tolist():
        got = torch.zeros(vocab)
        got[ids[row]] = (values[row] - values[row, 0]).exp().masked_fill(~kept[row], 0)
        assert torch.allclose(got / got.sum(), expected[row], atol=1e-6), row


def test_sampler_falls_back_to_the_full_vocabulary_where_candidates_do_not_resolve():
    from nanovllm.core.sampler import apply_top_k_top_p
    torch.manual_seed(0)
    rows, vocab = 4000, 10_000
    # nearly flat, strictly decreasing: top-p 0.9 keeps a prefix of ~9,000 tokens, past both tiers of candidates
    logits = (-torch.arange(vocab) * 1e-4).expand(rows, vocab).contiguous()
    params = SamplingTensors(torch.ones(rows), top_p=torch.full((rows,), 0.9))
    kept = int(apply_top_k_top_p(logits[:1], None, params.top_p[:1]).isfinite().sum())
    assert kept > 8000
    counts = torch.bincount(sampler.sample(logits, params), minlength=vocab)
    assert counts.sum() == rows and counts[counts > 0].numel() > 2500  # spread over the kept tokens, not 4,096
    assert counts[kept:].sum() == 0  # ~10% of the mass lies past the cut: a sampler ignoring it would pick ~400


def test_a_seeded_row_samples_the_same_whatever_the_other_rows_ask():
    """Row 0 keeps ~6,400 of 10,000 tokens under top-p 0.9, past both tiers: it takes the full-vocabulary path
    whatever the other row asks. Were the candidates sized by the batch (e.g. twice its largest top-k), the other
    row's top-k 3,500 would move row 0 onto the candidate path, which draws in another order: another token."""
    gen = torch.Generator().manual_seed(3)
    row0 = (-torch.arange(10_000) * 3e-4)[torch.randperm(10_000, generator=gen)]  # vocabulary order != rank order
    logits = torch.stack([row0, 4 * torch.randn(10_000, generator=gen)])
    picks = []
    for other_top_k in (0, 3500, 5):
        params = SamplingTensors(torch.ones(2), top_k=torch.tensor([0, other_top_k]), top_p=torch.tensor([0.9, 1.0]),
                                 generators=[torch.Generator().manual_seed(11), None])
        picks.append(int(sampler.sample(logits, params)[0]))
    assert len(set(picks)) == 1, picks


def test_inverse_cdf_never_picks_a_zero_weight_entry_even_at_u_near_one():
    weights = torch.tensor([[0.3, 0.7, 0.0, 0.0], [0.0, 1e-30, 0.0, 0.0]])
    for u in (0.0, 0.5, 1 - 1e-9, torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()):
        picked = inverse_cdf(weights, torch.full((2,), u))
        assert weights[torch.arange(2), picked].gt(0).all(), (u, picked)
    assert inverse_cdf(torch.full((1, 4), float("nan")), torch.tensor([0.5])).item() == 3  # inside the vocabulary


@pytest.mark.parametrize("user_env, expected", [
    ({}, ("ACTIVE", "10000") if sys.platform.startswith("linux") else (None, None)),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, ("PASSIVE", None)),  # what the user set wins, and nothing is added
    ({"GOMP_SPINCOUNT": "5"}, (None, "5")),
])
def test_openmp_threads_spin_briefly_unless_the_user_said_otherwise(user_env, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    code = "import os, nanovllm; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env={**env, **user_env}, capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert tuple(None if v == "None" else v for v in out) == expected


def test_the_second_tier_of_candidates_resolves_what_the_first_cannot():
    from nanovllm.core.sampler import apply_top_k_top_p
    logits = (-torch.arange(5000) * 0.005).unsqueeze(0)  # top-p 0.9 keeps the first ~461 tokens
    params = SamplingTensors(torch.ones(1), top_p=torch.tensor([0.9]))
    first, second = sampler.CANDIDATES
    assert not sampler.filter_candidates(logits, params, first)[3].item()
    values, ids, kept, resolved = sampler.filter_candidates(logits, params, second)
    assert resolved.item()
    got = torch.zeros(5000)
    got[ids[0]] = (values[0] - values[0, 0]).exp().masked_fill(~kept[0], 0)
    assert torch.allclose(got / got.sum(), apply_top_k_top_p(logits, None, params.top_p).softmax(-1)[0], atol=1e-6)


@pytest.mark.parametrize("vocab", [200, 512, 4096])
def test_an_unfiltered_seeded_row_samples_the_same_beside_filtered_rows_in_a_small_vocabulary(vocab):
    """A vocabulary within a candidate tier (tiny models: 512 entries) made that tier hold every token, and the
    tier 'resolved' every row, an unfiltered one too: beside a top-k or top-p row, a row without filters drew in
    rank order, alone in vocabulary order, so a seeded request's tokens changed with what else was in the batch."""
    gen = torch.Generator().manual_seed(5)
    target = torch.randn(vocab, generator=gen)
    other = torch.randn(vocab, generator=gen)
    for seed in range(20):
        alone = sampler.sample(target.unsqueeze(0), SamplingTensors(torch.ones(1), generators=[
            torch.Generator().manual_seed(seed)]))
        for top_k, top_p in ((5, 1.0), (0, 0.8)):
            params = SamplingTensors(torch.ones(2), top_k=torch.tensor([0, top_k]), top_p=torch.tensor([1.0, top_p]),
                                     generators=[torch.Generator().manual_seed(seed), None])
            assert sampler.sample(torch.stack([target, other]), params)[0] == alone[0], (seed, top_k, top_p)
