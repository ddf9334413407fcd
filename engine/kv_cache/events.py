"""The prefix cache's stored / evicted block hashes, for a publisher on another thread.

The block pool appends one entry per change on the engine thread; a publisher drains them, in
order, from its own thread (a deque's append and popleft are thread-safe) and sends the net
change of each batch: a block stored and evicted again within one batch is simply absent.
"""
from __future__ import annotations

from collections import deque


class KVEventLog:
    def __init__(self) -> None:
        self._changes: deque[tuple[int, bool]] = deque()  # (block hash, now cached?)

    def stored(self, block_hash: int) -> None:
        self._changes.append((block_hash, True))

    def evicted(self, block_hash: int) -> None:
        self._changes.append((block_hash, False))

    def drain(self) -> tuple[list[int], list[int]]:
        """(stored, evicted) since the last drain: the net change, the two lists disjoint."""
        final: dict[int, bool] = {}
        while True:
            try:
                block_hash, cached = self._changes.popleft()
            except IndexError:
                break
            final[block_hash] = cached
        stored = [h for h, cached in final.items() if cached]
        evicted = [h for h, cached in final.items() if not cached]
        return stored, evicted

    def clear(self) -> None:
        """Drop pending changes (a snapshot of the whole cache is taken at the same instant)."""
        self._changes.clear()

    def __len__(self) -> int:
        return len(self._changes)
