"""Prompt log-probabilities: for each prompt token, its log-probability given the tokens before it.

What the OpenAI completions API returns for `echo=True` with `logprobs` (lm-eval's log-likelihood tasks read it).
The prompts run through prefills of their own that write nothing to the KV cache (every slot -1) and ask for the
logits of every position, so prefix-cache hits and chunked prefill cannot hide positions. Several prompts share
one varlen prefill, up to `max_num_batched_tokens` tokens (a longer prompt runs alone). Like sampled logprobs
(core/logprobs.py) they are the log_softmax of the raw logits. Under tensor parallelism the workers run the same
prefills (they travel to them like any step).
"""
import torch

from nanovllm.core.logprobs import StepLogprobs
from nanovllm.core.parallel.step_transport import pack_step, step_to_device
from nanovllm.core.step_metadata import PrefillMetadata, StepMetadata

ROWS_PER_CHUNK = 512  # log_softmax over the vocabulary this many positions at a time, to bound float32 copies

PromptLogprobs = list[StepLogprobs | None]


def compute_prompt_logprobs(runner, prompts: list[list[int]], num_top: list[int]) -> list[PromptLogprobs]:
    """Per prompt, one entry per token: None for the first (nothing precedes it), else {top `num_top[i]` token ids
    in descending order..., the prompt's token}: log-probability."""
    out: list[PromptLogprobs | None] = [None] * len(prompts)
    budget = runner.config.max_num_batched_tokens
    group: list[int] = []
    for i in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):
        if group and sum(len(prompts[j]) for j in group) + len(prompts[i]) > budget:
            _run_group(runner, prompts, num_top, group, out)
            group = []
        group.append(i)
    if group:
        _run_group(runner, prompts, num_top, group, out)
    return out


@torch.inference_mode()
def _run_group(runner, prompts, num_top, group: list[int], out: list) -> None:
    seqs = [prompts[i] for i in group]
    lengths = [len(s) for s in seqs]
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    n = int(cu[-1])
    # position t of a prompt predicts its token t + 1: every position but each prompt's last
    rows = torch.cat([torch.arange(int(a), int(b) - 1) for a, b in zip(cu[:-1], cu[1:])]).long()
    meta = StepMetadata(slot_mapping=torch.full((n,), -1, dtype=torch.int64), num_prefill_tokens=n,
                        prefill=PrefillMetadata(cu, cu.clone(), max(lengths), max(lengths)), decode=None,
                        logits_indices=rows)
    positions = torch.cat([torch.arange(length) for length in lengths]).long()
    host = (torch.tensor([t for s in seqs for t in s], dtype=torch.int64), positions, meta)
    if runner.workers is not None:
        runner.workers.send_step(pack_step(host))
    input_ids, positions, meta = step_to_device(host, runner.device)
    if runner.workers is not None:
        runner.comm.broadcast(input_ids)
    logits = runner.execute(input_ids, positions, meta)  # [n - len(group), V]
    targets = input_ids[meta.logits_indices + 1]
    entries = _entries(logits, targets, max(num_top[i] for i in group))
    start = 0
    for i, length in zip(group, lengths):
        k = num_top[i]
        out[i] = [None] + [_entry(token_id, logprob, ids[:k], values[:k])
                           for token_id, logprob, ids, values in entries[start:start + length - 1]]
        start += length - 1


def _entries(logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[tuple[int, float, list, list]]:
    """Per row: (target id, its logprob, the top k ids, their logprobs in descending order)."""
    out = []
    k = min(k, logits.shape[-1])
    for start in range(0, logits.shape[0], ROWS_PER_CHUNK):
        rows = logits[start:start + ROWS_PER_CHUNK].float().log_softmax(dim=-1)
        chosen = targets[start:start + ROWS_PER_CHUNK]
        chosen_logprobs = rows.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).tolist()
        top_logprobs, top_ids = rows.topk(k, dim=-1) if k else (rows[:, :0], rows[:, :0].long())
        out += zip(chosen.tolist(), chosen_logprobs, top_ids.tolist(), top_logprobs.tolist())
    return out


def _entry(token_id: int, logprob: float, ids: list[int], values: list[float]) -> StepLogprobs:
    entry = dict(zip(ids, values))
    entry.setdefault(token_id, logprob)
    return entry
