"""StepInputBuilder: the longest-first order it hands to the decode rows of mixed steps (DecodeMetadata.seq_order;
decode-only steps come longest first from the scheduler and carry none), and decode steps built in a DecodeRecord:
one copy to the device record, padded to the graphs' sizes, the pending-token index."""
import pytest
import torch

from nanovllm.core.decode_record import DecodeRecord, InOrderCopier

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


def test_decode_steps_keep_the_batch_order_and_carry_no_order():
    """The scheduler orders decode-only steps (longest first); the builder keeps its rows where they are."""
    lengths = [5, 40, 17, 40, 1 + 1, 33]  # context lengths after this step's token
    seqs = [sequence(n, n - 1, 3 * i) for i, n in enumerate(lengths)]
    b = builder()
    for batch_seqs in (seqs, seqs[:3]):  # a smaller batch after a larger one (the host buffers alternate)
        _, _, meta, _ = b.build(ScheduledBatch(batch_seqs, [1] * len(batch_seqs), 0, [True] * len(batch_seqs)))
        assert meta.decode.seq_order is None
        assert meta.decode.context_lens.tolist() == lengths[:len(batch_seqs)]


def test_mixed_steps_order_their_decodes_too():
    """A step with prefills and decodes orders its decode rows as well (one compiled decode variant for both)."""
    decodes = [sequence(n, n - 1, 3 * i) for i, n in enumerate([5, 40, 17])]
    prefill = sequence(30, 0, 20)
    _, _, meta, _ = builder().build(ScheduledBatch([prefill, *decodes], [30, 1, 1, 1], 1, [True] * 4))
    assert meta.decode.seq_order.tolist() == [1, 2, 0]
    assert meta.decode.seq_order.dtype == torch.int32


def decode_batch(seqs) -> ScheduledBatch:
    return ScheduledBatch(seqs, [1] * len(seqs), 0, [True] * len(seqs))


def with_device_record(b: StepInputBuilder, pad_sizes=()) -> StepInputBuilder:
    """`b` building decode steps as it does on a device: into a record of their own, through one copy (the record
    lives on the CPU here)."""
    b.records = [DecodeRecord(8, 4, torch.device("cpu")) for _ in range(2)]
    b.pad_sizes = list(pad_sizes)
    return b


@pytest.mark.parametrize("pad_sizes", [(), (1, 2, 4, 8)])
def test_a_device_record_holds_the_same_step_as_the_host_buffers(pad_sizes):
    lengths = [5, 40, 17]
    b, ref = with_device_record(builder(), pad_sizes), builder()
    for batch_seqs in ([sequence(n, n - 1, 3 * i) for i, n in enumerate(lengths)],
                       [sequence(n, n - 1, 3 * i + 1) for i, n in enumerate(lengths[:2])]):
        ids, positions, meta, pending = b.build(decode_batch(batch_seqs), ([1], [0]))
        want_ids, want_positions, want, _ = ref.build(decode_batch(batch_seqs))
        r = b.records[1 - b.turn]  # the slot this step took
        assert ids.data_ptr() == r.ids.data_ptr() and meta.decode.block_tables.data_ptr() == r.tables.data_ptr()
        assert ids.tolist() == want_ids.tolist() and positions.tolist() == want_positions.tolist()
        assert meta.slot_mapping.tolist() == want.slot_mapping.tolist()
        assert meta.decode.context_lens.tolist() == want.decode.context_lens.tolist()
        assert meta.decode.seq_order is None and want.decode.seq_order is None
        n = len(batch_seqs)
        assert torch.equal(meta.decode.block_tables[:, :3], want.decode.block_tables[:, :3])
        assert meta.logits_indices.tolist() == list(range(n))
        assert pending.tolist() == [[1], [0]] and pending.is_contiguous()


def test_padding_rows_store_nothing_and_attend_to_nothing():
    """A 3-row step the graphs run at batch 4: row 3 is padding whatever an earlier, larger step left there."""
    b = with_device_record(builder(), (1, 2, 4, 8))
    big = [sequence(n, n - 1, 3 * i) for i, n in enumerate([5, 40, 17, 33, 9])]
    b.build(decode_batch(big))
    b.build(decode_batch(big))  # both host and both device records (they alternate) now hold 5 real rows
    ids, positions, meta, pending = b.build(decode_batch(big[:3]))
    r = b.records[0]
    assert ids.data_ptr() == r.ids.data_ptr()
    assert r.slots[3].item() == -1 and r.context_lens[3].item() == 0
    assert r.ids[3].item() == 0 and r.positions[3].item() == 0
    assert pending is None


