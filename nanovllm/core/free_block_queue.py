"""FreeBlockQueue: the free KV blocks in the order they are reused (least recently freed first).

A doubly linked list over two per-block arrays (vLLM keeps its free blocks the same way): taking the first block,
appending a freed one and removing any one (a prefix-cache hit on a free block) are O(1), and no operation ever
touches more than a few entries. The OrderedDict of free ids it replaces did the same operations, but its hash
table filled with the deleted entries and was rebuilt now and then, all ~70,000 blocks of an H200's cache at
once: a 3-7 ms pause inside a step wherever it fell, 4-5 ms of idle GPU in a seed run's tail (RESULTS.md, round
twenty-eight).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator


class FreeBlockQueue:
    def __init__(self, num_blocks: int, block_ids: Iterable[int] | None = None):
        """The blocks `block_ids` (default: every block, in id order) free, in that order."""
        self.num_blocks = num_blocks
        self._end = num_blocks  # the sentinel: next[end] is the first block, prev[end] the last
        ids = list(range(num_blocks)) if block_ids is None else list(block_ids)
        self._next = [self._end] * (num_blocks + 1)
        self._prev = [self._end] * (num_blocks + 1)
        self._free = bytearray(num_blocks)
        chain = [self._end, *ids, self._end]
        for a, b in zip(chain, chain[1:]):
            self._next[a], self._prev[b] = b, a
        for b in ids:
            if self._free[b]:
                raise ValueError(f"block {b} is listed twice")
            self._free[b] = 1
        self._count = len(ids)

    def __len__(self) -> int:
        return self._count

    def __contains__(self, block_id: int) -> bool:
        return 0 <= block_id < self.num_blocks and bool(self._free[block_id])

    def __iter__(self) -> Iterator[int]:
        """The free blocks, first to be reused first. Walks at most num_blocks links, so it ends even where an
        interrupted update left the links inconsistent (BlockManager.reclaim_all rebuilds from it)."""
        block_id = self._next[self._end]
        for _ in range(self.num_blocks):
            if block_id == self._end:
                return
            yield block_id
            block_id = self._next[block_id]

    def popleft(self) -> int:
        """Take the least recently freed block."""
        block_id = self._next[self._end]
        if block_id == self._end:
            raise RuntimeError("no free KV block: the scheduler admitted more than the cache holds")
        self._unlink(block_id)
        return block_id

    def remove(self, block_id: int) -> None:
        """Take a free block out of the queue, wherever it is (it is about to be used again)."""
        if block_id not in self:
            raise ValueError(f"block {block_id} is not free")
        self._unlink(block_id)

    def append(self, block_id: int) -> None:
        """A block just freed: reused after every block freed before it."""
        if not 0 <= block_id < self.num_blocks or self._free[block_id]:
            raise ValueError(f"block {block_id} is free already or out of range")
        last = self._prev[self._end]
        self._next[last], self._prev[block_id] = block_id, last
        self._next[block_id], self._prev[self._end] = self._end, block_id
        self._free[block_id] = 1
        self._count += 1

    def _unlink(self, block_id: int) -> None:
        before, after = self._prev[block_id], self._next[block_id]
        self._next[before], self._prev[after] = after, before
        self._free[block_id] = 0
        self._count -= 1
