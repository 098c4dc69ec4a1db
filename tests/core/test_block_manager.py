import pytest

from nanovllm.core import block_manager as bm_module
from nanovllm.core.block_manager import BlockManager
from nanovllm.core.sequence import PENDING_TOKEN, Sequence
from nanovllm.sampling_params import SamplingParams


def seq(tokens):
    return Sequence(list(tokens), SamplingParams(max_tokens=4))


def compute_all(bm, s):
    s.num_computed_tokens = len(s)
    bm.cache_computed_blocks(s)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(8, 4)
    a = seq(range(10))
    assert bm.can_allocate(a)
    bm.allocate(a)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    bm.check_invariants([a])
    bm.free(a)
    assert bm.num_free_blocks == 8
    bm.check_invariants([])


def test_prefix_hit_shares_computed_blocks_only():
    bm = BlockManager(16, 4)
    a = seq(range(10))
    bm.allocate(a)
    b = seq(range(10))
    bm.allocate(b)
    assert b.num_cached_tokens == 0, "blocks whose K/V are not computed yet must not be served"
    compute_all(bm, a)
    c = seq(list(range(8)) + [99, 98, 97])
    bm.allocate(c)
    assert c.num_cached_tokens == 8 and c.block_table[:2] == a.block_table[:2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    bm.check_invariants([a, b, c])


def test_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(16, 4)
    a = seq(range(8))
    bm.allocate(a)
    compute_all(bm, a)
    bm.free(a)
    b = seq(range(8))
    bm.allocate(b)
    assert b.num_cached_tokens == 4, "the last block must be recomputed so the query is not empty"
    assert b.num_uncomputed_tokens == 4


def test_freed_cached_blocks_are_reused_until_evicted():
    bm = BlockManager(4, 4)
    a = seq(range(9))
    bm.allocate(a)
    compute_all(bm, a)
    bm.free(a)
    b = seq(range(9))
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.num_cached_tokens == 8
    bm.free(b)
    filler = seq(range(100, 116))  # takes all 4 blocks: evicts the cached ones
    bm.allocate(filler)
    bm.free(filler)
    c = seq(range(9))
    bm.allocate(c)
    assert c.num_cached_tokens == 0
    bm.check_invariants([c])


def test_hash_collision_never_serves_wrong_kv(monkeypatch):
    monkeypatch.setattr(bm_module, "compute_block_hash", lambda tokens, prefix: 42)
    bm = BlockManager(16, 4)
    a = seq(range(9))
    bm.allocate(a)
    compute_all(bm, a)
    b = seq([7, 7, 7, 7, 8, 8, 8, 8, 1])  # same (forced) hash, other tokens
    bm.allocate(b)
    assert b.num_cached_tokens == 0
    assert set(b.block_table).isdisjoint(a.block_table)
    bm.check_invariants([a, b])


def test_append_slots_grows_by_whole_blocks():
    bm = BlockManager(4, 4)
    a = seq(range(4))
    bm.allocate(a)
    a.num_computed_tokens = 4
    a.append_token(5)
    assert bm.can_append(a)
    bm.append_slots(a)
    assert len(a.block_table) == 2
    with pytest.raises(AssertionError):
        bm.allocate(a)


def test_block_keys_are_computed_once_and_never_over_pending_tokens(monkeypatch):
    """Admission asks for a sequence's keys up to three times: each is hashed once. A block holding a pending
    placeholder is hashed on demand but not kept, so its key after the token lands is the real one."""
    bm = BlockManager(16, 4)
    seq = Sequence(list(range(10)), SamplingParams())
    calls = []
    hash_block = bm_module.compute_block_hash
    monkeypatch.setattr(bm_module, "compute_block_hash", lambda t, p: calls.append(tuple(t)) or hash_block(t, p))
    chain = [hash_block(range(4), None)]
    chain.append(hash_block(range(4, 8), chain[0]))
    assert [bm.block_key(seq, 1), bm.block_key(seq, 0), bm.block_key(seq, 1)] == [chain[1], chain[0], chain[1]]
    assert len(calls) == 2
    seq.token_ids += [PENDING_TOKEN, PENDING_TOKEN]  # block 2 = tokens 8, 9 and two in flight
    seq.num_pending = 2
    bm.block_key(seq, 2)
    assert len(seq.block_keys) == 2
    seq.token_ids[10:], seq.num_pending = [10, 11], 0
    assert bm.block_key(seq, 2) == hash_block([8, 9, 10, 11], chain[1]) and len(seq.block_keys) == 3
