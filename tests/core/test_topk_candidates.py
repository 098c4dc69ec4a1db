"""The candidate sampler (core/sampling/topk_candidates.py) against the reference sampler's filters."""
import pytest
import torch

from nanovllm.core import sampler as reference
from nanovllm.core.sampler import SamplingTensors
from nanovllm.core.sampling import topk_candidates as tc


def dense(c: tc.Candidates, vocab_size: int) -> torch.Tensor:
    """[B, V] probabilities the candidates and tie block stand for (tied tokens kept by lowest id)."""
    probs = torch.zeros(len(c.ids), vocab_size)
    probs.scatter_(-1, c.ids, c.weights)
    keep = c.tied & (c.tied.cumsum(-1) <= c.tie_count.unsqueeze(-1))
    probs += keep * c.tie_weight.unsqueeze(-1)
    return probs / probs.sum(-1, keepdim=True)


def case(seed: int, ties: bool, rows: int = 48, vocab_size: int = 300):
    g = torch.Generator().manual_seed(seed)
    if ties:  # a coarse grid: many tokens share the k-th value, inside and outside the candidates
        logits = torch.randint(-12, 12, (rows, vocab_size), generator=g).float() / 4
    else:
        logits = torch.randn(rows, vocab_size, generator=g) * 3
    top_k = torch.randint(1, 41, (rows,), generator=g)
    top_p = torch.where(torch.rand(rows, generator=g) < 0.6, 0.3 + 0.69 * torch.rand(rows, generator=g), 1.0)
    min_p = torch.where(torch.rand(rows, generator=g) < 0.3, 0.05, 0.0)
    temperatures = 0.5 + torch.rand(rows, generator=g)
    params = SamplingTensors(temperatures, top_k=top_k, top_p=top_p, min_p=min_p)
    return logits / temperatures.unsqueeze(-1), params, int(top_k.max())


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kept_distribution_equals_the_reference(seed, ties):
    scaled, params, k = case(seed, ties)
    expected = reference.apply_top_k_top_p_min_p(scaled, params).softmax(-1)
    got = dense(tc.filter_candidates(scaled, params, k), scaled.shape[-1])
    if ties:
        assert int(tc.filter_candidates(scaled, params, k).tie_count.sum()) > 0  # the case exercises the tie block
        # among equal values the reference's sort picks which tied tokens top-p keeps: compare as multisets
        torch.testing.assert_close(got.sort(-1).values, expected.sort(-1).values, atol=1e-6, rtol=1e-5)
        value = (scaled * (got > 0)).where(got > 0, torch.inf).min(-1, keepdim=True).values
        assert bool(((got > 0) == (expected > 0))[scaled > value].all())  # strictly above the cut: the same tokens
    else:
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("ties", [False, True])
def test_draw_by_inverse_cdf_follows_the_kept_distribution(ties):
    """Evenly spaced uniforms: each token is drawn for its probability's share of them (to one grid step)."""
    scaled, params, k = case(7, ties, rows=6, vocab_size=120)
    c = tc.filter_candidates(scaled, params, k)
    probs = dense(c, scaled.shape[-1])
    n = 4000
    for row in range(len(scaled)):
        one = tc.Candidates(*(t[row:row + 1].expand(n, *t.shape[1:]).clone() for t in c))
        tokens = tc.draw(one, (torch.arange(n) + 0.5) / n)
        counts = torch.bincount(tokens, minlength=scaled.shape[-1]).float() / n
        assert bool((counts[probs[row] == 0] == 0).all())
        torch.testing.assert_close(counts, probs[row], atol=2.5 / n, rtol=0)


def assert_kept_by_value(tokens: torch.Tensor, scaled: torch.Tensor, params: SamplingTensors) -> None:
    """Each token's value is at least the smallest the reference keeps (which of equal values: see `dense`)."""
    kept = reference.apply_top_k_top_p_min_p(scaled, params)
    cut = kept.where(kept > -torch.inf, torch.inf).min(-1).values
    assert bool((scaled.gather(-1, tokens[:, None]).squeeze(-1) >= cut).all())


def test_sample_takes_greedy_rows_argmax_and_refuses_seeded_rows():
    scaled, params, k = case(3, ties=True, rows=8)
    params.temperatures[::2] = 0.0
    tokens = tc.sample(scaled, params, k)
    assert torch.equal(tokens[::2], scaled[::2].argmax(-1))
    sampling = params.temperatures > 0
    unscaled = SamplingTensors(params.temperatures[sampling], top_k=params.top_k[sampling],
                               top_p=params.top_p[sampling], min_p=params.min_p[sampling])
    assert_kept_by_value(tokens[sampling], scaled[sampling] / params.temperatures[sampling].unsqueeze(-1), unscaled)
    params.generators = [torch.Generator()] + [None] * 7
    with pytest.raises(ValueError, match="seeded rows"):
        tc.sample(scaled, params, k)


