"""FreeBlockQueue against the OrderedDict of free block ids it replaced (same order, same membership, same
counts), over random operation sequences; its errors; and that BlockManager's invariant check reads it."""
import random
from collections import OrderedDict

import pytest

from nanovllm.core.block_manager import BlockManager
from nanovllm.core.free_block_queue import FreeBlockQueue


def test_blocks_are_reused_least_recently_freed_first():
    q = FreeBlockQueue(5)
    assert list(q) == [0, 1, 2, 3, 4] and len(q) == 5
    assert [q.popleft(), q.popleft(), q.popleft()] == [0, 1, 2]
    q.append(1)
    q.append(0)
    q.remove(4)
    assert list(q) == [3, 1, 0] and len(q) == 3
    assert 1 in q and 4 not in q and 2 not in q and -1 not in q and 5 not in q
    assert [q.popleft() for _ in range(3)] == [3, 1, 0]
    assert len(q) == 0 and list(q) == []


def test_an_explicit_order():
    q = FreeBlockQueue(6, [4, 2, 5])
    assert list(q) == [4, 2, 5] and len(q) == 3 and 0 not in q
    with pytest.raises(ValueError, match="listed twice"):
        FreeBlockQueue(3, [1, 1])


def test_misuse_is_an_error_that_changes_nothing():
    q = FreeBlockQueue(3)
    with pytest.raises(ValueError, match="free already"):
        q.append(1)
    with pytest.raises(ValueError, match="out of range"):
        q.append(3)
    q.popleft()
    with pytest.raises(ValueError, match="not free"):
        q.remove(0)
    assert list(q) == [1, 2] and len(q) == 2
    q.popleft(), q.popleft()
    with pytest.raises(RuntimeError, match="no free KV block"):
        q.popleft()
    assert len(q) == 0


@pytest.mark.parametrize("seed", range(5))
def test_random_operations_match_an_ordered_dict(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 200)
    q, model = FreeBlockQueue(n), OrderedDict.fromkeys(range(n))
    for _ in range(3000):
        used = [b for b in range(n) if b not in model]
        op = rng.choice(["pop", "append", "remove"])
        if op == "pop" and model:
            assert q.popleft() == model.popitem(last=False)[0]
        elif op == "append" and used:
            b = rng.choice(used)
            q.append(b)
            model[b] = None
        elif op == "remove" and model:
            b = rng.choice(list(model))
            q.remove(b)
            del model[b]
        assert len(q) == len(model)
    assert list(q) == list(model)
    assert all((b in q) == (b in model) for b in range(n))


def test_the_invariant_check_reads_the_queue():
    bm = BlockManager(8, 16)
    bm.check_invariants([])
    bm.free_block_ids._next[2] = 1  # a cycle 1 -> 2 -> 1: the walk repeats blocks and ends anyway
    with pytest.raises(RuntimeError, match="free-block queue lists"):
        bm.check_invariants([])
    bm.reclaim_all()  # rebuilds from what the walk finds, then every other block
    bm.check_invariants([])
    assert sorted(bm.free_block_ids) == list(range(8)) and bm.num_free_blocks == 8
