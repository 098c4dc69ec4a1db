"""Penalties, logit bias, allowed tokens and bad words: the batched device pass equals the plain cpu_ref reference
on random logits and histories, step after step (the state it keeps on the device follows the sampled tokens)."""
import math
import random

import pytest
import torch

from nanovllm.backends.cpu_ref.logits_reference import process_logits_reference
from nanovllm.core.sampling.logits_processing import LogitsProcessor
from nanovllm.core.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

V = 50


def random_params(rng: random.Random, rule: str) -> tuple[SamplingParams, list[list[int]]]:
    words = []
    kw = {}
    if rule in ("presence", "all"):
        kw["presence_penalty"] = rng.uniform(-2, 2)
    if rule in ("frequency", "all"):
        kw["frequency_penalty"] = rng.uniform(-2, 2)
    if rule in ("repetition", "all"):
        kw["repetition_penalty"] = rng.choice([0.5, 1.3, 2.0])
    if rule in ("bias", "all"):
        kw["logit_bias"] = {rng.randrange(V): rng.uniform(-100, 100) for _ in range(3)}
    if rule in ("allowed", "all"):
        kw["allowed_token_ids"] = rng.sample(range(V), 20)
    if rule in ("bad_words", "all"):
        words = [[rng.randrange(4)] + [rng.randrange(4) for _ in range(rng.randrange(3))] for _ in range(3)]
        kw["bad_words"] = words
    return SamplingParams(**kw), words


@pytest.mark.parametrize("rule", ["presence", "frequency", "repetition", "bias", "allowed", "bad_words", "all"])
def test_batched_pass_equals_reference_over_steps(rule):
    rng = random.Random(hash(rule) % 1000)
    torch.manual_seed(0)
    seqs = []
    for i in range(6):
        if i % 3 == 2:
            params, words = SamplingParams(), []  # a plain row in the batch: left untouched
        else:
            params, words = random_params(rng, rule)
        prompt = [rng.randrange(V) for _ in range(rng.randrange(1, 8))]
        seq = Sequence(prompt, params)
        seq.bad_word_ids = words
        seqs.append(seq)
    processor = LogitsProcessor(torch.device("cpu"))
    for step in range(8):
        batch = [s for s in seqs if step < 2 or rng.random() < 0.8]  # the batch changes between steps
        logits = torch.randn(len(batch), V) * 3
        before = logits.clone()
        processed = processor.apply(logits, batch)
        for row, seq in enumerate(batch):
            expected = process_logits_reference(before[row].tolist(), seq.params, seq.token_ids[:seq.num_prompt_tokens],
                                                seq.output_token_ids, seq.bad_word_ids)
            torch.testing.assert_close(logits[row], torch.tensor(expected), rtol=1e-5, atol=1e-4)
        # histories with repeats of the few tokens bad words use, so their prefixes do match
        tokens = torch.tensor([rng.randrange(4) if rng.random() < 0.7 else rng.randrange(V) for _ in batch])
        processor.record(processed, tokens)
        for seq, t in zip(batch, tokens.tolist()):
            seq.append_token(t)


def test_plain_batches_are_not_touched():
    processor = LogitsProcessor(torch.device("cpu"))
    logits = torch.randn(3, V)
    assert processor.apply(logits, [Sequence([1, 2], SamplingParams()) for _ in range(3)]) is None
    assert processor.counts is None, "a batch without penalties allocated penalty state"


def test_slots_of_finished_sequences_are_reused():
    processor = LogitsProcessor(torch.device("cpu"))
    for round_ in range(10):
        seqs = [Sequence([1, 2, 3], SamplingParams(presence_penalty=1.0)) for _ in range(3)]
        logits = torch.zeros(3, V)
        processor.record(processor.apply(logits, seqs), torch.tensor([5, 5, 6]))
        for s in seqs:
            s.status = s.status.FINISHED
    assert len(processor.owners) <= 8


def test_one_token_bad_word_and_allowed_ids_are_never_sampled():
    processor = LogitsProcessor(torch.device("cpu"))
    seq = Sequence([1], SamplingParams(allowed_token_ids=[3, 4, 5]))
    seq.bad_word_ids = [[4]]
    logits = torch.randn(1, V)
    processor.apply(logits, [seq])
    assert logits[0].isfinite().nonzero().flatten().tolist() == [3, 5]
    assert not math.isinf(logits[0, 3])


def test_bad_word_banned_only_when_the_output_ends_with_its_prefix():
    processor = LogitsProcessor(torch.device("cpu"))
    seq = Sequence([9, 9], SamplingParams(bad_words=[[1, 2, 7], [2, 8], [1, 9]]))
    seq.bad_word_ids = seq.params.bad_words
    for token in (1, 2):
        processed = processor.apply(torch.zeros(1, V), [seq])
        processor.record(processed, torch.tensor([token]))
        seq.append_token(token)
    logits = torch.zeros(1, V)
    processor.apply(logits, [seq])
    assert torch.isinf(logits[0]).nonzero().flatten().tolist() == [7, 8]
