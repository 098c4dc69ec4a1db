"""The reference sampler: masks against a straightforward per-row implementation, sampled frequencies against
the renormalised distribution (chi-square), greedy equivalences and per-request seeds."""
import pytest
import torch

from nanovllm.core.sampler import SamplingTensors, apply_top_k_top_p_min_p, sample, suppress_tokens


def tensors(n, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, generators=None):
    def column(values, dtype):
        values = values if isinstance(values, list) else [values] * n
        return torch.tensor(values, dtype=dtype)
    t = column(temperature, torch.float32)
    return SamplingTensors(t, column(top_k, torch.int64), column(top_p, torch.float32), column(min_p, torch.float32),
                           generators, all_greedy=bool((t == 0).all()))


def reference_kept(row: torch.Tensor, k: int, p: float, min_p: float) -> set[int]:
    """The tokens top-k, then top-p over the survivors, then min-p keep, one row, the obvious way, in float64."""
    row = row.double()
    order = sorted(range(len(row)), key=lambda i: -row[i].item())
    kept = [i for i in order if k <= 0 or row[i] >= row[order[k - 1]]]
    if p < 1:
        probs = torch.softmax(row[kept], 0).tolist()
        mass, survivors = 0.0, []
        for i, prob in zip(kept, probs):
            if mass < p:
                survivors.append(i)
            mass += prob
        kept = survivors
    if min_p > 0:
        probs = torch.softmax(row[kept], 0)
        kept = [i for i, prob in zip(kept, probs.tolist()) if prob >= min_p * probs.max().item()]
    return set(kept)


def test_masks_equal_reference_on_random_logits():
    g = torch.Generator().manual_seed(0)
    n, vocab = 96, 50
    logits = torch.randn(n, vocab, generator=g) * 3
    top_k = torch.randint(-1, 12, (n,), generator=g).clamp_min(0).tolist()  # a fifth of the rows off
    top_p = [1.0 if i % 4 == 0 else float(x) for i, x in enumerate(torch.rand(n, generator=g) * 0.95 + 0.05)]
    min_p = [0.0 if i % 3 == 0 else float(x) for i, x in enumerate(torch.rand(n, generator=g) * 0.5)]
    masked = apply_top_k_top_p_min_p(logits, tensors(n, top_k=top_k, top_p=top_p, min_p=min_p))
    for r in range(n):
        kept = set(torch.nonzero(masked[r] > float("-inf")).flatten().tolist())
        assert kept == reference_kept(logits[r], top_k[r], top_p[r], min_p[r]), f"row {r}"
        assert torch.equal(masked[r][list(kept)], logits[r][list(kept)])


LOGITS = torch.tensor([2.0, 1.6, 1.1, 0.7, 0.2, -0.3, -1.0, -2.0])
SETTINGS = [dict(), dict(temperature=0.7, top_k=5), dict(top_p=0.8), dict(min_p=0.2),
            dict(temperature=1.3, top_k=7, top_p=0.9, min_p=0.1)]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain")
def test_sampled_frequencies_match_renormalised_distribution(settings):
    torch.manual_seed(1234)
    draws = 20000
    temperature = settings.get("temperature", 1.0)
    kept = sorted(reference_kept(LOGITS / temperature, settings.get("top_k", 0), settings.get("top_p", 1.0),
                                 settings.get("min_p", 0.0)))
    expected = torch.softmax((LOGITS / temperature).double()[kept], 0) * draws
    tokens = sample(LOGITS.expand(draws, -1), tensors(draws, **settings))
    counts = torch.bincount(tokens, minlength=len(LOGITS)).double()
    assert counts.sum() == counts[kept].sum(), "a masked token was sampled"
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum()
    dof = len(kept) - 1
    p_value = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), chi2 / 2).item()
    assert p_value > 1e-3, f"chi2={chi2:.1f} with {dof} degrees of freedom"


def test_greedy_rows_and_top_k_1_take_the_argmax():
    torch.manual_seed(0)
    logits = torch.randn(16, 300) * 2
    greedy = logits.argmax(-1)
    assert torch.equal(sample(logits, tensors(16, temperature=0.0)), greedy)
    assert torch.equal(sample(logits, tensors(16, temperature=1.5, top_k=1)), greedy)
    mixed = tensors(16, temperature=[0.0, 1.0] * 8)
    assert torch.equal(sample(logits, mixed)[::2], greedy[::2])


def test_sample_leaves_the_logits_alone():
    logits = torch.randn(4, 64)
    before = logits.clone()
    sample(logits, tensors(4, temperature=0.8, top_k=10, top_p=0.9, min_p=0.05))
    assert torch.equal(logits, before)


def seeded_tokens(logits, row, seed, others, steps=8):
    """The tokens row `row` of `logits` draws over `steps` calls with its own seeded generator, in a batch of
    `others` (row indices, unseeded or seeded differently)."""
    gen = torch.Generator().manual_seed(seed)
    rows = sorted(set(others) | {row})
    generators = [gen if r == row else (torch.Generator().manual_seed(r) if r % 2 else None) for r in rows]
    params = tensors(len(rows), temperature=[1.0 if r == row else 0.5 + r / 10 for r in rows],
                     top_k=[0 if r == row else r for r in rows], generators=generators)
    return [sample(logits[rows], params)[rows.index(row)].item() for _ in range(steps)]


def test_same_seed_same_tokens_whatever_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 200)
    alone = seeded_tokens(logits, 2, seed=7, others=[])
    assert seeded_tokens(logits, 2, seed=7, others=[0, 1, 3, 4, 5]) == alone
    assert seeded_tokens(logits, 2, seed=7, others=[5]) == alone
    assert seeded_tokens(logits, 2, seed=8, others=[]) != alone


def test_suppress_tokens_masks_exactly_the_pairs():
    logits = torch.zeros(3, 10)
    suppress_tokens(logits, [0, 0, 2], [1, 9, 4])
    assert torch.isinf(logits).nonzero().tolist() == [[0, 1], [0, 9], [2, 4]]
