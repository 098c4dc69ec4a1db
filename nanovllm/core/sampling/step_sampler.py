"""StepSampler: one step's logits -> sampled token ids, on their way to the host.

For the sequences that sample this step, in this order: the log-probabilities of the requests that ask
(from the raw logits, `core/sampling/logprobs.py`), penalties / logit bias / allowed tokens / bad words for the rows
that use them (`core/sampling/logits_processing.py`), min_tokens suppression (EOS and stop tokens cannot be sampled
before a request has min_tokens output tokens: the one place min_tokens is enforced), structured-output
masks (`core/sampling/structured.py`), the plan's `sampler` kernel over per-row SamplingTensors (reused while the
batch's sequences stay the same), and a host copy of the tokens started without waiting. `wait` collects it.

A step whose sampling is plain (`plain`: temperatures only, nothing reads or changes the logits first) may have
been sampled already inside the backend's captured decode graph; `launch_sampled` then only starts the host copy.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from nanovllm.core.kernel_output import Label, check_token_ids, check_token_range
from nanovllm.core.sampling.logits_processing import LogitsProcessor
from nanovllm.core.sampling.logprobs import RequestedLogprobs, StepLogprobs
from nanovllm.core.sampling.prompt_logprobs import PromptLogprobs
from nanovllm.core.sampling.structured import apply_structured_masks
from nanovllm.core.sampling.topk_candidates import top_k_bound
from nanovllm.core.sampler import SamplingTensors, suppress_tokens

if TYPE_CHECKING:
    from nanovllm.core.backend import Backend
    from nanovllm.core.scheduler import ScheduledBatch


@dataclass
class LaunchedStep:
    batch: ScheduledBatch
    tokens: torch.Tensor | None  # [num_sampled] on the device
    host: torch.Tensor | None  # its host copy, valid once `event` completes
    event: object | None
    rows: dict[int, int]  # seq_id -> row of `tokens`
    requested: RequestedLogprobs | None = None  # logprobs of the requests that asked, still on the device
    indices: list[int] = field(default_factory=list)  # placeholder positions, filled by the scheduler
    prompt: PromptLogprobs | None = None  # prompt logprobs of the step's prefill chunks that asked


def to_device(values, dtype: torch.dtype, device: torch.device, pin: bool) -> torch.Tensor:
    """A small host list on the device without a host sync (staged in pinned memory when `pin`)."""
    return torch.tensor(values, dtype=dtype, pin_memory=pin).to(device, non_blocking=True)


def suppress_stop_tokens(logits: torch.Tensor, seqs) -> None:
    """min_tokens: EOS and stop tokens cannot be sampled before a sequence has min_tokens output tokens
    (tokens still in flight count: they will exist)."""
    pairs = [(row, t) for row, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens
             for t in s.stop_token_ids]
    if pairs:
        rows, token_ids = zip(*pairs)
        suppress_tokens(logits, list(rows), list(token_ids))


def touches_logits(seq) -> bool:
    """Whether something reads or changes this sequence's logits before the sampler, whatever the step (min_tokens,
    which acts only while the output is short, is checked per step)."""
    p = seq.params
    return (p.logprobs is not None or p.needs_logits_processing or p.structured is not None
            or seq.structured is not None)


class StepSampler:
    def __init__(self, backend: Backend, device: torch.device, label: Label = str, vocab_size: int | None = None):
        """`label` names the sampler kernel in errors about its output; `vocab_size` bounds the token ids."""
        self.backend, self.device = backend, device
        self.label, self.vocab_size = label, vocab_size
        self._key, self._tensors = None, None
        self._plain = False  # the cached batch's sampling is plain but for min_tokens (see `plain`)
        self._min_tokens_seqs: list = []  # its sequences whose min_tokens may suppress stop tokens
        self.logits_processor = LogitsProcessor(device)
        # the noise seed of samplers that take one (SamplingTensors.seed): on the device, advanced by the sampler
        self.seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).to(device)

    def tensors(self, seqs) -> SamplingTensors:
        """The step's per-row sampling settings; reused while the batch's sequences stay the same."""
        key = tuple(s.seq_id for s in seqs)
        if key == self._key:
            return self._tensors
        params = [s.params for s in seqs]
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        min_p = [p.min_p for p in params]
        gens = [s.generator for s in seqs]

        def dev(values, dtype):
            return to_device(values, dtype, self.device, self.backend.pin_memory)
        self._key = key
        self._tensors = t = SamplingTensors(
            temperatures=dev([p.temperature for p in params], torch.float32),
            top_k=dev(top_k, torch.int64) if any(top_k) else None,
            top_p=dev(top_p, torch.float32) if any(x < 1 for x in top_p) else None,
            min_p=dev(min_p, torch.float32) if any(min_p) else None,
            generators=gens if any(g is not None for g in gens) else None,
            all_greedy=all(p.greedy for p in params), seed=self.seed,
            top_k_bound=top_k_bound(top_k, [p.temperature == 0 for p in params]))
        self._plain = (t.top_k is None and t.top_p is None and t.min_p is None and t.generators is None
                       and not any(touches_logits(s) for s in seqs))
        self._min_tokens_seqs = [s for s in seqs if s.params.min_tokens and s.stop_token_ids]
        return self._tensors

    def plain(self, batch: ScheduledBatch) -> SamplingTensors | None:
        """The step's SamplingTensors when its sampling is plain, else None. Plain: every sequence samples, with a
        temperature only (no top-k, top-p, min-p or seeded generator), and nothing reads or changes its logits
        first (no logprobs, penalties, logit bias, allowed or bad words, structured output, and no min_tokens
        suppression due this step). A plain step may be sampled inside a captured graph; host work only."""
        if not all(batch.sample):
            return None
        tensors = self.tensors(batch.seqs)
        if not self._plain or any(s.num_output_tokens < s.params.min_tokens for s in self._min_tokens_seqs):
            return None
        return tensors

    def reset(self) -> None:
        """Forget the cached tensors (after a failed step, or a warm-up's made-up sequences)."""
        self._key, self._tensors, self._plain, self._min_tokens_seqs = None, None, False, []
        self.logits_processor.reset()

    def launch(self, batch: ScheduledBatch, logits: torch.Tensor | None, sampler: Callable,
               prompt: PromptLogprobs | None = None) -> LaunchedStep:
        """Sample the batch's sampling sequences with the `sampler` kernel; return before the tokens reach the host.
        `prompt`: the step's prompt logprobs (core/sampling/prompt_logprobs.py), handed to the sequences by `wait`."""
        sampled_seqs = [s for s, want in zip(batch.seqs, batch.sample) if want]
        if not sampled_seqs:
            return LaunchedStep(batch, None, None, None, {}, prompt=prompt)
        requested = RequestedLogprobs.select(logits, sampled_seqs)  # raw logits: before any masking
        processed = self.logits_processor.apply(logits, sampled_seqs)  # penalties, bias, bad words: rows that ask
        suppress_stop_tokens(logits, sampled_seqs)
        apply_structured_masks(logits, sampled_seqs)
        tokens = check_token_ids(self.label, sampler(logits, self.tensors(sampled_seqs)), len(sampled_seqs))
        self.logits_processor.record(processed, tokens)
        return self._to_host(batch, sampled_seqs, tokens, requested, prompt)

    def launch_sampled(self, batch: ScheduledBatch, tokens: torch.Tensor) -> LaunchedStep:
        """A plain step (see `plain`) whose tokens ([num_seqs] on the device) a captured graph already sampled
        with the plan's `sampler` kernel: start their way to the host."""
        tokens = check_token_ids(self.label, tokens, len(batch.seqs))
        return self._to_host(batch, batch.seqs, tokens, None, None)

    def _to_host(self, batch: ScheduledBatch, sampled_seqs: list, tokens: torch.Tensor,
                 requested: RequestedLogprobs | None, prompt: PromptLogprobs | None) -> LaunchedStep:
        pin = self.backend.pin_memory
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=pin)
        host.copy_(tokens, non_blocking=pin)
        return LaunchedStep(batch, tokens, host, self.backend.record_event(self.device),
                            {seq.seq_id: row for row, seq in enumerate(sampled_seqs)}, requested, prompt=prompt)

    def wait(self, step: LaunchedStep) -> tuple[list[int], list[StepLogprobs | None] | None]:
        """The step's sampled tokens on the host, one per sampled sequence (the step's only device->host copy
        unless a request asked for logprobs), and the logprobs of those that asked. Prompt logprobs go straight
        to their sequences. Token ids outside the vocabulary are an error naming the sampler kernel."""
        if step.prompt is not None:
            step.prompt.to_seqs()
        if step.host is None:
            return [], None
        if step.event is not None:
            step.event.synchronize()
        token_ids = step.host.tolist()
        if self.vocab_size is not None:
            check_token_range(self.label, token_ids, self.vocab_size)
        logprobs = None if step.requested is None else step.requested.to_host(step.tokens)
        return token_ids, logprobs
