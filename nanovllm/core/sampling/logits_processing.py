"""Penalties, logit bias, allowed tokens and bad words: batched on the logits' device, before the sampler.

Only the rows of requests that use one of them are touched (`SamplingParams.needs_logits_processing`), and a
step where none does costs nothing here, so plain requests keep the sampler's fast path.

Each such request owns a slot (a row) of dense per-request state on the device, kept up to date by the device
itself, so it works while a step is in flight (async scheduling) and needs no per-token host work:
  counts      [S, V] int32    occurrences of each token in the output so far
  prompt      [S, V] bool     tokens of the prompt (repetition_penalty covers prompt and output)
  bias        [S, V] float32  logit_bias, plus -inf outside allowed_token_ids
  recent      [S, W] int64    the last W output tokens (bad words), -1 before the first
  bad_prefix  [S, M, W] int64 each bad word's tokens but the last, right-aligned, WILDCARD on the left
  bad_last    [S, M] int64    each bad word's last token, -1 for no word
After sampling, `record` adds the sampled tokens to `counts` and `recent` on the device.

Formulas (vLLM's, in this order; `backends/cpu_ref/logits_reference.py` is the plain per-token reference):
  1. logits += logit_bias; tokens outside allowed_token_ids -> -inf; a bad word's last token -> -inf when the
     output ends with the word's other tokens (a one-token word is always banned)
  2. repetition_penalty r, for tokens in the prompt or the output: logit / r when logit > 0, else logit * r
  3. logit -= frequency_penalty * count + presence_penalty * (count > 0), over the output's tokens
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

WILDCARD = -2  # a bad_prefix position that matches any token (words shorter than W)


@dataclass
class ProcessedRows:
    """What `apply` touched in one step, for `record` to update once the tokens are sampled."""
    rows: torch.Tensor  # [R] rows of the step's logits
    slots: torch.Tensor  # [R] state slots of those rows
    track_recent: bool


@dataclass
class _BatchPlan:
    rows: torch.Tensor
    slots: torch.Tensor
    repetition: torch.Tensor | None  # [R, 1] float32, None when no row penalises repetition
    frequency: torch.Tensor | None  # [R, 1]
    presence: torch.Tensor | None  # [R, 1]
    any_bias: bool
    any_bad_words: bool


class LogitsProcessor:
    def __init__(self, device: torch.device):
        self.device = device
        self.vocab_size = 0
        self.owners: list = []  # slot -> Sequence (or None when free)
        self.slot_of: dict[int, int] = {}  # seq_id -> slot
        self.counts = self.prompt = self.bias = None
        self.recent = self.bad_prefix = self.bad_last = None
        self._key, self._plan = None, None

    # ---- per step -------------------------------------------------------------------------------
    def apply(self, logits: torch.Tensor, seqs) -> ProcessedRows | None:
        """Process in place the rows of `logits` ([B, V], row i for seqs[i]) whose requests need it."""
        key = tuple(s.seq_id for s in seqs)
        if key != self._key:
            self._key, self._plan = key, self._make_plan(seqs, logits.shape[-1])
        plan = self._plan
        if plan is None:
            return None
        x = logits.index_select(0, plan.rows).float()
        if plan.any_bias:
            x += self.bias.index_select(0, plan.slots)
        if plan.any_bad_words:
            x.masked_fill_(self._banned(plan.slots, x.shape), float("-inf"))
        counts = self.counts.index_select(0, plan.slots)
        in_output = counts > 0
        if plan.repetition is not None:
            seen = in_output | self.prompt.index_select(0, plan.slots)
            x = torch.where(seen, torch.where(x > 0, x / plan.repetition, x * plan.repetition), x)
        if plan.frequency is not None:
            x -= plan.frequency * counts + plan.presence * in_output
        logits.index_copy_(0, plan.rows, x.to(logits.dtype))
        return ProcessedRows(plan.rows, plan.slots, self.recent is not None)

    def record(self, processed: ProcessedRows | None, tokens: torch.Tensor) -> None:
        """Count the tokens sampled for the processed rows (`tokens`: [B] on the device); no host sync."""
        if processed is None:
            return
        sampled = tokens.index_select(0, processed.rows)
        self.counts.index_put_((processed.slots, sampled), torch.ones_like(sampled, dtype=self.counts.dtype),
                               accumulate=True)
        if processed.track_recent:
            recent = self.recent.index_select(0, processed.slots)
            self.recent.index_copy_(0, processed.slots, torch.cat([recent[:, 1:], sampled.unsqueeze(-1)], dim=-1))

    def reset(self) -> None:
        """Forget the cached batch plan (after a failed step); slots of aborted sequences are reclaimed later."""
        self._key, self._plan = None, None

    def _banned(self, slots: torch.Tensor, shape) -> torch.Tensor:
        prefix = self.bad_prefix.index_select(0, slots)  # [R, M, W]
        last = self.bad_last.index_select(0, slots)  # [R, M]
        recent = self.recent.index_select(0, slots).unsqueeze(1)  # [R, 1, W]
        match = ((prefix == recent) | (prefix == WILDCARD)).all(dim=-1) & (last >= 0)
        hits = torch.zeros(shape, dtype=torch.int32, device=slots.device)
        return hits.scatter_add_(1, last.clamp_min(0), match.int()) > 0

    # ---- batch plans and slots ------------------------------------------------------------------
    def _make_plan(self, seqs, vocab_size: int) -> _BatchPlan | None:
        rows = [i for i, s in enumerate(seqs) if s.params.needs_logits_processing]
        if not rows:
            return None
        self.vocab_size = vocab_size
        chosen = [seqs[i] for i in rows]
        slots = [self._slot(s) for s in chosen]
        params = [s.params for s in chosen]

        def column(values):
            return torch.tensor(values, dtype=torch.float32).unsqueeze(-1).to(self.device)

        penalised = any(p.frequency_penalty or p.presence_penalty for p in params)
        return _BatchPlan(
            rows=torch.tensor(rows, dtype=torch.int64).to(self.device),
            slots=torch.tensor(slots, dtype=torch.int64).to(self.device),
            repetition=column([p.repetition_penalty for p in params]) if any(
                p.repetition_penalty != 1 for p in params) else None,
            frequency=column([p.frequency_penalty for p in params]) if penalised else None,
            presence=column([p.presence_penalty for p in params]) if penalised else None,
            any_bias=any(p.logit_bias or p.allowed_token_ids is not None for p in params),
            any_bad_words=any(s.bad_word_ids for s in chosen))

    def _slot(self, seq) -> int:
        slot = self.slot_of.get(seq.seq_id)
        if slot is not None:
            return slot
        for i, owner in enumerate(self.owners):  # reclaim the slots of finished sequences
            if owner is not None and owner.is_finished:
                del self.slot_of[owner.seq_id]
                self.owners[i] = None
        if None not in self.owners:
            self._grow(max(4, 2 * len(self.owners)))
        slot = self.owners.index(None)
        self.owners[slot], self.slot_of[seq.seq_id] = seq, slot
        self._fill_slot(slot, seq)
        return slot

    def _grow(self, num_slots: int) -> None:
        v, old = self.vocab_size, len(self.owners)
        self.counts = _resized(self.counts, (num_slots, v), torch.int32, 0, self.device)
        self.prompt = _resized(self.prompt, (num_slots, v), torch.bool, False, self.device)
        self.bias = _resized(self.bias, (num_slots, v), torch.float32, 0.0, self.device)
        if self.recent is not None:
            self._resize_bad_words(num_slots, *self.bad_prefix.shape[1:])
        self.owners += [None] * (num_slots - old)

    def _resize_bad_words(self, num_slots: int, num_words: int, width: int) -> None:
        """Widen the bad-word state; existing rows keep their words and their most recent tokens."""
        self.recent = _resized(self.recent, (num_slots, width), torch.int64, -1, self.device, right_align=True)
        self.bad_prefix = _resized(self.bad_prefix, (num_slots, num_words, width), torch.int64, WILDCARD,
                                   self.device, right_align=True)
        self.bad_last = _resized(self.bad_last, (num_slots, num_words), torch.int64, -1, self.device)

    def _fill_slot(self, slot: int, seq) -> None:
        params, v = seq.params, self.vocab_size
        output = [t for t in seq.output_token_ids if t >= 0]  # in-flight placeholders are not known yet
        counts = torch.zeros(v, dtype=torch.int32)
        counts.index_add_(0, torch.tensor(output, dtype=torch.int64), torch.ones(len(output), dtype=torch.int32))
        prompt = torch.zeros(v, dtype=torch.bool)
        prompt[torch.tensor(seq.token_ids[:seq.num_prompt_tokens], dtype=torch.int64)] = True
        bias = torch.zeros(v, dtype=torch.float32)
        if params.allowed_token_ids is not None:
            bias.fill_(float("-inf"))
            bias[torch.tensor(params.allowed_token_ids, dtype=torch.int64)] = 0.0
        for token, value in (params.logit_bias or {}).items():
            bias[token] += value
        self.counts[slot], self.prompt[slot], self.bias[slot] = (t.to(self.device) for t in (counts, prompt, bias))
        if seq.bad_word_ids or self.recent is not None:
            self._fill_bad_words(slot, seq.bad_word_ids or [], output)

    def _fill_bad_words(self, slot: int, words: list[list[int]], output: list[int]) -> None:
        width = max([len(w) - 1 for w in words] + [1])
        num_words = max(len(words), 1)
        if self.recent is None:
            self._resize_bad_words(len(self.owners), num_words, width)
        elif num_words > self.bad_prefix.shape[1] or width > self.bad_prefix.shape[2]:
            self._resize_bad_words(len(self.owners), max(num_words, self.bad_prefix.shape[1]),
                                   max(width, self.bad_prefix.shape[2]))
        width, num_words = self.bad_prefix.shape[2], self.bad_prefix.shape[1]
        prefix = torch.full((num_words, width), WILDCARD, dtype=torch.int64)
        last = torch.full((num_words,), -1, dtype=torch.int64)
        for i, word in enumerate(words):
            if len(word) > 1:
                prefix[i, width - len(word) + 1:] = torch.tensor(word[:-1])
            last[i] = word[-1]
        recent = torch.full((width,), -1, dtype=torch.int64)
        tail = output[-width:]
        if tail:
            recent[width - len(tail):] = torch.tensor(tail)
        self.bad_prefix[slot], self.bad_last[slot], self.recent[slot] = (
            t.to(self.device) for t in (prefix, last, recent))


def _resized(old: torch.Tensor | None, shape: tuple, dtype, fill, device, right_align: bool = False) -> torch.Tensor:
    """A tensor of `shape` filled with `fill`, holding `old` in its leading corner (its last dim right-aligned
    when asked, so the most recent tokens stay last)."""
    new = torch.full(shape, fill, dtype=dtype, device=device)
    if old is not None:
        index = tuple(slice(0, n) for n in old.shape[:-1])
        last = old.shape[-1]
        new[index + ((slice(shape[-1] - last, shape[-1]) if right_align else slice(0, last)),)] = old
    return new
