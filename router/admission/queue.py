"""A bounded priority queue of requests waiting for a decode worker.

Order: lower `priority` first, then arrival (FIFO). The head blocks the rest: a request that
needs more blocks than any worker has free waits, and nothing overtakes it, so a long prompt is
never starved by a stream of short ones. A cancelled request (client cancel, deadline) leaves the
queue at once, and its slot in the bound is free again.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from router.backend import QueueFullError


@dataclass(eq=False)
class QueuedRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: Any  # engine SamplingParams
    priority: int = 0
    enqueued_at: float = field(default_factory=time.monotonic)
    # Set by the dispatcher to the placement once a worker admitted the request.
    placed: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    order: int = 0  # arrival number, set by the queue
    queued: bool = False  # in the queue now (False once popped or removed)
    context: dict = field(default_factory=dict)  # the router's per-request routing data


class AdmissionQueue:
    def __init__(self, max_queued: int) -> None:
        if max_queued < 0:
            raise ValueError(f"max_queued_requests must be at least 0, got {max_queued}")
        self.max_queued = max_queued
        self._heap: list[tuple[int, int, QueuedRequest]] = []
        self._count = 0  # live entries (removed ones linger in the heap until they surface)
        self._arrivals = itertools.count()
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return self._count

    def put(self, entry: QueuedRequest) -> None:
        """Queue a request; QueueFullError (naming the limit) when the queue is full."""
        if self._count >= self.max_queued:
            raise QueueFullError(
                f"the admission queue is full: {self._count} requests are waiting for a decode "
                f"worker (--max-queued-requests {self.max_queued})")
        entry.order = next(self._arrivals)
        self._push(entry)

    def requeue(self, entry: QueuedRequest) -> None:
        """Put back a request the dispatcher took but no worker admitted: same place in line,
        and the bound does not apply (it was counted when it arrived)."""
        self._push(entry)

    def _push(self, entry: QueuedRequest) -> None:
        entry.queued = True
        heapq.heappush(self._heap, (entry.priority, entry.order, entry))
        self._count += 1
        self._changed.set()

    def remove(self, entry: QueuedRequest) -> bool:
        """Take a waiting request out (cancelled); False when it was not queued."""
        if not entry.queued:
            return False
        entry.queued = False
        self._count -= 1
        self._changed.set()
        return True

    def peek(self) -> QueuedRequest | None:
        while self._heap and not self._heap[0][2].queued:
            heapq.heappop(self._heap)
        return self._heap[0][2] if self._heap else None

    def pop(self) -> QueuedRequest:
        entry = self.peek()
        if entry is None:
            raise IndexError("the admission queue is empty")
        heapq.heappop(self._heap)
        entry.queued = False
        self._count -= 1
        return entry

    def entries(self) -> list[QueuedRequest]:
        return sorted((e for _, _, e in self._heap if e.queued), key=lambda e: (e.priority, e.order))

    async def wait_changed(self, timeout_s: float) -> None:
        """Until something is queued or removed, or timeout_s passes."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        self._changed.clear()
