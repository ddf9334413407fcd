"""Leases on blocks held for a peer: if the peer stops renewing, its blocks are freed."""
from __future__ import annotations

import threading
import time
from typing import Callable


class LeaseTable:
    """lease_id -> deadline. `expire_stale(now)` drops every lease whose deadline passed and calls
    `on_expire(lease_id)` for each, which is where the decode worker frees the request's blocks.

    The clock is injected so tests can drive time; production uses time.monotonic. Invariant: a
    lease is either live in the table or has been reported expired exactly once (renewing an
    expired lease fails, so a peer that was presumed dead cannot resurrect freed blocks).
    """

    def __init__(
        self,
        on_expire: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_expire = on_expire
        self._clock = clock
        self._lock = threading.Lock()
        self._deadlines: dict[str, float] = {}
        self._ttls: dict[str, float] = {}

    def grant(self, lease_id: str, ttl_s: float) -> float:
        """Start (or restart) a lease; returns its deadline."""
        if ttl_s <= 0:
            raise ValueError(f"ttl must be positive, got {ttl_s}")
        with self._lock:
            self._ttls[lease_id] = ttl_s
            self._deadlines[lease_id] = self._clock() + ttl_s
            return self._deadlines[lease_id]

    def renew(self, lease_id: str, ttl_s: float | None = None) -> bool:
        """Push the deadline out by ttl (default: the granted ttl). False if the lease is gone."""
        with self._lock:
            if lease_id not in self._deadlines:
                return False
            if ttl_s is not None:
                self._ttls[lease_id] = ttl_s
            self._deadlines[lease_id] = self._clock() + self._ttls[lease_id]
            return True

    def release(self, lease_id: str) -> bool:
        """End a lease normally (transfer finished or request done); no expiry callback."""
        with self._lock:
            self._ttls.pop(lease_id, None)
            return self._deadlines.pop(lease_id, None) is not None

    def expire_stale(self, now: float | None = None) -> list[str]:
        """Remove leases whose deadline is at or before `now`, fire the callback, return their ids."""
        now = self._clock() if now is None else now
        with self._lock:
            expired = sorted((d, lid) for lid, d in self._deadlines.items() if d <= now)
            for _, lease_id in expired:
                del self._deadlines[lease_id]
                del self._ttls[lease_id]
        ids = [lease_id for _, lease_id in expired]
        # Callbacks run outside the lock: they free blocks and may call back into the table.
        for lease_id in ids:
            if self._on_expire is not None:
                self._on_expire(lease_id)
        return ids

    def is_live(self, lease_id: str) -> bool:
        with self._lock:
            return lease_id in self._deadlines

    def __len__(self) -> int:
        with self._lock:
            return len(self._deadlines)
