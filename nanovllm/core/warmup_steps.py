"""Full-size warm-up steps: pay every first-use cost of a real prefill step at start-up, not in the first request.

The peak-memory warm-up (`runner_setup.measure_peak`) runs one large prefill before the KV cache exists, so it
stores nothing and samples nothing (its prompts, max_model_len long where a step holds one, compile the prefix-free
prefill for the longest prompt a step can hold); `runner_setup.warm_up_kernels` runs tiny steps. A real first step
is neither: on an H200 the seed benchmark's first 16,384-token prefill took 101-212 ms against 40-60 ms for the
later ones. What such a step meets for the first time: the KV store and the paged prefill at full size, the LM head
and the sampler at a batch of many rows, pinned host staging buffers and device activations of that size next to the
allocated cache, and any kernel variant (Triton specialisation, torch.compile graph, library kernel loaded on first
launch) those sizes select. Here two such steps run through the runner's own launch/wait path, on blocks of the
fresh cache that nothing references yet (no block manager or prefix cache is involved): a prefix-free prefill of
`max_num_batched_tokens` tokens over several sequences, then the same step with its first sequence continued after a
cached first block: the paged path a chunked prefill or a prefix-cache hit takes, with as many prefix-free sequences
beside it as a step of new prompts has (the cuda prefill may read those apart, in a launch of their own, whose
kernel is compiled then). `warm_up_longest_context` then runs one chunk at the end of the longest context
max_model_len allows: kernels may pick their tiles by a step's longest context (the cuda prefill does), and a long
prompt must not meet a first compilation.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nanovllm.core.logging import get_logger

if TYPE_CHECKING:
    from nanovllm.core.model_runner import ModelRunner

logger = get_logger(__name__)

TOKENS_PER_SEQ = 1024  # about a seed-benchmark prompt: a step holds many sequences, as real prefills do


def warm_up_lengths(max_tokens: int, max_model_len: int, max_num_seqs: int, block_size: int,
                    num_blocks: int) -> list[int]:
    """Prompt lengths of the warm-up batch: `max_tokens` tokens in sequences of up to TOKENS_PER_SEQ tokens (fewer
    when max_model_len or max_num_seqs say so), within the KV blocks there are; [] when not even two sequences of
    two blocks fit."""
    per_seq = min(TOKENS_PER_SEQ, max_model_len - 1)
    num_seqs = min(max_num_seqs, -(-max_tokens // per_seq))
    if num_seqs < 2 or per_seq <= block_size:
        return []
    total = min(max_tokens, num_seqs * per_seq)
    lengths = [total // num_seqs + (i < total % num_seqs) for i in range(num_seqs)]  # even: none left tiny
    lengths = [n for n in lengths if n > block_size]
    while lengths and sum(-(-n // block_size) for n in lengths) > num_blocks:
        lengths.pop()
    return lengths if len(lengths) >= 2 else []


@torch.inference_mode()
def warm_up_full_steps(runner: ModelRunner) -> list[int]:
    """Run a full-size prefix-free prefill and a full-size paged (chunked) prefill, each sampled, through
    `runner.launch` / `runner.wait`; returns the number of tokens of each step run ([] when the cache is too small)."""
    from nanovllm.core.scheduler import ScheduledBatch
    from nanovllm.core.sequence import Sequence
    from nanovllm.sampling_params import SamplingParams
    c, bs = runner.config, runner.block_size
    lengths = warm_up_lengths(c.max_num_batched_tokens, c.max_model_len, c.max_num_seqs, bs, runner.num_blocks)
    if not lengths:
        logger.info("full-size warm-up skipped: %d KV blocks of %d tokens are too few", runner.num_blocks, bs)
        return []
    seqs, next_block, vocab = [], 0, min(1000, runner.hf_config.vocab_size)
    for i, n in enumerate(lengths):
        # varied ids: a real prompt's, not one token repeated (kernels must not see a degenerate batch)
        seq = Sequence([(7 * i + 13 * t) % vocab for t in range(n)], SamplingParams(temperature=0.7, max_tokens=1))
        seq.block_table = list(range(next_block, next_block + -(-n // bs)))
        next_block += len(seq.block_table)
        seqs.append(seq)
    everyone = [True] * len(seqs)
    run = []
    for continued in (False, True):  # prefix-free, then the first sequence after one cached block: the paged prefill
        seqs[0].num_computed_tokens = bs if continued else 0
        batch = ScheduledBatch(seqs, [len(s) - s.num_computed_tokens for s in seqs], len(seqs), everyone)
        runner.wait(runner.launch(batch))
        run.append(batch.num_tokens)
    for s in seqs:
        s.block_table = []
    runner.sampling.reset()
    runner.backend.synchronize(runner.device)
    logger.info("warmed up full-size prefill steps of %s tokens (%d sequences)", run, len(seqs))
    return run


@torch.inference_mode()
def warm_up_longest_context(runner: ModelRunner) -> int:
    """Run, sampled, the last chunk of a sequence as long as max_model_len allows, through the paged prefill; returns
    the context length (0 when no context longer than TOKENS_PER_SEQ is allowed or the cache is too small).

    The chunk's own blocks are fresh; its cached prefix's table entries cycle through the chunk's whole blocks, which
    the chunk's K/V store writes before attention reads them, so every position it attends to holds computed K/V
    (not what the fresh cache memory holds) with no long prefill first."""
    from nanovllm.core.scheduler import ScheduledBatch
    from nanovllm.core.sequence import Sequence
    from nanovllm.sampling_params import SamplingParams
    c, bs = runner.config, runner.block_size
    longest = c.max_model_len - 1
    limit = min(TOKENS_PER_SEQ, c.max_num_batched_tokens)  # the chunk, as the scheduler would cut it
    cached = -(-(longest - limit) // bs) * bs  # whole blocks, so the chunk starts at a block's start
    chunk_blocks = (longest - cached) // bs  # the blocks the chunk fills whole
    fresh = list(range(-(-(longest - cached) // bs)))
    if longest <= TOKENS_PER_SEQ or chunk_blocks < 1 or len(fresh) > runner.num_blocks:
        return 0
    vocab = min(1000, runner.hf_config.vocab_size)
    seq = Sequence([(13 * t) % vocab for t in range(longest)], SamplingParams(temperature=0.7, max_tokens=1))
    seq.block_table = [fresh[i % chunk_blocks] for i in range(cached // bs)] + fresh
    seq.num_computed_tokens = cached
    runner.wait(runner.launch(ScheduledBatch([seq], [longest - cached], 1, [True])))
    seq.block_table = []
    runner.sampling.reset()
    runner.backend.synchronize(runner.device)
    logger.info("warmed up a %d-token chunk at the end of a %d-token context", longest - cached, longest)
    return longest
