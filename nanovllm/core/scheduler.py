"""Scheduler: continuous batching with prefill first, chunked prefill and preemption by recompute."""
from collections import deque
from dataclasses import dataclass

from nanovllm.core.block_manager import BlockManager
from nanovllm.core.config import EngineConfig
from nanovllm.core.logging import get_logger
from nanovllm.core.sequence import Sequence, SequenceStatus

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
        self.block_manager = BlockManager(num_blocks, block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = self._schedule_prefill()
        return batch if batch.seqs else self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        seqs, counts = [], []
        for seq in self.running:  # sequences whose prompt was only partly computed (chunked prefill)
            if budget and seq.num_uncomputed_tokens > 1:
                n = min(seq.num_uncomputed_tokens, budget)
                seqs.append(seq), counts.append(n)
                budget -= n
        while self.waiting and budget and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            seqs.append(seq), counts.append(n)
            budget -= n
        sample = [s.num_computed_tokens + n == len(s) for s, n in zip(seqs, counts)]
        return ScheduledBatch(seqs, counts, len(seqs), sample)

    def _schedule_decode(self) -> ScheduledBatch:
        seqs = []
        running = list(self.running)
        while running:
            seq = running.pop(0)
            while not self.block_manager.can_append(seq):
                victim = running.pop() if running else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.append_slots(seq)
                seqs.append(seq)
        if not seqs and self.running:
            raise RuntimeError("the KV cache cannot hold a single running sequence; raise num_kvcache_blocks")
        return ScheduledBatch(seqs, [1] * len(seqs), 0, [True] * len(seqs))

    def _preempt(self, seq: Sequence) -> None:
        logger.debug("preempting sequence %d (%d tokens) to free KV blocks", seq.seq_id, len(seq))
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def postprocess(self, batch: ScheduledBatch, token_ids: list[int | None]) -> list[Sequence]:
        """Record the step's results; returns the sequences that finished."""
        finished = []
        for seq, n, token_id in zip(batch.seqs, batch.num_new_tokens, token_ids):
            seq.num_computed_tokens += n
            self.block_manager.cache_computed_blocks(seq)
            if token_id is None:
                continue
            seq.append_token(token_id)
            reason = self.stop_reason(seq, token_id)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def stop_reason(self, seq: Sequence, token_id: int) -> str | None:
        params = seq.params
        if seq.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return "stop"
            if token_id in params.stop_token_ids:
                return "stop"
        if seq.num_output_tokens >= params.max_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
        self.running.remove(seq)
