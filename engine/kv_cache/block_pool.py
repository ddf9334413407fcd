"""The pool of fixed-size KV blocks: reference counts, the free queue and the prefix-cache index.

Invariants (checked by `BlockPool.check_invariants`):
- A block's ref_count is the number of live requests whose block table holds it.
- A block is in the free queue exactly when its ref_count is 0, and at most once.
- The free queue is ordered by eviction priority: first the free blocks that hold no cached
  content (uncached), then the free cached blocks from least to most recently freed (LRU).
  Allocation pops from the front, so cached content is evicted only when no uncached free
  block is left, and then the one unused the longest goes first.
- `block.block_hash is not None` exactly when `cached_blocks[block.block_hash] is block`:
  the index maps each cached hash to one block, and every block names its own key. Only full
  blocks are ever cached; a cached block may be held (ref > 0) or free.
- Evicting a cached block (allocating it) removes its hash from the index before reuse.

Block 0 is an ordinary block: no null/padding block is reserved. Padded block-table entries
(rows are padded with 0) are never read past a request's seq_len, so they need no block of
their own.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

from engine.kv_cache.events import KVEventLog


class KVBlock:
    """One block's bookkeeping; the K/V data itself lives in the model runner's cache tensor."""

    __slots__ = ("block_id", "ref_count", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: int | None = None  # set while the block is in the prefix-cache index
        # Links of the intrusive free queue; both None while the block is held.
        self.prev_free: KVBlock | None = None
        self.next_free: KVBlock | None = None

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_count}, hash={self.block_hash})"


class FreeBlockQueue:
    """Doubly linked list of free blocks threaded through the blocks themselves.

    Every operation is O(1), including removing a block from the middle (a prefix-cache hit
    on a free cached block), which a deque cannot do.
    """

    def __init__(self, blocks: Iterable[KVBlock] = ()) -> None:
        # Sentinels: the list is never empty of links, so no operation special-cases the ends.
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._length = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[KVBlock]:
        node = self._head.next_free
        while node is not self._tail:
            assert node is not None
            yield node
            node = node.next_free

    def append(self, block: KVBlock) -> None:
        """Put at the back: evicted last."""
        self._link(block, self._tail.prev_free, self._tail)

    def appendleft(self, block: KVBlock) -> None:
        """Put at the front: reused first."""
        self._link(block, self._head, self._head.next_free)

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        if block is self._tail or block is None:
            raise IndexError("no free KV block left")
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"{block} is not in the free queue")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self._length -= 1

    def _link(self, block: KVBlock, prev: KVBlock | None, nxt: KVBlock | None) -> None:
        if block.prev_free is not None or block.next_free is not None:
            raise ValueError(f"{block} is already in the free queue")
        assert prev is not None and nxt is not None
        block.prev_free, block.next_free = prev, nxt
        prev.next_free = block
        nxt.prev_free = block
        self._length += 1


class BlockPool:
    """All KV blocks of one cache, with ref counts, the free queue and the hash -> block index."""

    def __init__(self, num_blocks: int, events: KVEventLog | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached_blocks: dict[int, KVBlock] = {}
        # Every change to cached_blocks' keys, for the cluster's KV block index (None: untracked).
        self.events = events

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    # --- taking and returning blocks --------------------------------------------------
    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Take `num_blocks` blocks from the front of the free queue, each with ref 1.

        The caller checks `num_free_blocks` first; asking for more is a bug, not a full cache.
        """
        if num_blocks > len(self.free_queue):
            raise ValueError(f"asked for {num_blocks} blocks, {len(self.free_queue)} are free")
        taken = []
        for _ in range(num_blocks):
            block = self.free_queue.popleft()
            if block.block_hash is not None:  # evict: its content is about to be overwritten
                del self.cached_blocks[block.block_hash]
                if self.events is not None:
                    self.events.evicted(block.block_hash)
                block.block_hash = None
            block.ref_count = 1
            taken.append(block)
        return taken

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take one more ref on blocks that may be free (prefix-cache hits): a free one leaves the queue."""
        for block in blocks:
            if block.ref_count == 0:
                self.free_queue.remove(block)
            block.ref_count += 1

    def release(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one ref on each block, in the given order; a block reaching 0 becomes free.

        Uncached blocks go to the front (nothing worth keeping), cached ones to the back, so
        among cached blocks those released earlier are evicted earlier.
        """
        for block in blocks:
            if block.ref_count <= 0:
                raise ValueError(f"{block} released more often than it was taken")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is None:
                    self.free_queue.appendleft(block)
                else:
                    self.free_queue.append(block)

    # --- prefix-cache index -------------------------------------------------------------
    def lookup(self, block_hash: int) -> KVBlock | None:
        return self.cached_blocks.get(block_hash)

    def cache_block(self, block: KVBlock, block_hash: int) -> bool:
        """Register a held, full block under its hash. Returns whether `block` is now the cached one.

        When another block already holds the same content (two requests computed the same
        prefix before either was cached), that block stays the cached one and `block` stays
        uncached: the index maps a hash to one block.
        """
        if block.ref_count == 0:
            raise ValueError(f"{block} is free; only held blocks are cached")
        if block.block_hash is not None:
            if block.block_hash != block_hash:
                raise ValueError(f"{block} is already cached under another hash")
            return True
        if block_hash in self.cached_blocks:
            return False
        block.block_hash = block_hash
        self.cached_blocks[block_hash] = block
        if self.events is not None:
            self.events.stored(block_hash)
        return True

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Refused (False) while any block is held."""
        if self.num_free_blocks != self.num_blocks:
            return False
        if self.events is not None:
            for block_hash in self.cached_blocks:
                self.events.evicted(block_hash)
        for block in self.blocks:
            block.block_hash = None
        self.cached_blocks.clear()
        # Every block is now uncached; rebuild in id order so the pool looks freshly made.
        self.free_queue = FreeBlockQueue()
        for block in self.blocks:
            block.prev_free = block.next_free = None
            self.free_queue.append(block)
        return True

    # --- self check -----------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError if the queue, ref counts or index disagree (O(num_blocks))."""
        seen: set[int] = set()
        seen_cached = False
        for block in self.free_queue:
            _check(block.block_id not in seen, f"{block} is in the free queue twice")
            seen.add(block.block_id)
            _check(block.ref_count == 0, f"{block} is in the free queue but held")
            if block.block_hash is not None:
                seen_cached = True
            else:
                _check(not seen_cached, f"uncached {block} sits behind a cached block")
        _check(len(seen) == len(self.free_queue), "free queue length disagrees with its links")
        for block in self.blocks:
            if block.block_id not in seen:
                _check(block.ref_count > 0, f"{block} is neither free nor held")
                _check(block.prev_free is None and block.next_free is None, f"held {block} is linked")
            if block.block_hash is not None:
                _check(self.cached_blocks.get(block.block_hash) is block, f"{block} not indexed")
        for block_hash, block in self.cached_blocks.items():
            _check(block.block_hash == block_hash, f"index entry {block_hash} points to {block}")


def _check(condition: bool, message: str) -> None:
    # An explicit raise rather than `assert`: the check must also run under `python -O`.
    if not condition:
        raise AssertionError(message)
