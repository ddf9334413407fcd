"""Per-router batches of new tokens, and the leases that notice a router is gone.

Each router long-polls a decode worker for the tokens of its own requests. Every step's outputs
are merged here per request (a router that polls less often than the engine steps gets several
steps' tokens in one delta) and handed to the polling router. A router that has not polled for
its lease is presumed dead (its process was killed): the worker aborts its requests, so a
router's death strands no KV blocks.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class StepDelta:
    """New tokens of one request from one or more engine steps."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finish_reason: str | None
    logprobs: tuple[dict[int, float], ...] | None
    num_cached_tokens: int
    # Set when the worker gave the request up for a cause another placement survives (the
    # prefill worker sending its KV stopped renewing the lease): the router places it again.
    lost: str | None = None

    def merged_with(self, later: "StepDelta") -> "StepDelta":
        logprobs = None if later.logprobs is None else (self.logprobs or ()) + later.logprobs
        return StepDelta(self.request_id, self.new_token_ids + later.new_token_ids, later.finish_reason,
                         logprobs, later.num_cached_tokens, later.lost or self.lost)


class _Box:
    def __init__(self, now: float) -> None:
        self.pending: dict[str, StepDelta] = {}
        self.ready = asyncio.Event()
        self.last_poll = now


class RouterOutboxes:
    """put() runs on the engine thread, everything else on the actor's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, lease_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._loop = loop
        self.lease_s = lease_s
        self._clock = clock
        self._lock = threading.Lock()
        self._boxes: dict[str, _Box] = {}
        self._router_of: dict[str, str] = {}  # request id -> router id

    def assign(self, request_id: str, router_id: str) -> None:
        with self._lock:
            self._router_of[request_id] = router_id
            if router_id not in self._boxes:
                self._boxes[router_id] = _Box(self._clock())

    def put(self, delta: StepDelta) -> None:
        """Engine thread: queue a request's new tokens for its router."""
        with self._lock:
            router_id = self._router_of.get(delta.request_id)
            box = self._boxes.get(router_id) if router_id is not None else None
            if box is None:
                return  # aborted, or its router is gone
            earlier = box.pending.get(delta.request_id)
            box.pending[delta.request_id] = delta if earlier is None else earlier.merged_with(delta)
            if delta.finish_reason is not None:
                del self._router_of[delta.request_id]
        self._loop.call_soon_threadsafe(box.ready.set)

    def forget(self, request_id: str) -> None:
        with self._lock:
            router_id = self._router_of.pop(request_id, None)
            box = self._boxes.get(router_id) if router_id is not None else None
            if box is not None:
                box.pending.pop(request_id, None)

    async def next_batch(self, router_id: str, timeout_s: float) -> list[StepDelta]:
        """Long-poll: every new delta of the router's requests, as one batch."""
        with self._lock:
            box = self._boxes.setdefault(router_id, _Box(self._clock()))
            box.last_poll = self._clock()
        try:
            await asyncio.wait_for(box.ready.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        with self._lock:
            batch, box.pending = list(box.pending.values()), {}
            box.ready.clear()
            box.last_poll = self._clock()
        return batch

    def expire_routers(self) -> dict[str, list[str]]:
        """Drop routers that stopped polling; returns their still-assigned request ids."""
        now = self._clock()
        with self._lock:
            dead = [rid for rid, box in self._boxes.items() if now - box.last_poll > self.lease_s]
            orphans: dict[str, list[str]] = {}
            for router_id in dead:
                del self._boxes[router_id]
                orphans[router_id] = [req for req, owner in self._router_of.items() if owner == router_id]
                for request_id in orphans[router_id]:
                    del self._router_of[request_id]
        return orphans

    def requests_of(self, router_id: str) -> list[str]:
        with self._lock:
            return [req for req, owner in self._router_of.items() if owner == router_id]
