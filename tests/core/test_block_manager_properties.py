"""Property tests of the block manager: random interleavings of allocate / compute / append / free / preempt over
sequences that share prefixes. A shadow KV store records which token each slot's K/V was computed from, so a
prefix hit is checked against what is really in the blocks, not against the manager's own bookkeeping."""
import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nanovllm.core import block_manager as bm_module
from nanovllm.core.block_manager import BlockManager
from nanovllm.core.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

NUM_BLOCKS, BLOCK_SIZE, MAX_LEN = 10, 4, 20
BASES = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3], [1, 2, 3, 4, 9, 9, 9, 9], [5] * 12]  # prefixes to share

prompts = st.builds(lambda base, cut, tail: base[:cut] + tail, st.sampled_from(BASES), st.integers(0, 12),
                    st.lists(st.integers(1, 9), max_size=6)).filter(lambda p: 0 < len(p) < MAX_LEN)


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
        self.kv: dict[int, list[int | None]] = {}  # block id -> the token each slot was computed from
        self.live: list[Sequence] = []
        self.preempted: list[Sequence] = []

    def compute(self, seq: Sequence, n: int) -> None:
        """What a step does: write the K/V of the next n tokens, then enter finished blocks in the prefix cache."""
        for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            block_id = seq.block_table[pos // BLOCK_SIZE]
            assert self.bm.blocks[block_id].ref_count == 1, f"writing into block {block_id}, shared with another"
            assert self.bm.blocks[block_id].hash is None, f"writing into cached block {block_id}"
            self.kv.setdefault(block_id, [None] * BLOCK_SIZE)[pos % BLOCK_SIZE] = seq.token_ids[pos]
        seq.num_computed_tokens += n
        self.bm.cache_computed_blocks(seq)

    def admit(self, seq: Sequence) -> None:
        if not self.bm.can_allocate(seq):
            return
        self.bm.allocate(seq)
        for pos in range(seq.num_cached_tokens):  # a hit is served only where the stored K/V are these tokens
            assert self.kv[seq.block_table[pos // BLOCK_SIZE]][pos % BLOCK_SIZE] == seq.token_ids[pos]
        assert seq.num_cached_tokens < len(seq), "at least one token is left to compute"
        self.live.append(seq)

    @rule(prompt=prompts)
    def allocate(self, prompt):
        self.admit(Sequence(prompt, SamplingParams()))

    @precondition(lambda self: self.preempted)
    @rule(data=st.data())
    def readmit_preempted(self, data):
        seq = data.draw(st.sampled_from(self.preempted))
        if self.bm.can_allocate(seq):
            self.preempted.remove(seq)
            self.admit(seq)

    @precondition(lambda self: any(s.num_uncomputed_tokens for s in self.live))
    @rule(data=st.data())
    def compute_chunk(self, data):
        seq = data.draw(st.sampled_from([s for s in self.live if s.num_uncomputed_tokens]))
        self.compute(seq, data.draw(st.integers(1, seq.num_uncomputed_tokens)))

    @precondition(lambda self: any(not s.num_uncomputed_tokens and len(s) < MAX_LEN for s in self.live))
    @rule(data=st.data(), token=st.integers(1, 9))
    def append_token(self, data, token):
        seq = data.draw(st.sampled_from([s for s in self.live if not s.num_uncomputed_tokens and len(s) < MAX_LEN]))
        if self.bm.can_append(seq):
            self.bm.append_slots(seq)
            seq.append_token(token)
            self.compute(seq, 1)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), preempt=st.booleans())
    def free(self, data, preempt):
        seq = data.draw(st.sampled_from(self.live))
        self.bm.free(seq)
        self.live.remove(seq)
        if preempt:  # back to waiting with its tokens, to be recomputed (and hit its own cached blocks)
            self.preempted.append(seq)

    @invariant()
    def ref_counts_match_live_sequences(self):
        self.bm.check_invariants(self.live)
        assert all(b.ref_count >= 0 for b in self.bm.blocks)

    @invariant()
    def shared_blocks_are_cached_prefix_blocks(self):
        owners: dict[int, list[tuple[Sequence, int]]] = {}
        for seq in self.live:
            assert len(set(seq.block_table)) == len(seq.block_table), "a block twice in one table"
            for i, block_id in enumerate(seq.block_table):
                owners.setdefault(block_id, []).append((seq, i))
        for block_id, users in owners.items():
            if len(users) > 1:
                block = self.bm.blocks[block_id]
                assert block.hash is not None, f"block {block_id} handed to two sequences outside the prefix cache"
                assert len({tuple(s.block_tokens(i, BLOCK_SIZE)) for s, i in users}) == 1

    @invariant()
    def no_block_leaks(self):
        used = {b for s in self.live for b in s.block_table}
        assert len(used) + self.bm.num_free_blocks == NUM_BLOCKS

    def teardown(self):
        for seq in self.live:
            self.bm.free(seq)
        assert self.bm.num_free_blocks == NUM_BLOCKS
        self.bm.check_invariants([])


class CollidingHashMachine(BlockManagerMachine):
    """The same, with a hash that collides all the time: stored token ids must still keep wrong K/V out."""

    def __init__(self):
        self._real_hash = bm_module.compute_block_hash
        bm_module.compute_block_hash = lambda tokens, prefix: (sum(tokens) + (prefix or 0)) % 3
        super().__init__()

    def teardown(self):
        bm_module.compute_block_hash = self._real_hash
        super().teardown()


SETTINGS = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = SETTINGS
TestBlockManagerWithCollidingHashes = CollidingHashMachine.TestCase
TestBlockManagerWithCollidingHashes.settings = SETTINGS