def test_top_k_bound_is_the_largest_k_when_every_sampling_row_has_one():
    assert tc.top_k_bound([20, 5, 0], [False, False, True]) == 20  # the greedy row needs none
    assert tc.top_k_bound([20, 0], [False, False]) is None  # a row samples the whole vocabulary
    assert tc.top_k_bound([0, 0], [True, True]) is None


def test_cuda_sampler_serves_top_k_steps_from_candidates(monkeypatch):
    """The cuda backend's sampler takes the candidate path for top-k steps (on CPU tensors here), not the sort."""
    from nanovllm.backends.cuda import sampler as cuda_sampler
    scaled, params, k = case(5, ties=True, rows=8)
    params.top_k_bound = k
    monkeypatch.setattr(cuda_sampler.reference, "sample", lambda *a: pytest.fail("the reference sorted the step"))
    logits = scaled * params.temperatures.unsqueeze(-1)
    tokens = cuda_sampler.sample(logits, params)
    assert_kept_by_value(tokens, logits / params.temperatures.unsqueeze(-1), params)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_tie_block_tokens_each_get_their_share(top_p):
    """top_k 3 over [3, 2, 1 x 6, 0, ...]: one tied token among the candidates, five in the tie block; with top-p
    0.8 the block is cut part-way, keeping its lowest ids."""
    scaled = torch.zeros(1, 50)
    scaled[0, 0], scaled[0, 1], scaled[0, 10:16] = 3.0, 2.0, 1.0
    params = SamplingTensors(torch.ones(1), top_k=torch.tensor([3]), top_p=torch.tensor([top_p]))
    c = tc.filter_candidates(scaled, params, 3)
    expected = reference.apply_top_k_top_p_min_p(scaled, params).softmax(-1)
    probs = dense(c, 50)
    assert int((probs > 0).sum()) == int((expected > 0).sum())
    torch.testing.assert_close(probs.sort(-1).values, expected.sort(-1).values)
    n = 6000
    one = tc.Candidates(*(t.expand(n, *t.shape[1:]).clone() for t in c))
    counts = torch.bincount(tc.draw(one, (torch.arange(n) + 0.5) / n), minlength=50).float() / n
    torch.testing.assert_close(counts, probs[0], atol=2.5 / n, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU cases above run the same code)")
def test_on_cuda_the_kept_distribution_and_draws_match_the_reference():
    scaled, params, k = case(11, ties=True)
    scaled = scaled.cuda()
    params = SamplingTensors(*(t.cuda() for t in (params.temperatures, params.top_k, params.top_p, params.min_p)))
    expected = reference.apply_top_k_top_p_min_p(scaled, params).softmax(-1).cpu()
    c = tc.filter_candidates(scaled, params, k)
    got = dense(tc.Candidates(*(t.cpu() for t in c)), scaled.shape[-1])
    torch.testing.assert_close(got.sort(-1).values, expected.sort(-1).values, atol=1e-6, rtol=1e-5)
    tokens = tc.sample(scaled, SamplingTensors(torch.ones(len(scaled), device="cuda"), params.top_k, params.top_p,
                                               params.min_p), k).cpu()
    assert_kept_by_value(tokens, scaled.cpu(), SamplingTensors(*(t.cpu() for t in (params.temperatures,
                                                                                     params.top_k, params.top_p,
                                                                                     params.min_p))))


def test_rows_of_minus_infinity_past_the_candidates_draw_only_finite_tokens():
    """A row whose k-th value is -inf (fewer finite logits than k, e.g. masked by structured output): the -inf
    tokens form a tie block of weight 0 and are never drawn."""
    scaled = torch.full((3, 64), -torch.inf)
    scaled[:, :3] = torch.tensor([2.0, 1.0, 0.5])
    params = SamplingTensors(torch.ones(3), top_k=torch.tensor([10, 10, 10]), top_p=torch.tensor([1.0, 0.9, 0.5]))
    c = tc.filter_candidates(scaled, params, 10)
    assert bool((c.tie_count >= 0).all())
    tokens = tc.draw(tc.Candidates(*(t.repeat_interleave(500, 0) for t in c)), torch.rand(1500))
    assert bool((tokens < 3).all())


def test_step_tensors_carry_the_top_k_bound_of_their_sampling_rows():
    from nanovllm import SamplingParams
    from nanovllm.core.backend import Backend
    from nanovllm.core.sampling.step_sampler import StepSampler
    from nanovllm.core.sequence import Sequence

    def bound(*params):
        return StepSampler(Backend(), torch.device("cpu")).tensors([Sequence([1, 2], p) for p in params]).top_k_bound
    qwen3 = SamplingParams(temperature=0.6, top_k=20, top_p=0.95)
    assert bound(qwen3, SamplingParams(temperature=0.7, top_k=50), SamplingParams(temperature=0)) == 50
    assert bound(qwen3, SamplingParams(temperature=0.7, top_p=0.9)) is None  # a nucleus over the vocabulary
    assert bound(SamplingParams(temperature=0.7)) is None
