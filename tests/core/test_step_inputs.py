"""StepInputBuilder's decode metadata: the longest-first order it hands to decode kernels (DecodeMetadata.seq_order)."""
import torch

from nanovllm.core.scheduler import ScheduledBatch
from nanovllm.core.sequence import Sequence
from nanovllm.core.step_inputs import StepInputBuilder
from nanovllm.sampling_params import SamplingParams


def sequence(length: int, computed: int, first_block: int) -> Sequence:
    seq = Sequence(list(range(length)), SamplingParams(temperature=0.0, max_tokens=4))
    seq.block_table = list(range(first_block, first_block + 3))
    seq.num_computed_tokens = computed
    return seq


def builder() -> StepInputBuilder:
    return StepInputBuilder(torch.device("cpu"), block_size=16, max_num_seqs=8, max_blocks_per_seq=4, pin=False)


def test_decode_steps_carry_the_sequences_longest_first():
    lengths = [5, 40, 17, 40, 1 + 1, 33]  # context lengths after this step's token
    seqs = [sequence(n, n - 1, 3 * i) for i, n in enumerate(lengths)]
    b = builder()
    for batch_seqs in (seqs, seqs[:3]):  # a smaller batch after a larger one (the host buffers alternate)
        _, _, meta = b.build(ScheduledBatch(batch_seqs, [1] * len(batch_seqs), 0, [True] * len(batch_seqs)))
        order = meta.decode.seq_order
        assert order.dtype == torch.int32
        want = sorted(range(len(batch_seqs)), key=lambda i: (-lengths[i], i))  # ties keep batch order
        assert order.tolist() == want
        assert meta.decode.context_lens[order].tolist() == sorted(lengths[:len(batch_seqs)], reverse=True)


def test_mixed_steps_order_their_decodes_too():
    """A step with prefills and decodes orders its decode rows as well (one compiled decode variant for both)."""
    decodes = [sequence(n, n - 1, 3 * i) for i, n in enumerate([5, 40, 17])]
    prefill = sequence(30, 0, 20)
    _, _, meta = builder().build(ScheduledBatch([prefill, *decodes], [30, 1, 1, 1], 1, [True] * 4))
    assert meta.decode.seq_order.tolist() == [1, 2, 0]
    assert meta.decode.seq_order.dtype == torch.int32
