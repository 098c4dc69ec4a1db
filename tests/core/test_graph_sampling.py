"""Which steps a captured decode graph may sample (StepSampler.plain), and that the runner then takes the graph's
tokens: on the cpu_ref engine with a stand-in graph replayer (the real one is the cuda backend's, tested on a GPU
in tests/backends)."""
import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.core.backend import Backend
from nanovllm.core.sampling.step_sampler import StepSampler
from nanovllm.core.scheduler import ScheduledBatch
from nanovllm.core.sequence import Sequence
from tests.conftest import random_prompts


def batch_of(*params: SamplingParams, sample: list[bool] | None = None) -> ScheduledBatch:
    seqs = [Sequence([1, 2, 3], p) for p in params]
    return ScheduledBatch(seqs, [1] * len(seqs), 0, sample or [True] * len(seqs))


PLAIN = SamplingParams(temperature=0.5, max_tokens=8)
GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.mark.parametrize("other", [
    SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=0.7, min_p=0.1), SamplingParams(temperature=0, logprobs=2),
    SamplingParams(temperature=0.7, presence_penalty=0.5), SamplingParams(temperature=0.7, frequency_penalty=0.5),
    SamplingParams(temperature=0.7, repetition_penalty=1.2), SamplingParams(temperature=0.7, logit_bias={5: 1.0}),
    SamplingParams(temperature=0.7, allowed_token_ids=[1, 2]), SamplingParams(temperature=0.7, bad_words=["x"]),
    SamplingParams(temperature=0.7, structured={"regex": "a+"}),
], ids=["top_k", "top_p", "min_p", "logprobs", "presence", "frequency", "repetition", "logit_bias", "allowed",
        "bad_words", "structured"])
def test_a_batch_is_plain_only_without_filters_or_logits_work(other):
    sampler = StepSampler(Backend(), torch.device("cpu"))
    plain = sampler.plain(batch_of(PLAIN, GREEDY))
    assert plain is not None and plain.seed is sampler.seed and plain.temperatures.tolist() == [0.5, 0.0]
    assert sampler.plain(batch_of(PLAIN, other, GREEDY)) is None
    assert sampler.plain(batch_of(PLAIN, GREEDY)) is not None  # a new batch: cached flags follow it


def test_seeded_requests_and_rows_that_do_not_sample_are_not_plain():
    sampler = StepSampler(Backend(), torch.device("cpu"))
    batch = batch_of(PLAIN, PLAIN)
    batch.seqs[1].generator = torch.Generator().manual_seed(3)
    assert sampler.plain(batch) is None
    assert sampler.plain(batch_of(PLAIN, GREEDY, sample=[True, False])) is None


def test_min_tokens_keeps_a_batch_outside_only_while_stop_tokens_are_suppressed():
    sampler = StepSampler(Backend(), torch.device("cpu"))
    batch = batch_of(PLAIN, SamplingParams(temperature=0.7, max_tokens=8, min_tokens=2))
    assert sampler.plain(batch) is not None  # no stop tokens to suppress
    batch.seqs[1].stop_token_ids = frozenset({0})
    sampler.reset()
    assert sampler.plain(batch) is None
    batch.seqs[1].append_token(5), batch.seqs[1].append_token(6)
    assert sampler.plain(batch) is not None  # min_tokens reached: the same (cached) batch is plain now


class StandInGraphs:
    """What a replayer that captured the sampler does, run eagerly: the model, the LM head, the plan's sampler."""
    samples = True

    def __init__(self, runner):
        self.runner, self.sampled_steps, self.logits_steps = runner, 0, 0

    def can_run(self, num_seqs: int) -> bool:
        return True

    def _logits(self, input_ids, positions, meta):
        model = self.runner.model
        return model.compute_logits(model(input_ids, positions, meta)[meta.logits_indices])

    def run(self, input_ids, positions, meta):
        self.logits_steps += 1
        return self._logits(input_ids, positions, meta)

    def run_and_sample(self, input_ids, positions, meta, params):
        self.sampled_steps += 1
        return self.runner.sampler(self._logits(input_ids, positions, meta), params)


@pytest.fixture(scope="module")
def engines(tiny_qwen3):
    plain = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=256, max_model_len=512)
    graphs = LLM(tiny_qwen3, backend="cpu_ref", num_kvcache_blocks=256, max_model_len=512)
    graphs.engine.runner.graphs = StandInGraphs(graphs.engine.runner)
    return plain, graphs


def test_plain_decode_steps_take_the_graphs_tokens_and_greedy_ones_are_the_same(engines):
    plain, graphs = engines
    stand_in = graphs.engine.runner.graphs
    prompts = random_prompts(4, 500, (3, 40), seed=5)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = [o["token_ids"] for o in plain.generate(prompts, params, use_tqdm=False)]
    assert [o["token_ids"] for o in graphs.generate(prompts, params, use_tqdm=False)] == want
    assert stand_in.sampled_steps >= 5 and stand_in.logits_steps == 0  # every decode step: 5 per request
    sampled = graphs.generate(prompts, SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert all(len(o["token_ids"]) == 6 for o in sampled)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1),
                                    SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, presence_penalty=1.0),
                                    SamplingParams(temperature=0.8, max_tokens=6, ignore_eos=True, top_p=0.5)],
                         ids=["logprobs", "penalty", "top_p"])
def test_other_decode_steps_sample_the_graphs_logits_outside(engines, params):
    plain, graphs = engines
    stand_in = graphs.engine.runner.graphs
    stand_in.sampled_steps = stand_in.logits_steps = 0
    prompts = random_prompts(3, 500, (3, 40), seed=6)
    outputs = graphs.generate(prompts, params, use_tqdm=False)
    assert stand_in.sampled_steps == 0 and stand_in.logits_steps >= 5
    if params.temperature == 0:
        assert [o["token_ids"] for o in outputs] == [o["token_ids"] for o in plain.generate(prompts, params,
                                                                                           use_tqdm=False)]
