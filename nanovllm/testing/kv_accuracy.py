"""How much an FP8 KV cache changes a model's outputs: two engines over the same prompts, compared.

- `teacher_forced_logprobs`: next-token log-probabilities along a fixed continuation, every position's
  attention reading its whole context (prompt and continuation) back from the engine's KV cache, as decode
  does. The prompt is prefilled first; the continuation then runs as one chunk after that cached prefix.
- `compare_kv_caches`: a reference engine (model-dtype cache) and a candidate (FP8 cache): the mean and
  largest absolute difference of the log-probability of the reference's greedy continuation tokens, the
  teacher-forced top-1 agreement, and greedy agreement over `max_tokens` generated tokens.

Both engines must be idle (no request running); the teacher-forced pass borrows free KV blocks and returns
them. `benchmarks/kv_accuracy.py` prints these figures; tests assert bounds on them.
"""
from dataclasses import dataclass

import torch

from nanovllm.core.scheduler import ScheduledBatch
from nanovllm.core.sequence import Sequence
from nanovllm.sampling_params import SamplingParams


@torch.inference_mode()
def teacher_forced_logprobs(llm, prompt_ids: list[int], continuation_ids: list[int]) -> torch.Tensor:
    """[len(continuation_ids), vocab] float32 log-probabilities on the CPU: row i predicts the token after
    continuation_ids[i], with the prompt and continuation_ids[:i + 1] read from the KV cache."""
    runner = llm.engine.runner
    blocks = llm.engine.scheduler.block_manager
    seq = Sequence(list(prompt_ids) + list(continuation_ids), SamplingParams(max_tokens=1))
    needed = seq.num_blocks(runner.block_size)
    if needed > blocks.num_free_blocks:
        raise RuntimeError(f"teacher forcing needs {needed} free KV blocks, the engine has {blocks.num_free_blocks}")
    seq.block_table = [blocks._take_free_block() for _ in range(needed)]
    try:
        runner.execute(*runner.prepare(ScheduledBatch([seq], [len(prompt_ids)], 1, [False]))[:3])
        seq.num_computed_tokens = len(prompt_ids)
        input_ids, positions, meta, _ = runner.prepare(ScheduledBatch([seq], [len(continuation_ids)], 1, [True]))
        hidden = runner.model(input_ids, positions, meta)
        return runner.model.compute_logits(hidden).float().log_softmax(-1).cpu()
    finally:
        blocks.free(seq)


@dataclass
class KvAccuracy:
    positions: int  # teacher-forced positions compared
    mean_abs_logprob_diff: float  # of the next token's log-probability, averaged over positions
    max_abs_logprob_diff: float
    top1_agreement: float  # teacher-forced positions whose most likely next token is the same
    greedy_identical: float  # prompts whose max_tokens greedy tokens are all the same
    greedy_prefix: float  # mean fraction of greedy tokens before the first difference

    def __str__(self) -> str:
        return (f"next-token logprob |diff| mean {self.mean_abs_logprob_diff:.4f} max {self.max_abs_logprob_diff:.3f} "
                f"over {self.positions} positions, top-1 agreement {self.top1_agreement:.3f}; greedy: "
                f"{self.greedy_identical:.2f} of prompts identical, {self.greedy_prefix:.3f} of tokens before the "
                f"first difference")


def compare_kv_caches(reference, candidate, prompts: list[list[int]], max_tokens: int = 64) -> KvAccuracy:
    """Token-id prompts through both engines (see the module docstring)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ref_out = reference.generate(prompts, params, use_tqdm=False)
    cand_out = candidate.generate(prompts, params, use_tqdm=False)
    diffs, top1, prefixes, identical = [], [], [], 0
    for prompt, r, c in zip(prompts, ref_out, cand_out):
        continuation = r["token_ids"]
        ref_lp = teacher_forced_logprobs(reference, prompt, continuation)
        cand_lp = teacher_forced_logprobs(candidate, prompt, continuation)
        targets = torch.tensor(continuation[1:])
        rows = torch.arange(len(targets))
        diffs.append((ref_lp[rows, targets] - cand_lp[rows, targets]).abs())
        top1.append(ref_lp.argmax(-1) == cand_lp.argmax(-1))
        same = next((i for i, (a, b) in enumerate(zip(continuation, c["token_ids"])) if a != b), len(continuation))
        prefixes.append(same / len(continuation))
        identical += continuation == c["token_ids"]
    diffs, top1 = torch.cat(diffs), torch.cat(top1)
    return KvAccuracy(diffs.numel(), diffs.mean().item(), diffs.max().item(), top1.float().mean().item(),
                      identical / len(prompts), sum(prefixes) / len(prefixes))
