"""Prompt log-probabilities (SamplingParams.prompt_logprobs = N), computed in the prefill that already runs.

The logits at prompt position p predict token p + 1, so a prefill chunk covering positions [start, end) yields
the log-probabilities of prompt tokens start + 1 .. min(end, num_prompt_tokens - 1): their rows are added to the
step's logits_indices after the sampled rows, and their log_softmax (raw logits, float32, as for `logprobs`) is
copied to the host with the step's tokens. Chunked prefill therefore fills the list chunk by chunk, and the
float32 copy is bounded by max_num_batched_tokens rows. This is what the OpenAI completions API returns for
`echo=True` with `logprobs` (the engine loop maps EngineRequest.prompt_logprobs onto the request's params).

A cached prefix has no logits, so a request asking for prompt logprobs takes no prefix-cache hits: its whole
prompt is recomputed (its blocks still enter the cache for others). Only the first sample of an n > 1 request
computes them (the others share its prompt). A prompt recomputed after preemption adds nothing twice.
"""
from dataclasses import dataclass

import torch

from nanovllm.core.sampling.logprobs import ranks_of, step_logprobs


def wants_prompt_logprobs(seq) -> bool:
    """Whether some of seq's prompt log-probabilities are still to be computed."""
    return (seq.params.prompt_logprobs is not None and seq.sample_index == 0
            and len(seq.prompt_logprobs) < seq.num_prompt_tokens)


def prompt_positions(seq, start: int, end: int) -> range:
    """The positions of the chunk [start, end) whose logits give prompt log-probabilities not yet recorded."""
    if not wants_prompt_logprobs(seq):
        return range(0)
    if not seq.prompt_logprobs:
        seq.prompt_logprobs.append(None)  # the first token has no context
    return range(max(start, len(seq.prompt_logprobs) - 1), min(end, seq.num_prompt_tokens - 1))


def split_prompt_logprobs(logits: torch.Tensor | None, meta, batch) -> tuple[torch.Tensor | None,
                                                                           "PromptLogprobs | None"]:
    """(the sampled rows' logits, the prompt logprobs of the rows after them) of one step's logits."""
    if logits is None or not meta.prompt_logprob_rows:
        return logits, None
    num_sampled = logits.shape[0] - sum(count for _, _, count in meta.prompt_logprob_rows)
    return logits[:num_sampled], PromptLogprobs.select(logits[num_sampled:], meta.prompt_logprob_rows, batch)


@dataclass
class PromptLogprobs:
    """One step's prompt log-probabilities, still on the device."""
    seqs: list  # per row group: the sequence
    counts: list[int]  # rows per sequence
    token_logprobs: torch.Tensor  # [rows] the prompt tokens' log-probabilities
    token_ranks: torch.Tensor  # [rows] their ranks (1: the most likely)
    top_logprobs: torch.Tensor  # [rows, k]
    top_ids: torch.Tensor  # [rows, k]

    @classmethod
    def select(cls, logits: torch.Tensor, rows: tuple, batch) -> "PromptLogprobs":
        """`logits`: [sum of counts, V], the rows `rows` ((batch index, first position, count), ...) asked for."""
        seqs = [batch.seqs[i] for i, _, _ in rows]
        targets = [t for (i, first, count) in rows for t in batch.seqs[i].token_ids[first + 1:first + 1 + count]]
        logprobs = logits.float().log_softmax(dim=-1)
        index = torch.tensor(targets, dtype=torch.int64).to(logits.device, non_blocking=True)
        token_logprobs = logprobs.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        k = min(max(s.params.prompt_logprobs for s in seqs), logprobs.shape[-1])
        top_logprobs, top_ids = logprobs.topk(k, dim=-1)
        return cls(seqs, [count for _, _, count in rows], token_logprobs, ranks_of(logprobs, token_logprobs),
                   top_logprobs, top_ids)

    def to_seqs(self) -> None:
        """Append each row's {token id: logprob} (the top N, then the prompt token) to its sequence."""
        values, ranks, top_values, top_ids = (t.tolist() for t in (self.token_logprobs, self.token_ranks,
                                                                  self.top_logprobs, self.top_ids))
        row = 0
        for seq, count in zip(self.seqs, self.counts):
            n = seq.params.prompt_logprobs
            for _ in range(count):
                token = seq.token_ids[len(seq.prompt_logprobs)]
                seq.prompt_logprobs.append(step_logprobs(top_ids[row][:n], top_values[row][:n], token, values[row],
                                                         ranks[row]))
                row += 1
