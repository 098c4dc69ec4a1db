"""Pinned host blocks reserved at start-up, so that no step allocates page-locked memory.

A step stages its host arrays in pinned memory (`step_inputs`: ids, positions, slots, block tables, sampled rows;
`sampling.step_sampler`: temperatures, the sampled tokens' way back). torch's caching host allocator hands out
blocks of power-of-two sizes and reuses a freed block only for its own size class. So a step with more
sequences or tokens than any before (the seed benchmark's seventh prefill step is the first to sample more than 32
rows: 33 x 8 bytes of row indices need the 512-byte class) allocates a new block, and a page-locked allocation
may synchronise the device: the host then waits for the step in flight and the engine's pipeline drains. Here
every size class a step's arrays can need is allocated a few times over and freed at once, which leaves the
blocks in the allocator's free lists for the steps to take.
"""
import torch

from nanovllm.core.logging import get_logger

logger = get_logger(__name__)

# A block goes back to its free list once the copy that read it has ended, which is after the step in flight: so
# a class needs the arrays of two steps. A mixed step stages up to ~8 per-sequence arrays (cumulative lengths,
# context lengths, order, row indices, temperatures, the pending-token index, ...), often of one small class; only
# its three per-token arrays (ids, positions, slots) and block tables reach the large classes.
COPIES_SMALL = 16
COPIES_LARGE = 6
SMALL_LIMIT = 64 << 10
LARGEST = 1 << 20  # larger classes (long block tables of many sequences) are rare enough to allocate when met


def largest_staged_array(max_tokens: int, max_seqs: int, max_blocks_per_seq: int) -> int:
    """The largest host array a step stages, in bytes: a per-token int64 array (ids, positions, slots, and the
    sampled plus prompt-logprob row indices), or an int32 block table of every sequence at the longest context."""
    return max(8 * (max_tokens + max_seqs), 4 * max_seqs * max_blocks_per_seq)


def reservation(largest: int) -> list[tuple[int, int]]:
    """[(size class in bytes, copies)] to reserve for arrays up to `largest` bytes: every power of two from 1 to
    the class that holds `largest`, capped at LARGEST."""
    top = min(LARGEST, 1 << max(0, largest - 1).bit_length())
    return [(1 << k, COPIES_SMALL if 1 << k <= SMALL_LIMIT else COPIES_LARGE) for k in range(top.bit_length())]


def reserve_pinned_blocks(largest: int) -> int:
    """Allocate and free the pinned blocks of `reservation(largest)`; returns the bytes reserved."""
    plan = reservation(largest)
    blocks = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for size, copies in plan for _ in range(copies)]
    total = sum(b.numel() for b in blocks)
    del blocks  # unused by any stream: straight back to the free lists, where the steps find them
    logger.debug("reserved %d pinned host blocks, %.1f MiB, size classes up to %d bytes",
                 sum(c for _, c in plan), total / 2**20, plan[-1][0])
    return total
