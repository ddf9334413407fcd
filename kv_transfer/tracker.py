"""Receiver-side state of each ticketed request: which (layer, block) pairs landed, and the state."""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from kv_transfer.errors import TransferError, TransferTimeout
from kv_transfer.ticket import TransferState, TransferTicket


@dataclass
class _Entry:
    """One ticketed request. Landed (layer, block) pairs are flags in a bytearray, not a set of
    tuples: a 256 MiB transfer lands thousands of pairs, and that many small objects would set
    off the cyclic garbage collector in the middle of transfers (tens of ms each time)."""

    ticket: TransferTicket
    num_layers: int
    peer: str | None = None  # the sender that pushed the first chunk
    state: TransferState = TransferState.PENDING
    reason: str = ""
    num_landed: int = 0
    position: dict[int, int] = field(init=False)  # block id -> its index in the ticket
    landed: bytearray = field(init=False)  # flag of (layer, position) at layer * n + position

    def __post_init__(self) -> None:
        self.position = {block: i for i, block in enumerate(self.ticket.block_ids)}
        self.landed = bytearray(self.num_layers * len(self.ticket.block_ids))

    @property
    def num_pairs(self) -> int:
        return len(self.landed)

    def mark(self, layers: Sequence[int], block_ids: Sequence[int]) -> None:
        n = len(self.ticket.block_ids)
        positions = [self.position[b] for b in block_ids]
        for layer in layers:
            base = layer * n
            for pos in positions:
                if not self.landed[base + pos]:
                    self.landed[base + pos] = 1
                    self.num_landed += 1


class RequestTracker:
    """Thread-safe table of ticketed requests. Connection threads record chunks and completion;
    worker threads poll or wait. Invariant: a request is DONE only if the sender said done and
    every (layer, block) of its ticket landed; a finished state never changes again.
    """

    def __init__(self, num_layers: int) -> None:
        self._num_layers = num_layers
        self._cond = threading.Condition()
        self._entries: dict[str, _Entry] = {}

    def add(self, ticket: TransferTicket) -> None:
        with self._cond:
            if ticket.request_id in self._entries:
                raise ValueError(f"request {ticket.request_id} already has a ticket")
            self._entries[ticket.request_id] = _Entry(ticket, self._num_layers)

    def ticket(self, request_id: str) -> TransferTicket | None:
        with self._cond:
            entry = self._entries.get(request_id)
            return entry.ticket if entry else None

    def check_chunk(self, request_id: str, block_ids: Sequence[int]) -> str | None:
        """None if a chunk for these blocks may land; else why not."""
        with self._cond:
            entry = self._entries.get(request_id)
            if entry is None:
                return f"no ticket for request {request_id}"
            if entry.state.finished:
                return f"request {request_id} already {entry.state.name}"
            stray = set(block_ids) - entry.position.keys()
            return f"blocks {sorted(stray)} are not in the ticket of {request_id}" if stray else None

    def record_chunk(self, request_id: str, peer: str, block_ids: Sequence[int], layer: int | None) -> None:
        layers = range(self._num_layers) if layer is None else (layer,)
        with self._cond:
            entry = self._entries.get(request_id)
            if entry is None or entry.state.finished:
                return
            entry.peer = entry.peer or peer
            entry.mark(layers, block_ids)
            entry.state = TransferState.IN_PROGRESS
            self._cond.notify_all()

    def finish(self, request_id: str, ok: bool, reason: str = "") -> TransferState | None:
        """Mark done (if complete) or failed; returns the final state, None if unknown/finished."""
        with self._cond:
            entry = self._entries.get(request_id)
            if entry is None or entry.state.finished:
                return None
            missing = entry.num_pairs - entry.num_landed
            if ok and missing:
                ok, reason = False, f"sender said done but {missing} (layer, block) pairs never landed"
            entry.state = TransferState.DONE if ok else TransferState.FAILED
            entry.reason = reason
            self._cond.notify_all()
            return entry.state

    def fail_peer(self, peer: str, reason: str) -> list[str]:
        """Fail every unfinished request that `peer` had started; returns their ids."""
        with self._cond:
            ids = [rid for rid, e in self._entries.items() if e.peer == peer and not e.state.finished]
        for rid in ids:
            self.finish(rid, ok=False, reason=reason)
        return ids

    def poll(self, request_id: str) -> TransferState:
        with self._cond:
            entry = self._entries.get(request_id)
            if entry is None:
                raise KeyError(f"no ticket for request {request_id}")
            return entry.state

    def wait(self, request_id: str, timeout_s: float) -> TransferState:
        """Block until finished; DONE is returned, FAILED raises TransferError, a stall TransferTimeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                entry = self._entries.get(request_id)
                if entry is None:
                    raise KeyError(f"no ticket for request {request_id}")
                if entry.state is TransferState.DONE:
                    return entry.state
                if entry.state is TransferState.FAILED:
                    raise TransferError(f"transfer of {request_id} failed: {entry.reason}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransferTimeout(
                        f"transfer of {request_id} not done after {timeout_s:.1f}s "
                        f"(state {entry.state.name}, {entry.num_landed} of {entry.num_pairs} (layer, block) pairs landed)"
                    )
                self._cond.wait(left)

    def forget(self, request_id: str) -> None:
        with self._cond:
            self._entries.pop(request_id, None)
