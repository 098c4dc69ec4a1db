"""Scheduler: continuous batching with prefill first, chunked prefill and preemption by recompute."""
from collections import deque
from dataclasses import dataclass

from nanovllm.core.block_manager import BlockManager
from nanovllm.core.config import EngineConfig
from nanovllm.core.logging import get_logger
from nanovllm.core.sequence import PENDING_TOKEN, Sequence, SequenceStatus
from nanovllm.core.sampling.structured import structured_stop

logger = get_logger(__name__)


@dataclass
class ScheduledBatch:
    """One step's work: `seqs[i]` computes its next `num_new_tokens[i]` tokens.

    The first `num_prefill_seqs` go through the prefill kernel, the rest are single-token decodes.
    `sample[i]` says whether the step completes seqs[i]'s tokens, so that a new token is sampled for it.
    """
    seqs: list[Sequence]
    num_new_tokens: list[int]
    num_prefill_seqs: int
    sample: list[bool]

    @property
    def is_prefill(self) -> bool:
        return self.num_prefill_seqs > 0

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, config: EngineConfig, num_blocks: int, block_size: int, eos_token_ids: set[int]):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.eos_token_ids = eos_token_ids
        self.block_manager = BlockManager(num_blocks, block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence, queue: bool = True) -> None:
        """Set up the sequence's stop tokens and queue it (`queue=False`: a sample queued later, see n)."""
        params = seq.params
        eos = frozenset() if params.ignore_eos else frozenset(self.eos_token_ids)
        seq.stop_token_ids = eos | frozenset(params.stop_token_ids)
        if queue:
            self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, in_flight: ScheduledBatch | None = None) -> ScheduledBatch | None:
        """The next step. With `in_flight` (a launched step whose tokens are not committed yet) only a step that
        reads none of its tokens' outcomes is scheduled, or None: commit first, then ask again.

        Behind a decode step: a decode step that needs no preemption, when no request waits and no prompt is
        half computed. Behind a prefill step: the next prefill (prompt chunks and new requests, none of which
        reads a token in flight), unless a new request's prefix would be served by a block the step in flight
        is still computing (it enters the prefix cache at commit), so pipelining never costs a prefix-cache hit;
        with no prefill work left, decode as above."""
        if in_flight is not None:
            if in_flight.is_prefill:
                batch = self._schedule_prefill(in_flight.seqs)
                if batch is None or batch.seqs:
                    return batch
            # a structured request's grammar must see its last token before its next mask is built
            if self.waiting and len(self.running) < self.max_num_seqs or any(
                    s.num_uncomputed_tokens > 1 or s.structured is not None for s in self.running):
                return None
            return self._schedule_decode(allow_preemption=False)
        batch = self._schedule_prefill()
        return batch if batch.seqs else self._schedule_decode()

    def _schedule_prefill(self, in_flight: list[Sequence] | None = None) -> ScheduledBatch | None:
        """Prompt chunks of running sequences, then waiting requests, up to the token budget. `in_flight`: the
        sequences of a step in flight; a request whose prefix would hit a block that step is computing waits for
        the commit (None is returned if it is the first in line)."""
        pending = None  # those blocks' keys, hashed only if a request waits
        budget = self.max_num_batched_tokens
        seqs, counts = [], []
        for seq in self.running:  # sequences whose prompt was only partly computed (chunked prefill)
            if budget and seq.num_uncomputed_tokens > 1:
                n = min(seq.num_uncomputed_tokens, budget)
                seqs.append(seq), counts.append(n)
                budget -= n
        while self.waiting and budget and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if in_flight is not None and pending is None:
                pending = self.block_manager.pending_keys(in_flight)
            if pending and self.block_manager.would_hit(seq, pending):
                if not seqs:
                    return None
                break
            if not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)  # all or nothing
            # running before leaving waiting: an interrupt in between leaves it in a queue abort_all empties
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.waiting.popleft()
            n = min(seq.num_uncomputed_tokens, budget)
            seqs.append(seq), counts.append(n)
            budget -= n
        sample = [s.num_computed_tokens + n == len(s) for s, n in zip(seqs, counts)]
        return ScheduledBatch(seqs, counts, len(seqs), sample)

    def _schedule_decode(self, allow_preemption: bool = True) -> ScheduledBatch | None:
        seqs = []
        running = [s for s in self.running if not self.length_reached(s)]
        while running:
            seq = running.pop(0)
            while not self.block_manager.can_append(seq):
                if not allow_preemption:
                    return None
                victim = running.pop() if running else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.append_slots(seq)
                seqs.append(seq)
        # longest context first (ties in running order): decode kernels that run a program per sequence in several
        # waves start the longest first, leaving the shortest for the tail, with no order array to read first
        seqs.sort(key=lambda s: -s.num_computed_tokens)
        return ScheduledBatch(seqs, [1] * len(seqs), 0, [True] * len(seqs))

    def _preempt(self, seq: Sequence) -> None:
        logger.debug("preempting sequence %d (%d tokens) to free KV blocks", seq.seq_id, len(seq))
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def length_reached(self, seq: Sequence) -> bool:
        """True when the sequence (counting tokens still in flight) has no room for another token."""
        return seq.num_output_tokens >= seq.params.max_tokens or len(seq) >= self.max_model_len

    def launch(self, batch: ScheduledBatch) -> list[int]:
        """Book the step as launched: its tokens are computed, and each sampled sequence gets a placeholder
        for its new token. Returns the placeholders' indices, which `commit` fills in."""
        indices = []
        for seq, n, sample in zip(batch.seqs, batch.num_new_tokens, batch.sample):
            seq.num_computed_tokens += n
            if sample:
                indices.append(len(seq.token_ids))
                seq.append_token(PENDING_TOKEN)
                seq.num_pending += 1
        return indices

    def commit(self, batch: ScheduledBatch, indices: list[int], token_ids: list[int],
               logprobs: list[dict | None] | None = None) -> list[Sequence]:
        """Fill in a launched step's sampled tokens (and logprobs, for requests that asked); returns the
        sequences that finished."""
        finished = []
        sampled = (seq for seq, sample in zip(batch.seqs, batch.sample) if sample)
        for i, (seq, index, token_id) in enumerate(zip(sampled, indices, token_ids)):
            if seq.is_finished:  # it finished at the previous step; this step's token is dropped
                continue
            seq.token_ids[index] = token_id
            seq.num_pending -= 1
            if logprobs is not None and logprobs[i] is not None:
                seq.logprobs.append(logprobs[i])
            reason = self.stop_reason(seq, token_id, index + 1)
            if reason is not None:
                del seq.token_ids[index + 1:]
                seq.num_pending = 0
                # its full blocks stay in the prefix cache after it is freed, even when it ends at its prefill
                # step (max_tokens=1: log-likelihood requests sharing a context)
                self.block_manager.cache_computed_blocks(seq)
                self.finish(seq, reason)
                finished.append(seq)
        for seq in batch.seqs:
            if not seq.is_finished and seq.block_table:
                self.block_manager.cache_computed_blocks(seq)
            if seq.deferred_samples and seq.num_computed_tokens >= seq.num_prompt_tokens:
                self._release_samples(seq)
        return finished

    def _release_samples(self, seq: Sequence) -> None:
        """Queue the other samples of seq's request (SamplingParams.n) now that its prompt's KV blocks are computed
        and in the prefix cache: first in line, so their full prompt blocks are cache hits (shared, ref-counted)
        and only the prompt's last partial block is computed again for each."""
        for sample in reversed(seq.deferred_samples):
            self.waiting.appendleft(sample)
        seq.deferred_samples = []

    def postprocess(self, batch: ScheduledBatch, token_ids: list[int | None],
                    logprobs: list[dict | None] | None = None) -> list[Sequence]:
        """Launch and commit at once (the synchronous step); returns the sequences that finished."""
        indices = self.launch(batch)
        sampled = [t for t, sample in zip(token_ids, batch.sample) if sample]
        if logprobs is not None:
            logprobs = [lp for lp, sample in zip(logprobs, batch.sample) if sample]
        return self.commit(batch, indices, sampled, logprobs)

    def stop_reason(self, seq: Sequence, token_id: int, length: int) -> str | None:
        """Why `seq` ends after `token_id`, its `length`-th token: "stop" (EOS, a stop token or a stop string),
        "length" (max_tokens or max_model_len), or None.

        A stop token cannot arrive before min_tokens output tokens (the StepSampler masks it, `core/sampling/step_sampler.py`);
        a stop string counts only once min_tokens tokens precede it. A stop token's text is left out of the
        detokenized text; stop strings are looked for only in requests that have them.
        """
        num_output = length - seq.num_prompt_tokens
        if token_id in seq.stop_token_ids:
            seq.stop_reason = token_id
            seq.stopped_by_eos = not seq.params.ignore_eos and token_id in self.eos_token_ids  # EOS is checked first
            if seq.detokenizer is not None and seq.params.include_stop_str_in_output:
                seq.detokenizer.add_token(token_id)  # its text stays in the output (none for a skipped special one)
            return "stop"
        if seq.structured is not None and structured_stop(seq, token_id):
            return "stop"
        if seq.detokenizer is not None:
            new_text = seq.detokenizer.add_token(token_id)
            if num_output > seq.params.min_tokens and seq.params.stop_strings:
                seq.stop_reason = seq.detokenizer.find_stop_string(len(new_text))
                if seq.stop_reason is not None:
                    return "stop"
        if num_output >= seq.params.max_tokens or length >= self.max_model_len:
            return "length"
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq.deferred_samples:  # finished at its first token: its cached prompt blocks still serve the others
            self._release_samples(seq)
        self.block_manager.free(seq)
        self.running.remove(seq)
        if seq.detokenizer is not None and reason != "abort":  # an aborted request's text is not read again
            seq.detokenizer.flush()

    def abort_all(self) -> int:
        """Abort every unfinished sequence and free every KV block (after a failed step); returns how many there
        were. It never raises and depends on no state the failure may have broken: the queues are emptied
        as they are and the block manager reclaims every block from scratch (see BlockManager.reclaim_all)."""
        seqs = list(self.waiting) + list(self.running)
        self.waiting.clear()
        self.running.clear()
        for seq in seqs + [sample for seq in seqs for sample in seq.deferred_samples]:
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
            seq.block_table, seq.num_pending, seq.deferred_samples = [], 0, []
        self.block_manager.reclaim_all()
        return len(seqs)

    def abort(self, seq: Sequence) -> None:
        """Drop an unfinished sequence (a stream the caller stopped reading), freeing its blocks."""
        for sample in seq.deferred_samples:  # samples not queued yet
            sample.status, sample.finish_reason = SequenceStatus.FINISHED, "abort"
        seq.deferred_samples = []
        if seq.is_finished:
            return
        if seq in self.running:
            self.finish(seq, "abort")
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
            self.block_manager.free(seq)  # admission interrupted between allocation and the move to running
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
