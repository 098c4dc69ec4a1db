"""Log-probabilities for the requests that ask for them (SamplingParams.logprobs = N).

They are the log_softmax of the raw logits, before temperature, top-k/top-p/min-p and min_tokens
suppression, as in vLLM (its default "raw_logprobs"): they describe the model, not the sampler, so a
greedy token's log-probability equals log_softmax of the model's logits.

Only the rows of requests that ask are read: a step where none asks does no work here and copies nothing
to the host beyond the sampled tokens.
"""
from dataclasses import dataclass

import torch


class Logprob(float):
    """A log-probability: a float, as nanovllm has always returned them, that also reads as vLLM's `Logprob`
    (`.logprob`, `.rank`, `.decoded_token`), so `logprobs[i][token_id].logprob` works in code written for vLLM.
    `rank` is 1 for the most likely token (as vLLM: one plus the tokens at least as likely, the token itself
    included); `decoded_token` is None (decode the id with the tokenizer)."""
    __slots__ = ("rank",)
    decoded_token = None

    def __new__(cls, value: float, rank: int | None = None):
        logprob = float.__new__(cls, value)
        logprob.rank = rank
        return logprob

    @property
    def logprob(self) -> float:
        return float(self)

    def __reduce__(self):
        return Logprob, (float(self), self.rank)


StepLogprobs = dict[int, Logprob]  # token id -> log-probability: the top N in descending order, then the sampled token


def ranks_of(logprobs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Each row's rank of its chosen log-probability, as vLLM counts it: the tokens at least as likely."""
    return (logprobs >= chosen.unsqueeze(-1)).sum(-1)


def step_logprobs(top_ids: list[int], top_values: list[float], token_id: int, logprob: float, rank: int
                  ) -> StepLogprobs:
    """{token id: Logprob}: the top entries (ranks 1, 2, ...) then `token_id` unless it is among them."""
    step = {t: Logprob(v, r) for r, (t, v) in enumerate(zip(top_ids, top_values), start=1)}
    step.setdefault(token_id, Logprob(logprob, rank))
    return step


@dataclass
class RequestedLogprobs:
    rows: list[int]  # rows of the step's logits whose requests asked
    num_logprobs: list[int]  # N per row
    logprobs: torch.Tensor  # [len(rows), V] float32 on the logits' device

    @classmethod
    def select(cls, logits: torch.Tensor, seqs) -> "RequestedLogprobs | None":
        """Log-softmax of the asking rows of `logits` ([B, V], one row per seq); call before any in-place masking."""
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if not rows:
            return None
        index = torch.tensor(rows, dtype=torch.int64).to(logits.device, non_blocking=True)
        values = logits.index_select(0, index).float().log_softmax(dim=-1)
        return cls(rows, [seqs[i].params.logprobs for i in rows], values)

    def to_host(self, sampled: torch.Tensor) -> list[StepLogprobs | None]:
        """One dict per row of the step (None for rows that did not ask), given the sampled ids [B]."""
        index = torch.tensor(self.rows, dtype=torch.int64).to(sampled.device, non_blocking=True)
        chosen = sampled.index_select(0, index)
        chosen_logprobs = self.logprobs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
        ranks = ranks_of(self.logprobs, chosen_logprobs)
        k = min(max(self.num_logprobs), self.logprobs.shape[-1])
        top_logprobs, top_ids = self.logprobs.topk(k, dim=-1)
        out: list[StepLogprobs | None] = [None] * sampled.shape[0]
        rows = zip(self.rows, self.num_logprobs, chosen.tolist(), chosen_logprobs.tolist(), ranks.tolist(),
                   top_ids.tolist(), top_logprobs.tolist())
        for row, n, token_id, logprob, rank, ids, values in rows:
            out[row] = step_logprobs(ids[:n], values[:n], token_id, logprob, rank)
        return out
