"""Property tests of the scheduler: random interleavings of adding requests (sharing prefixes), steps (synchronous
or pipelined one deep, as the engine runs them) and aborts, under a KV budget small enough to preempt. A fake model
whose next token is a function of the tokens so far, and a shadow KV store, check that every step reads K/V
computed from exactly its sequence's tokens, and that every finished request got the tokens an unconstrained run
gives."""
import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nanovllm.core.config import EngineConfig
from nanovllm.core.scheduler import Scheduler
from nanovllm.core.sequence import PENDING_TOKEN, Sequence
from nanovllm.sampling_params import SamplingParams

NUM_BLOCKS, BLOCK_SIZE, MAX_MODEL_LEN, EOS = 6, 4, 16, 0
BASES = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [3, 1, 4, 1, 7, 7, 7, 7], [2] * 10]

prompts = st.builds(lambda base, cut, tail: base[:cut] + tail, st.sampled_from(BASES), st.integers(0, 10),
                    st.lists(st.integers(1, 9), max_size=5)).filter(lambda p: 0 < len(p) < MAX_MODEL_LEN)


def next_token(tokens: list[int]) -> int:
    """The fake model: deterministic in the tokens so far, EOS now and then."""
    return (sum(t * (i + 1) for i, t in enumerate(tokens)) * 7 + len(tokens)) % 10


def expected_output(prompt: list[int], params: SamplingParams) -> list[int]:
    tokens = list(prompt)
    while True:
        tokens.append(next_token(tokens))
        n = len(tokens) - len(prompt)
        if (tokens[-1] == EOS and not params.ignore_eos) or n >= params.max_tokens or len(tokens) >= MAX_MODEL_LEN:
            return tokens[len(prompt):]


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        config = EngineConfig(model="unused", max_num_seqs=3, max_num_batched_tokens=8, max_model_len=MAX_MODEL_LEN)
        self.s = Scheduler(config, NUM_BLOCKS, BLOCK_SIZE, eos_token_ids={EOS})
        self.kv: dict[int, list[int | None]] = {}
        self.true_tokens: dict[int, list[int]] = {}  # seq_id -> its tokens, in-flight ones included
        self.in_flight = None  # (batch, indices, tokens) of a launched, uncommitted step
        self.seqs: list[Sequence] = []

    @rule(prompt=prompts, max_tokens=st.integers(1, 8), ignore_eos=st.booleans())
    def add(self, prompt, max_tokens, ignore_eos):
        seq = Sequence(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos))
        self.s.add(seq)
        self.seqs.append(seq)
        self.true_tokens[seq.seq_id] = list(prompt)

    def launch(self, batch):
        """The runner's work: check the K/V the step reads, write the new tokens' K/V, sample."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            true = self.true_tokens[seq.seq_id]
            for pos in range(seq.num_computed_tokens + n):
                block_id = seq.block_table[pos // BLOCK_SIZE]
                if pos >= seq.num_computed_tokens:
                    assert self.s.block_manager.blocks[block_id].ref_count == 1, "writing into a shared block"
                    self.kv.setdefault(block_id, [None] * BLOCK_SIZE)[pos % BLOCK_SIZE] = true[pos]
                assert self.kv[block_id][pos % BLOCK_SIZE] == true[pos], f"seq {seq.seq_id} reads wrong K/V at {pos}"
        tokens = []
        for seq, sample in zip(batch.seqs, batch.sample):
            if sample:
                true = self.true_tokens[seq.seq_id]
                tokens.append(next_token(true))
                true.append(tokens[-1])
        return batch, self.s.launch(batch), tokens

    def commit(self, launched) -> None:
        batch, indices, tokens = launched
        for seq in self.s.commit(batch, indices, tokens):
            if seq.finish_reason != "abort":
                assert seq.output_token_ids == expected_output(seq.token_ids[:seq.num_prompt_tokens], seq.params)

    @precondition(lambda self: self.s.has_unfinished())
    @rule(pipelined=st.booleans())
    def step(self, pipelined):
        batch = self.s.schedule(in_flight=None if self.in_flight is None else self.in_flight[0])
        if batch is None or (self.in_flight is not None and not batch.seqs):
            self.commit(self.in_flight)
            self.in_flight = None
            return
        assert batch.seqs, "nothing scheduled although requests wait and no step is in flight"
        launched = self.launch(batch)
        if self.in_flight is not None:
            self.commit(self.in_flight)
            self.in_flight = None
        if pipelined:
            self.in_flight = launched
        else:
            self.commit(launched)

    @precondition(lambda self: any(not s.is_finished for s in self.seqs))
    @rule(data=st.data())
    def abort(self, data):
        self.s.abort(data.draw(st.sampled_from([s for s in self.seqs if not s.is_finished])))

    @invariant()
    def blocks_are_accounted_for(self):
        self.s.block_manager.check_invariants(self.s.running)
        assert all(not s.block_table for s in self.s.waiting)
        assert all(s.is_finished and not s.block_table for s in self.seqs if s not in self.s.running
                   and s not in self.s.waiting)

    @invariant()
    def placeholders_only_in_flight(self):
        for seq in self.s.running:
            assert seq.token_ids.count(PENDING_TOKEN) == seq.num_pending <= (self.in_flight is not None)

    def teardown(self):
        while self.s.has_unfinished() or self.in_flight is not None:
            self.step(pipelined=True)
        assert all(s.is_finished for s in self.seqs)
        bm = self.s.block_manager
        assert bm.num_free_blocks == NUM_BLOCKS
        bm.check_invariants([])


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
