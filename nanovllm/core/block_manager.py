"""BlockManager: paged KV blocks with reference counts and a prefix cache.

A full block is keyed by an xxhash of its token ids chained with the previous block's key. A block is
entered in the cache only once its K/V have been computed, and a hit is served only when the stored
token ids equal the request's, so a hash collision can never serve wrong K/V. Freed blocks keep their
key and stay reusable until their slot is handed out again (least recently freed first).
"""
import numpy as np
import xxhash

from nanovllm.core.free_block_queue import FreeBlockQueue
from nanovllm.core.sampling.prompt_logprobs import wants_prompt_logprobs
from nanovllm.core.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None


def compute_block_hash(token_ids, prefix_hash: int | None) -> int:
    h = xxhash.xxh64()
    if prefix_hash is not None:
        h.update(prefix_hash.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.block_size = block_size
        self.prefix_caching = prefix_caching  # False: no block is ever hashed, so no request ever hits
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block_id: dict[int, int] = {}
        self.free_block_ids = FreeBlockQueue(num_blocks)
        self.num_prefix_hit_tokens = 0
        self.num_prefix_query_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def _take_free_block(self) -> int:
        block_id = self.free_block_ids.popleft()
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]
        block.hash, block.token_ids, block.ref_count = None, None, 1
        return block_id

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Cached blocks matching the sequence's leading full blocks; at least one token is left to compute."""
        hits = []
        if not self.prefix_caching or wants_prompt_logprobs(seq):  # a cached prefix has no logits: recompute it
            return hits
        for i in range((len(seq) - 1) // self.block_size):
            block_id = self.hash_to_block_id.get(self.block_key(seq, i))
            if block_id is None or self.blocks[block_id].token_ids != tuple(seq.block_tokens(i, self.block_size)):
                break
            hits.append(block_id)
        return hits

    def block_key(self, seq: Sequence, i: int) -> int:
        """The prefix-cache key of the sequence's full block i: the hash of its tokens chained with block i - 1's
        key. A key over known tokens never changes, so it is computed once per sequence (admission asks for the
        same keys up to three times: would_hit, can_allocate, allocate); keys over pending tokens are not kept."""
        keys, bs = seq.block_keys, self.block_size
        known = len(seq.token_ids) - seq.num_pending
        while len(keys) <= i:
            j = len(keys)
            key = compute_block_hash(seq.block_tokens(j, bs), keys[j - 1] if j else None)
            if (j + 1) * bs > known:  # holds a pending token: computed on, not kept
                for k in range(j + 1, i + 1):
                    key = compute_block_hash(seq.block_tokens(k, bs), key)
                return key
            keys.append(key)
        return keys[i]

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._prefix_hits(seq)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return seq.num_blocks(self.block_size) - len(hits) + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks. All or nothing: if
        anything raises (Ctrl-C included) the blocks taken so far are returned before the exception propagates."""
        assert not seq.block_table, "sequence already holds blocks"
        hits = self._prefix_hits(seq)
        taken: list[int] = []
        try:
            for block_id in hits:
                block = self.blocks[block_id]
                if block.ref_count == 0:
                    self.free_block_ids.remove(block_id)
                block.ref_count += 1
                taken.append(block_id)
            for _ in range(seq.num_blocks(self.block_size) - len(hits)):
                taken.append(self._take_free_block())
        except BaseException:
            self._release(taken)
            raise
        seq.block_table = taken
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)
        self.num_prefix_hit_tokens += seq.num_cached_tokens
        self.num_prefix_query_tokens += len(seq)

    def _release(self, block_ids: list[int]) -> None:
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_block_ids.append(block_id)

    def free(self, seq: Sequence) -> None:
        table, seq.block_table = seq.block_table, []
        self._release(table)
        seq.num_computed_tokens = seq.num_hashed_blocks = 0

    def can_append(self, seq: Sequence, num_new_slots: int = 1) -> bool:
        needed = (seq.num_computed_tokens + num_new_slots + self.block_size - 1) // self.block_size
        return needed - len(seq.block_table) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_slots: int = 1) -> None:
        """Make sure the next `num_new_slots` tokens of a running sequence have KV slots."""
        needed = (seq.num_computed_tokens + num_new_slots + self.block_size - 1) // self.block_size
        while len(seq.block_table) < needed:
            seq.block_table.append(self._take_free_block())

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Enter the sequence's newly completed full blocks in the prefix cache (after their K/V were written)."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        known = min(seq.num_computed_tokens, len(seq.token_ids) - seq.num_pending)  # pending tokens are not known yet
        for i in range(seq.num_hashed_blocks, known // bs):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash, block.token_ids = self.block_key(seq, i), tuple(seq.block_tokens(i, bs))
                self.hash_to_block_id.setdefault(block.hash, block.block_id)
            seq.num_hashed_blocks = i + 1

    def pending_keys(self, seqs: list[Sequence]) -> set[int]:
        """Keys of the full blocks a launched, uncommitted step is computing for `seqs` (the blocks
        `cache_computed_blocks` will enter at its commit): its sequences' known tokens only."""
        bs, keys = self.block_size, set()
        if not self.prefix_caching:
            return keys
        for seq in seqs:
            if seq.is_finished or not seq.block_table:
                continue
            known = min(seq.num_computed_tokens, len(seq.token_ids) - seq.num_pending)
            keys.update(self.block_key(seq, i) for i in range(seq.num_hashed_blocks, known // bs))
        return keys

    def would_hit(self, seq: Sequence, keys: set[int]) -> bool:
        """Whether the waiting sequence's first block that misses the prefix cache has one of `keys`."""
        if wants_prompt_logprobs(seq):
            return False
        hits = self._prefix_hits(seq)
        i = len(hits)
        if i >= (len(seq) - 1) // self.block_size:
            return False
        return self.block_key(seq, i) in keys

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (vLLM's reset_prefix_cache), only while no block is in use: False, and nothing
        changed, while any request holds blocks (their hashes are what later requests would share)."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block_id in self.hash_to_block_id.values():
            self.blocks[block_id].hash = self.blocks[block_id].token_ids = None
        self.hash_to_block_id.clear()
        return True

    def reclaim_all(self) -> None:
        """Free every block, whatever the bookkeeping says (after a failed step, once every sequence is aborted, so
        no block can be in use). Recovery rebuilds from the blocks themselves and never trusts counts that the
        failure may have left half-updated. Prefix-cache entries stay where their block still holds their hash."""
        for block in self.blocks:
            block.ref_count = 0
        order = list(dict.fromkeys(self.free_block_ids))  # its bounded walk, repeats dropped
        listed = set(order)
        order += [b.block_id for b in self.blocks if b.block_id not in listed]  # in use before: reused last
        self.free_block_ids = FreeBlockQueue(self.num_blocks, order)
        self.hash_to_block_id = {h: b for h, b in self.hash_to_block_id.items() if self.blocks[b].hash == h}
        for block in self.blocks:
            if block.hash is not None and block.token_ids is None:  # hashed half-way: forget it
                block.hash = None

    def check_invariants(self, live: list[Sequence]) -> None:
        """Ref counts equal the live sequences' references; free blocks are exactly those with none."""
        refs = [0] * self.num_blocks
        for seq in live:
            for block_id in seq.block_table:
                refs[block_id] += 1
        for block in self.blocks:
            if block.ref_count != refs[block.block_id]:
                raise RuntimeError(f"block {block.block_id}: ref_count {block.ref_count}, referenced {refs[block.block_id]}")
            if (block.ref_count == 0) != (block.block_id in self.free_block_ids):
                raise RuntimeError(f"block {block.block_id}: ref_count {block.ref_count} but free={block.block_id in self.free_block_ids}")
        listed = list(self.free_block_ids)
        if len(listed) != len(set(listed)) or len(listed) != len(self.free_block_ids):
            raise RuntimeError(f"the free-block queue lists {len(listed)} blocks ({len(set(listed))} distinct) but "
                               f"counts {len(self.free_block_ids)}")
        for h, block_id in self.hash_to_block_id.items():
            if self.blocks[block_id].hash != h:
                raise RuntimeError(f"prefix cache entry {h:x} points at block {block_id} holding another hash")