def test_one_copy_moves_the_used_rows_and_nothing_past_them():
    host, device = DecodeRecord(6, 3, torch.device("cpu")), DecodeRecord(6, 3, torch.device("cpu"))
    for name in ("ids", "positions", "slots", "pending", "context_lens", "tables"):
        view = getattr(host, name)
        view.copy_(torch.arange(view.numel()).view(view.shape) + 1)
    device.copy_from(host, 2)
    for name in ("ids", "positions", "slots", "pending", "context_lens"):
        assert torch.equal(getattr(device, name), getattr(host, name)), name  # every scalar array, all rows
    assert torch.equal(device.tables[:2], host.tables[:2])
    assert device.tables[2:].eq(0).all()


def test_random_batches_in_a_record_match_the_host_buffers_and_pad_to_the_graph_sizes():
    """300 decode steps of random sizes (growing and shrinking) and random pending rows: the record holds what the
    per-tensor path holds, and rows up to the graph size are padding (slot -1, context 0)."""
    import random
    from nanovllm.core.runner_setup import graph_sizes
    rng = random.Random(0)
    max_seqs, max_blocks, bs = 40, 6, 16
    b = StepInputBuilder(torch.device("cpu"), bs, max_seqs, max_blocks, pin=False)
    b.records = [DecodeRecord(max_seqs, max_blocks, torch.device("cpu")) for _ in range(2)]
    b.pad_sizes = graph_sizes(max_seqs)
    ref = StepInputBuilder(torch.device("cpu"), bs, max_seqs, max_blocks, pin=False)
    for _ in range(300):
        n = rng.randint(1, max_seqs)
        seqs = []
        for _ in range(n):
            length = rng.randint(2, max_blocks * bs - 1)
            seq = Sequence(list(range(length)), SamplingParams(temperature=0.0, max_tokens=4))
            seq.block_table, seq.num_computed_tokens = rng.sample(range(1000), -(-length // bs)), length - 1
            seqs.append(seq)
        dst = sorted(rng.sample(range(n), rng.randint(0, n)))
        src = [rng.randint(0, 50) for _ in dst]
        ids, positions, meta, pending = b.build(decode_batch(seqs), (dst, src))
        want_ids, want_positions, want, _ = ref.build(decode_batch(seqs))
        assert ids.tolist() == want_ids.tolist() and positions.tolist() == want_positions.tolist()
        assert meta.slot_mapping.tolist() == want.slot_mapping.tolist()
        assert meta.decode.seq_order is None and want.decode.seq_order is None
        assert (pending.tolist() if dst else pending) == ([dst, src] if dst else None)
        for i, seq in enumerate(seqs):
            assert meta.decode.block_tables[i, :len(seq.block_table)].tolist() == seq.block_table
        size, r = next(s for s in b.pad_sizes if s >= n), b.records[1 - b.turn]
        assert ids.data_ptr() == r.ids.data_ptr()
        assert (r.slots[n:size] == -1).all() and (r.context_lens[n:size] == 0).all()


class LoggingCopier(InOrderCopier):
    """The default copier, logging its calls and checking the contract's order: a slot's host record is released
    (`before_fill`) before the builder writes it, and each copy reads the host record of its own slot."""

    def __init__(self, builder):
        self.builder, self.calls = builder, []

    def before_fill(self, slot):
        self.calls.append(("fill", slot))

    def copy(self, dst, src, rows, slot):
        assert src is self.builder.host[slot] and dst is self.builder.records[slot]
        self.calls.append(("copy", slot, rows))
        super().copy(dst, src, rows, slot)


def test_decode_steps_alternate_two_device_records_through_the_copier():
    """Consecutive decode steps take slots 0, 1, 0, ... (host and device record alike), prefill steps take none,
    and each step's tensors are views of its slot's device record, the step before's record left as it was: a
    backend's copier may move step N+1 while step N still reads its own (record_copier.py)."""
    b = with_device_record(builder(), (1, 2, 4, 8))
    b.copier = LoggingCopier(b)
    first = [sequence(n, n - 1, 3 * i) for i, n in enumerate([5, 40, 17])]
    second = [sequence(n, n - 1, 3 * i + 1) for i, n in enumerate([9, 33])]
    ids0, _, meta0, _ = b.build(decode_batch(first))
    ids1, _, meta1, _ = b.build(decode_batch(second))
    b.build(ScheduledBatch([sequence(30, 0, 20)], [30], 1, [True]))  # a prefill step: no slot
    ids2, _, _, _ = b.build(decode_batch(second[:1]))
    assert b.copier.calls == [("fill", 0), ("copy", 0, 3), ("fill", 1), ("copy", 1, 2), ("fill", 0), ("copy", 0, 1)]
    assert ids0.data_ptr() == ids2.data_ptr() == b.records[0].ids.data_ptr() != ids1.data_ptr()
    assert ids1.data_ptr() == b.records[1].ids.data_ptr()
    assert meta1.decode.context_lens.tolist() == [9, 33]  # step 1's record untouched by step 2
    assert b.records[1].slots[:2].tolist() == meta1.slot_mapping.tolist() and b.records[1].slots[2].item() == -1

