import torch

from nanovllm.core.config import EngineConfig
from nanovllm.core.scheduler import Scheduler
from nanovllm.core.sequence import Sequence, SequenceStatus
from nanovllm.core.sampling.step_sampler import suppress_stop_tokens
from nanovllm.sampling_params import SamplingParams


def make(num_blocks=64, block_size=4, **kw):
    config = EngineConfig(model="unused", **{"max_num_seqs": 8, "max_num_batched_tokens": 32, "max_model_len": 64, **kw})
    return Scheduler(config, num_blocks, block_size, eos_token_ids={0})


def add(s, n, max_tokens=4, **kw):
    seq = Sequence(list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens, **kw))
    s.add(seq)
    return seq


def test_prefill_first_then_decode():
    s = make()
    a, b = add(s, 5), add(s, 7)
    batch = s.schedule()
    assert batch.is_prefill and batch.seqs == [a, b] and batch.num_new_tokens == [5, 7] and batch.sample == [True, True]
    s.postprocess(batch, [9, 9])
    batch = s.schedule()
    assert not batch.is_prefill and batch.seqs == [b, a] and batch.num_new_tokens == [1, 1]  # longest first


def test_decode_steps_come_longest_first_ties_in_running_order():
    """Decode kernels start a program per sequence in batch order, so the scheduler orders decode steps by context
    length, longest first (the tail of a launch gets the shortest); running order itself is left alone."""
    s = make(max_num_batched_tokens=64)
    seqs = [add(s, n, max_tokens=8) for n in (5, 12, 3, 12, 9)]
    s.postprocess(s.schedule(), [9] * 5)
    for _ in range(3):
        batch = s.schedule()
        assert not batch.is_prefill
        assert batch.seqs == [seqs[1], seqs[3], seqs[4], seqs[0], seqs[2]]
        lengths = [q.num_computed_tokens for q in batch.seqs]
        assert lengths == sorted(lengths, reverse=True)
        s.postprocess(batch, [9] * 5)
    assert s.running == seqs


def test_chunked_prefill_splits_long_prompt_and_samples_only_at_the_end():
    s = make(max_num_batched_tokens=16, max_num_seqs=4)
    a = add(s, 40)
    sizes = []
    while True:
        batch = s.schedule()
        sizes.append(batch.num_new_tokens[0])
        s.postprocess(batch, [9 if x else None for x in batch.sample])
        if a.num_output_tokens:
            break
    assert sizes == [16, 16, 8] and a.token_ids[-1] == 9


def test_preemption_when_blocks_run_out_and_resume():
    s = make(num_blocks=5, block_size=4, max_model_len=16)
    a, b = add(s, 8, max_tokens=8), add(s, 8, max_tokens=8)
    batch = s.schedule()
    s.postprocess(batch, [5, 5])  # a, b hold 2 blocks each; 1 free
    batch = s.schedule()  # a needs a third block (takes the free one), b cannot get one: preempted
    assert batch.seqs == [a] and b.status == SequenceStatus.WAITING and s.num_preemptions == 1
    assert s.block_manager.num_free_blocks == 2
    s.block_manager.check_invariants(s.running)


def test_finish_on_eos_max_tokens_and_stop_token():
    s = make()
    a, b, c = add(s, 3, max_tokens=2), add(s, 3, max_tokens=5), add(s, 3, max_tokens=5, stop_token_ids=[7])
    s.postprocess(s.schedule(), [4, 0, 7])
    assert b.finish_reason == "stop" and c.finish_reason == "stop" and not a.is_finished
    s.postprocess(s.schedule(), [4])
    assert a.finish_reason == "length" and not s.has_unfinished()
    assert s.block_manager.num_free_blocks == 64


def test_ignore_eos_and_min_tokens():
    """min_tokens is enforced once, by the StepSampler masking EOS and stop tokens before they can be sampled."""
    s = make()
    a, b = add(s, 3, max_tokens=3, ignore_eos=True), add(s, 3, max_tokens=3, min_tokens=1)
    logits = torch.zeros(2, 4)
    suppress_stop_tokens(logits, [a, b])  # b has no output token yet: its EOS (token 0) cannot be sampled
    assert logits[0, 0] == 0 and logits[1, 0] == float("-inf") and logits[1, 1:].eq(0).all()
    s.postprocess(s.schedule(), [0, 1])
    assert not a.is_finished and not b.is_finished
    logits = torch.zeros(2, 4)
    suppress_stop_tokens(logits, [a, b])  # min_tokens=1 reached: nothing is masked any more
    assert logits.eq(0).all()
    s.postprocess(s.schedule(), [0, 0])
    assert b.finish_reason == "stop" and not a.is_finished


def test_max_num_seqs_limits_admission():
    s = make(max_num_seqs=2, max_num_batched_tokens=32)
    seqs = [add(s, 3) for _ in range(3)]
    batch = s.schedule()
    assert batch.seqs == seqs[:2] and len(s.waiting) == 1


def test_prefill_is_scheduled_behind_a_prefill_in_flight():
    """The next prompts (a chunk of a long one, new requests) launch before the step in flight is committed;
    its sampled sequences wait for decode."""
    s = make(max_num_batched_tokens=16)
    a, b, c = add(s, 12), add(s, 10), add(s, 3)
    first = s.schedule()
    assert first.seqs == [a, b] and first.num_new_tokens == [12, 4]
    indices = s.launch(first)
    second = s.schedule(in_flight=first)
    assert second.is_prefill and second.seqs == [b, c] and second.num_new_tokens == [6, 3]
    assert a not in second.seqs  # its next input is the token in flight
    s.commit(first, indices, [9])
    s.postprocess(second, [8, 7])
    third = s.schedule()
    assert not third.is_prefill and third.seqs == [a, b, c]


def test_prefill_behind_prefill_waits_for_blocks_in_flight_that_would_be_prefix_hits():
    """A request whose prefix the step in flight is computing is not scheduled behind it: after the commit it is
    a prefix-cache hit, as without pipelining. Other requests still are."""
    s = make(max_num_batched_tokens=12)
    a = add(s, 12)
    first = s.schedule()
    assert first.seqs == [a]
    indices = s.launch(first)
    same = add(s, 10)  # tokens 1..10: its first two blocks are a's, in flight
    assert s.schedule(in_flight=first) is None
    s.commit(first, indices, [9])
    batch = s.schedule()
    assert batch.seqs == [same] and same.num_cached_tokens == 8
    indices = s.launch(batch)
    other = Sequence([5] * 9, SamplingParams(max_tokens=4))
    s.add(other)
    behind = s.schedule(in_flight=batch)
    assert behind.seqs == [other] and other.num_cached_tokens == 0
