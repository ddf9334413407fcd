"""Per-backend transfer counters: bytes, transfers, seconds, failures."""
from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class CountersSnapshot:
    backend: str
    bytes: int  # KV payload bytes moved (blocks only, no control messages)
    transfers: int  # requests that finished DONE
    chunks: int  # payload pushes (one per send_blocks call)
    seconds: float  # wall time spent moving payload
    failures: int  # requests that finished FAILED, or pushes that raised

    def as_load(self) -> dict:
        """The figures a worker publishes in its load report (cluster_state.load.LoadReport.kv_transfer)."""
        return {"bytes": self.bytes, "seconds": self.seconds, "transfers": self.transfers,
                "failures": self.failures}

    @property
    def gbps(self) -> float:
        """GB/s (1e9 bytes) over the time spent moving payload; 0 before any payload moved."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class TransferCounters:
    """Thread-safe accumulators; every sender and receiver owns one and exposes `snapshot()`."""

    def __init__(self, backend: str) -> None:
        self._backend = backend
        self._lock = threading.Lock()
        self._bytes = 0
        self._transfers = 0
        self._chunks = 0
        self._seconds = 0.0
        self._failures = 0

    def add_chunk(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self._bytes += nbytes
            self._chunks += 1
            self._seconds += seconds

    def add_transfer(self) -> None:
        with self._lock:
            self._transfers += 1

    def add_failure(self) -> None:
        with self._lock:
            self._failures += 1

    def snapshot(self) -> CountersSnapshot:
        with self._lock:
            return CountersSnapshot(
                self._backend, self._bytes, self._transfers, self._chunks, self._seconds, self._failures
            )
