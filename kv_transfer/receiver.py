"""KVReceiver: the decode side. Owns the KV cache that transfers land in, issues tickets, and
tracks each ticketed request until its KV has fully landed.

A backend subclass supplies how payload arrives (`_welcome`, `_land_chunk`, `_drop_peer`, and
optionally `_allocate_cache`); the control loop, handshake, validation and counters live here.
"""
from __future__ import annotations

import abc
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, ClassVar

import torch

from kv_transfer.blocks import chunk_nbytes
from kv_transfer.control import DEFAULT_AUTHKEY, ControlListener
from kv_transfer.counters import CountersSnapshot, TransferCounters
from kv_transfer.layout import KVLayout, layout_differences
from kv_transfer.ticket import TransferState, TransferTicket
from kv_transfer.tracker import RequestTracker

log = logging.getLogger(__name__)


@dataclass
class PeerLink:
    """One connected sender, as the receiver sees it. `backend_state` belongs to the backend."""

    index: int  # order of arrival at this receiver, unique per receiver
    sender_id: str
    generation: int  # the sender's incarnation
    conn: Connection
    device_type: str
    backend_state: Any = None
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = f"{self.sender_id}#{self.index}"


class KVReceiver(abc.ABC):
    backend: ClassVar[str]

    def __init__(
        self,
        layout: KVLayout,
        num_blocks: int | None = None,
        *,
        kv_cache: torch.Tensor | None = None,
        device: str | torch.device = "cpu",
        host: str = "127.0.0.1",
        port: int = 0,
        authkey: bytes = DEFAULT_AUTHKEY,
        timeout_s: float = 30.0,
    ) -> None:
        if (kv_cache is None) == (num_blocks is None):
            raise ValueError("pass exactly one of num_blocks (allocate a cache) or kv_cache (use it)")
        self.layout = layout
        self.timeout_s = timeout_s
        self.counters = TransferCounters(self.backend)
        self._tracker = RequestTracker(layout.num_layers)
        self._kv_cache = self._adopt_cache(kv_cache) if kv_cache is not None else self._allocate_cache(num_blocks, device)
        self._listener = ControlListener(host, port, authkey, self._serve_peer)
        self._peer_index = itertools.count()
        self._closed = False
        # This receiver's incarnation, stamped on its tickets (its worker's generation).
        self.generation = 0
        # Optional check of a connecting sender, (sender_id, generation) -> reason to refuse or
        # None; the worker asks the cluster registry whether that incarnation is still current.
        self.peer_check: Callable[[str, int], str | None] | None = None
        self._newest_generation: dict[str, int] = {}  # sender id -> newest incarnation seen

    # ---- public API -------------------------------------------------------------------------

    def start(self) -> str:
        """Start accepting senders; returns the endpoint that goes into tickets."""
        self._listener.start()
        return self.endpoint

    @property
    def endpoint(self) -> str:
        return self._listener.endpoint

    @property
    def kv_cache(self) -> torch.Tensor:
        """(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim); transfers land here."""
        return self._kv_cache

    @property
    def num_blocks(self) -> int:
        return self._kv_cache.shape[0]

    def issue_ticket(
        self, request_id: str, block_ids: Sequence[int], num_tokens: int, lease_id: str, first_token: int = 0
    ) -> TransferTicket:
        """Register reserved blocks for a request and return the ticket to hand to the sender."""
        ticket = TransferTicket(request_id, self.endpoint, tuple(block_ids), num_tokens, lease_id, first_token,
                                self.generation)
        bad = [b for b in ticket.block_ids if b >= self.num_blocks]
        if bad:
            raise ValueError(f"blocks {bad} out of range for a cache of {self.num_blocks} blocks")
        self._tracker.add(ticket)
        return ticket

    def poll(self, request_id: str) -> TransferState:
        return self._tracker.poll(request_id)

    def wait(self, request_id: str, timeout_s: float | None = None) -> TransferState:
        """DONE, or raise TransferError (failed) / TransferTimeout (stalled past timeout_s)."""
        return self._tracker.wait(request_id, self.timeout_s if timeout_s is None else timeout_s)

    def cancel(self, request_id: str, reason: str = "cancelled by receiver") -> None:
        """Fail an unfinished transfer (e.g. its lease expired); later chunks for it are dropped."""
        if self._tracker.finish(request_id, ok=False, reason=reason) is TransferState.FAILED:
            self.counters.add_failure()

    def release(self, request_id: str) -> None:
        """Forget a request once its blocks are owned by the engine (or freed)."""
        self._tracker.forget(request_id)

    def snapshot(self) -> CountersSnapshot:
        return self.counters.snapshot()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._listener.close()
            self._release_cache()

    def __enter__(self) -> KVReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- backend hooks ------------------------------------------------------------------------

    def _allocate_cache(self, num_blocks: int, device: str | torch.device) -> torch.Tensor:
        return self.layout.allocate(num_blocks, device)

    def _release_cache(self) -> None:
        """Free backend resources behind the cache (e.g. a shared-memory file)."""

    @abc.abstractmethod
    def _welcome(self, peer: PeerLink) -> dict[str, Any]:
        """What the sender needs to reach the cache; sent in the handshake reply."""

    def _after_welcome(self, peer: PeerLink) -> None:
        """Runs on the peer's thread right after the reply (e.g. join a process group)."""

    @abc.abstractmethod
    def _land_chunk(self, peer: PeerLink, block_ids: tuple[int, ...], layer: int | None, keep: bool) -> None:
        """Make the chunk's payload land in the cache; when keep is False, consume and drop it."""

    def _drop_peer(self, peer: PeerLink) -> None:
        """Release what the backend holds for a peer that left."""

    # ---- control loop (one thread per connected sender) ---------------------------------------

    def _adopt_cache(self, kv_cache: torch.Tensor) -> torch.Tensor:
        expected = self.layout.cache_shape(kv_cache.shape[0]) if kv_cache.dim() == 6 else None
        if tuple(kv_cache.shape) != expected or kv_cache.dtype != self.layout.torch_dtype:
            raise ValueError(f"kv_cache {tuple(kv_cache.shape)} {kv_cache.dtype} does not match {self.layout}")
        return kv_cache

    def _serve_peer(self, conn: Connection) -> None:
        peer = None
        reason = "sender disconnected"
        try:
            peer = self._handshake(conn)
            if peer is not None:
                reason = self._message_loop(peer)
        except (EOFError, OSError) as exc:
            reason = f"sender connection lost: {exc}"
        except Exception as exc:  # a backend failure must not kill the receiver silently
            log.exception("kv_transfer: peer loop failed")
            reason = f"receiver error: {exc}"
        finally:
            if peer is not None:
                for rid in self._tracker.fail_peer(peer.name, reason):
                    self.counters.add_failure()
                    log.warning("kv_transfer: %s failed: %s", rid, reason)
                self._drop_peer(peer)
            conn.close()

    def _handshake(self, conn: Connection) -> PeerLink | None:
        kind, sender_id, generation, layout_fields, backend, device_type = conn.recv()
        assert kind == "hello", f"expected hello, got {kind}"
        problems = self._generation_problems(sender_id, generation)
        problems += layout_differences(KVLayout.from_dict(layout_fields), self.layout)
        if backend != self.backend:
            problems.append(f"backend differs: sender {backend}, receiver {self.backend}")
        if device_type != self._kv_cache.device.type and self._needs_same_device():
            problems.append(f"device differs: sender {device_type}, receiver {self._kv_cache.device.type}")
        if problems:
            self.counters.add_failure()
            conn.send(("refused", self.layout.to_dict(), "; ".join(problems)))
            log.warning("kv_transfer: refused sender %s: %s", sender_id, "; ".join(problems))
            return None
        self._newest_generation[sender_id] = max(generation, self._newest_generation.get(sender_id, 0))
        peer = PeerLink(next(self._peer_index), sender_id, generation, conn, device_type)
        conn.send(("welcome", self.layout.to_dict(), {**self._welcome(peer), "generation": self.generation}))
        self._after_welcome(peer)
        return peer

    def _generation_problems(self, sender_id: str, generation: int) -> list[str]:
        newest = self._newest_generation.get(sender_id, 0)
        if generation < newest:
            return [f"stale sender: {sender_id} generation {generation} connected, generation {newest} "
                    "is known"]
        reason = self.peer_check(sender_id, generation) if self.peer_check is not None else None
        return [reason] if reason else []

    def _needs_same_device(self) -> bool:
        """Whether sender tensors must be on the receiver's device type (true for process groups)."""
        return False

    def _message_loop(self, peer: PeerLink) -> str:
        while True:
            msg = peer.conn.recv()
            if msg[0] == "chunk":
                _, request_id, generation, block_ids, layer, nbytes = msg
                self._on_chunk(peer, request_id, generation, tuple(block_ids), layer, nbytes)
            elif msg[0] == "done":
                _, request_id, generation, ok, reason = msg
                self._on_done(peer, request_id, generation, ok, reason)
            elif msg[0] == "bye":
                return "sender closed the connection"
            else:
                raise ValueError(f"unknown control message {msg[0]!r}")

    def _stale(self, peer: PeerLink, generation: int) -> str | None:
        """Why a message from this peer for a ticket of `generation` must be refused, if it must."""
        if generation != self.generation:
            return f"stale ticket: issued by generation {generation} of this worker, this is {self.generation}"
        if peer.generation < self._newest_generation.get(peer.sender_id, 0):
            return f"stale sender: {peer.sender_id} generation {peer.generation} was replaced"
        return None

    def _on_chunk(self, peer: PeerLink, request_id: str, generation: int, block_ids: tuple[int, ...],
                  layer: int | None, nbytes: int) -> None:
        stale = self._stale(peer, generation)
        if stale is not None:
            self._land_chunk(peer, block_ids, layer, keep=False)  # consume the payload, write nothing
            self.counters.add_failure()
            log.warning("kv_transfer: refused a chunk for %s: %s", request_id, stale)
            return
        problem = self._tracker.check_chunk(request_id, block_ids)
        if nbytes != chunk_nbytes(self.layout, len(block_ids), layer):
            problem = problem or f"chunk of {nbytes} bytes does not match {len(block_ids)} blocks"
        start = time.perf_counter()
        self._land_chunk(peer, block_ids, layer, keep=problem is None)
        if problem is not None:
            log.warning("kv_transfer: dropped a chunk: %s", problem)
            self.cancel(request_id, reason=problem)
            return
        self.counters.add_chunk(nbytes, time.perf_counter() - start)
        self._tracker.record_chunk(request_id, peer.name, block_ids, layer)

    def _on_done(self, peer: PeerLink, request_id: str, generation: int, ok: bool, reason: str) -> None:
        stale = self._stale(peer, generation)
        if stale is not None:
            self.counters.add_failure()
            log.warning("kv_transfer: refused the end of %s: %s", request_id, stale)
            return
        state = self._tracker.finish(request_id, ok, reason or "sender reported failure")
        if state is TransferState.DONE:
            self.counters.add_transfer()
        elif state is TransferState.FAILED:
            self.counters.add_failure()
