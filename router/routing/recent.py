"""Where this router just sent each prompt: the blocks a worker is about to cache.

The block index learns of a worker's new blocks only once the worker has computed them and
published the batch, a second or more after the routing decision. A second request with the same
long prefix arriving meanwhile would find no worker caching it, go wherever is least loaded, and
the prefix would end up computed (and cached) twice, halving what the pool's caches hold. So the
router also remembers, for a short while, which prompt blocks it sent where, and counts them as
cached there until the index can speak for itself: for a few seconds, or until the index shows
the worker holding them, whichever comes first. From then on only the index speaks, so a block the
worker evicts stops counting one publish interval later, as the index promises.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

WorkerKey = tuple[str, int]


class RecentRoutes:
    def __init__(self, ttl_s: float = 3.0, max_blocks_per_worker: int = 65536,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_blocks = max_blocks_per_worker
        self._clock = clock
        self._sent: dict[WorkerKey, OrderedDict[int, float]] = {}  # worker -> block hash -> when

    def record(self, worker: WorkerKey, hashes: Sequence[int]) -> None:
        sent = self._sent.setdefault(worker, OrderedDict())
        now = self._clock()
        for h in hashes:
            sent[h] = now
            sent.move_to_end(h)
        while len(sent) > self.max_blocks:
            sent.popitem(last=False)

    def longest_prefixes(self, hashes: Sequence[int], workers: Iterable[WorkerKey]) -> dict[WorkerKey, int]:
        horizon = self._clock() - self.ttl_s
        result = {}
        for worker in workers:
            sent = self._sent.get(worker)
            depth = 0
            if sent:
                while depth < len(hashes) and sent.get(hashes[depth], -1.0) >= horizon:
                    depth += 1
            result[worker] = depth
        return result

    def confirmed(self, worker: WorkerKey, hashes: Sequence[int]) -> None:
        """The index shows `worker` holding these blocks: it speaks for them from now on."""
        sent = self._sent.get(worker)
        if sent:
            for h in hashes:
                sent.pop(h, None)

    def forget(self, worker: WorkerKey) -> None:
        self._sent.pop(worker, None)
