"""Prompt log-probabilities: for each prompt token, its log-probability given the tokens before it.

What the OpenAI completions API returns for `echo=True` with `logprobs` (lm-eval's log-likelihood tasks read it).
The prompt runs through one prefill of its own that writes nothing to the KV cache (every slot -1) and asks for
the logits of every position, so prefix-cache hits and chunked prefill cannot hide positions. Like sampled
logprobs (core/logprobs.py) they are the log_softmax of the raw logits. Under tensor parallelism the workers
run the same prefill (it travels to them like any step).
"""
import torch

from nanovllm.core.logprobs import StepLogprobs
from nanovllm.core.step_metadata import PrefillMetadata, StepMetadata
from nanovllm.core.parallel.step_transport import pack_step, step_to_device

ROWS_PER_CHUNK = 512  # log_softmax over the vocabulary this many positions at a time, to bound float32 copies


@torch.inference_mode()
def compute_prompt_logprobs(runner, token_ids: list[int], num_top: int) -> list[StepLogprobs | None]:
    """One entry per prompt token: None for the first (nothing precedes it), else {top `num_top` token ids in
    descending order..., the prompt's token}: log-probability."""
    n = len(token_ids)
    if n < 2:
        return [None] * n
    cu = torch.tensor([0, n], dtype=torch.int32)
    meta = StepMetadata(slot_mapping=torch.full((n,), -1, dtype=torch.int64), num_prefill_tokens=n,
                        prefill=PrefillMetadata(cu, cu.clone(), n, n), decode=None,
                        logits_indices=torch.arange(n - 1, dtype=torch.int64))
    host = (torch.tensor(token_ids, dtype=torch.int64), torch.arange(n, dtype=torch.int64), meta)
    if runner.workers is not None:
        runner.workers.send_step(pack_step(host))
    input_ids, positions, meta = step_to_device(host, runner.device)
    if runner.workers is not None:
        runner.comm.broadcast(input_ids)
    logits = runner.execute(input_ids, positions, meta)  # [n - 1, V]: position i predicts token i + 1
    targets = input_ids[1:]
    out: list[StepLogprobs | None] = [None]
    k = min(num_top, logits.shape[-1])
    for start in range(0, n - 1, ROWS_PER_CHUNK):
        rows = logits[start:start + ROWS_PER_CHUNK].float().log_softmax(dim=-1)
        chosen = targets[start:start + ROWS_PER_CHUNK]
        chosen_logprobs = rows.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).tolist()
        top_logprobs, top_ids = rows.topk(k, dim=-1) if k else (rows[:, :0], rows[:, :0].long())
        for token_id, logprob, ids, values in zip(chosen.tolist(), chosen_logprobs, top_ids.tolist(),
                                                  top_logprobs.tolist()):
            entry = dict(zip(ids, values))
            entry.setdefault(token_id, logprob)
            out.append(entry)
    return out
