"""Block pool, free queue and block hashes: the pieces under the KV cache manager."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.kv_cache import BlockPool, FreeBlockQueue, KVBlock, hash_block_tokens, hash_request_blocks

REPO_ROOT = Path(__file__).resolve().parents[1]


def ids(blocks) -> list[int]:
    return [block.block_id for block in blocks]


# --- free queue ---------------------------------------------------------------------------
def test_free_queue_orders_and_removes_from_the_middle():
    blocks = [KVBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks[:3])
    queue.append(blocks[3])
    queue.appendleft(blocks[4])
    assert ids(queue) == [4, 0, 1, 2, 3]
    queue.remove(blocks[1])
    assert ids(queue) == [4, 0, 2, 3] and len(queue) == 4
    assert queue.popleft() is blocks[4]
    assert ids(queue) == [0, 2, 3]
    assert blocks[1].prev_free is None and blocks[1].next_free is None


def test_free_queue_refuses_double_insert_and_foreign_remove():
    block, other = KVBlock(0), KVBlock(1)
    queue = FreeBlockQueue([block])
    with pytest.raises(ValueError):
        queue.append(block)
    with pytest.raises(ValueError):
        queue.remove(other)
    queue.popleft()
    with pytest.raises(IndexError):
        queue.popleft()


# --- pool -----------------------------------------------------------------------------------
def test_allocate_and_release_keep_counts():
    pool = BlockPool(4)
    taken = pool.allocate(3)
    assert ids(taken) == [0, 1, 2]
    assert all(block.ref_count == 1 for block in taken)
    assert pool.num_free_blocks == 1
    pool.touch([taken[0]])
    pool.release([taken[0]])
    assert taken[0].ref_count == 1 and pool.num_free_blocks == 1
    pool.release(reversed(taken))
    assert pool.num_free_blocks == 4
    pool.check_invariants()
    with pytest.raises(ValueError):
        pool.release([taken[0]])
    with pytest.raises(ValueError):
        pool.allocate(5)


def test_uncached_blocks_are_reused_before_cached_ones_in_lru_order():
    pool = BlockPool(4)
    a, b, c, d = pool.allocate(4)
    pool.cache_block(a, 100)
    pool.cache_block(b, 200)
    # Released in this order: cached a, uncached c, cached b, uncached d.
    pool.release([a, c, b, d])
    pool.check_invariants()
    assert ids(pool.free_queue) == [3, 2, 0, 1]
    first_three = pool.allocate(3)
    assert ids(first_three) == [3, 2, 0]
    # a was evicted: its hash left the index; b is still cached.
    assert pool.lookup(100) is None and a.block_hash is None
    assert pool.lookup(200) is b
    pool.check_invariants()


def test_touch_revives_a_free_cached_block():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.cache_block(a, 7)
    pool.release([b, a])
    assert pool.num_free_blocks == 3
    pool.touch([pool.lookup(7)])
    assert a.ref_count == 1 and pool.num_free_blocks == 2
    # Allocating everything else never hands out the revived block.
    assert a not in pool.allocate(2)
    pool.check_invariants()


def test_cache_block_keeps_the_first_block_for_a_hash():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    assert pool.cache_block(a, 5)
    assert not pool.cache_block(b, 5)
    assert pool.lookup(5) is a and b.block_hash is None
    assert pool.cache_block(a, 5)  # idempotent
    with pytest.raises(ValueError):
        pool.cache_block(a, 6)
    pool.release([a, b])
    with pytest.raises(ValueError):
        pool.cache_block(a, 5)  # free blocks are not cached
    pool.check_invariants()


def test_reset_prefix_cache_only_when_idle():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache_block(a, 1)
    assert not pool.reset_prefix_cache()
    assert pool.lookup(1) is a
    pool.release([a, b])
    assert pool.reset_prefix_cache()
    assert pool.lookup(1) is None and not pool.cached_blocks
    assert ids(pool.free_queue) == [0, 1]
    pool.check_invariants()


def test_check_invariants_catches_a_corrupted_ref_count():
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    a.ref_count = 0
    with pytest.raises(AssertionError):
        pool.check_invariants()


# --- hashes -----------------------------------------------------------------------------------
def test_block_hash_depends_on_tokens_and_parent():
    root = hash_block_tokens(None, [1, 2, 3, 4])
    assert root == hash_block_tokens(None, (1, 2, 3, 4))
    assert 0 <= root < 2**64
    assert root != hash_block_tokens(None, [1, 2, 3, 5])
    assert hash_block_tokens(root, [5, 6]) != hash_block_tokens(None, [5, 6])
    assert hash_block_tokens(root, [5, 6]) != hash_block_tokens(root + 1, [5, 6])


def test_request_hashes_chain_and_skip_the_partial_block():
    tokens = list(range(10))
    hashes = hash_request_blocks(tokens, 4)
    assert len(hashes) == 2
    assert hashes[0] == hash_block_tokens(None, tokens[:4])
    assert hashes[1] == hash_block_tokens(hashes[0], tokens[4:8])


def test_block_hash_is_the_same_in_another_process():
    # Python's str/bytes hash is salted per process; ours must not be.
    script = "from engine.kv_cache import hash_block_tokens as h; print(h(h(None, [1, 2]), [3, 4]))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == hash_block_tokens(hash_block_tokens(None, [1, 2]), [3, 4])
