"""KVSender: the prefill side. Connects to receivers (ahead of requests), checks layouts in the
handshake, and pushes chunks of blocks into the block ids named by a ticket.

A backend subclass supplies `_open_link` (use the handshake reply to reach the receiver's cache),
`_push` (move one chunk and send its control header) and `_close_link`.
"""
from __future__ import annotations

import abc
import threading
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, ClassVar

import torch

from kv_transfer.blocks import check_chunk
from kv_transfer.control import DEFAULT_AUTHKEY, open_control, recv_reply
from kv_transfer.counters import CountersSnapshot, TransferCounters
from kv_transfer.errors import TransferError
from kv_transfer.layout import KVLayout, check_layouts
from kv_transfer.ticket import TransferTicket


@dataclass
class ReceiverLink:
    """One connected receiver, as a sender sees it. The lock keeps a chunk's header and payload
    together when several threads push to the same receiver."""

    endpoint: str
    conn: Connection
    generation: int = 0  # the receiver's incarnation, from its welcome
    backend_state: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class KVSender(abc.ABC):
    backend: ClassVar[str]

    def __init__(
        self,
        layout: KVLayout,
        *,
        sender_id: str | None = None,
        generation: int = 0,
        device: str | torch.device = "cpu",
        authkey: bytes = DEFAULT_AUTHKEY,
        timeout_s: float = 30.0,
    ) -> None:
        self.layout = layout
        self.sender_id = sender_id or f"sender-{uuid.uuid4().hex[:8]}"
        # This sender's incarnation (its worker's generation, once registered); receivers refuse
        # a hello from an older one than they know. Set it before connecting.
        self.generation = generation
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.counters = TransferCounters(self.backend)
        self._authkey = authkey
        self._links: dict[str, ReceiverLink] = {}
        self._links_lock = threading.Lock()

    # ---- public API -------------------------------------------------------------------------

    def connect(self, endpoint: str) -> None:
        """Handshake with the receiver at `endpoint` now, so no request pays for it later.
        Raises KVLayoutMismatch naming the differing fields, or TransferError."""
        self._link(endpoint)

    def send_blocks(
        self, ticket: TransferTicket, blocks: torch.Tensor, start: int = 0, layer: int | None = None
    ) -> None:
        """Push `blocks` into ticket.block_ids[start : start + n].

        blocks: (n, num_layers, 2, block_size, kv_heads, head_dim) when layer is None, else that
        layer's (n, 2, block_size, kv_heads, head_dim). Returns when the receiver can read the data
        (or, for process groups, when the payload is handed to the transport).
        """
        num_blocks = blocks.shape[0]
        block_ids = ticket.block_ids[start : start + num_blocks]
        if start < 0 or len(block_ids) != num_blocks:
            raise ValueError(f"blocks [{start}, {start + num_blocks}) exceed the ticket's {len(ticket.block_ids)}")
        check_chunk(self.layout, blocks, num_blocks, layer)
        link = self._link(ticket.endpoint)
        if link.generation != ticket.generation:
            # shm and CUDA IPC write into the receiver's memory before it sees a header, so a
            # ticket from another incarnation of the receiver must not be pushed at all.
            raise TransferError(f"stale ticket for {ticket.request_id}: issued by generation "
                                f"{ticket.generation} of {ticket.endpoint}, which is now generation {link.generation}")
        began = time.perf_counter()
        with link.lock:
            self._guarded(link, self._push, link, ticket, block_ids, blocks, layer)
        self.counters.add_chunk(blocks.numel() * blocks.element_size(), time.perf_counter() - began)

    def send_done(self, ticket: TransferTicket) -> None:
        """Tell the receiver every chunk of the request was sent; it marks DONE once all landed."""
        self._send_control(ticket, ("done", ticket.request_id, ticket.generation, True, ""))
        self.counters.add_transfer()

    def send_failed(self, ticket: TransferTicket, reason: str) -> None:
        """Tell the receiver the request's KV will not arrive (e.g. prefill aborted)."""
        self._send_control(ticket, ("done", ticket.request_id, ticket.generation, False, reason))
        self.counters.add_failure()

    def snapshot(self) -> CountersSnapshot:
        return self.counters.snapshot()

    def close(self) -> None:
        with self._links_lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            self._disconnect(link, say_bye=True)

    def __enter__(self) -> KVSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- backend hooks ------------------------------------------------------------------------

    @abc.abstractmethod
    def _open_link(self, link: ReceiverLink, backend_info: dict[str, Any]) -> None:
        """Use the receiver's handshake reply to reach its cache; store it in link.backend_state."""

    @abc.abstractmethod
    def _push(
        self, link: ReceiverLink, ticket: TransferTicket, block_ids: tuple[int, ...], blocks: torch.Tensor,
        layer: int | None,
    ) -> None:
        """Move one chunk and send its header (control.chunk_header) on link.conn, in the order
        the backend needs."""

    def _close_link(self, link: ReceiverLink) -> None:
        """Release what the backend holds for a receiver."""

    # ---- helpers ------------------------------------------------------------------------------

    def _link(self, endpoint: str) -> ReceiverLink:
        # One lock for all connects keeps two threads from racing to open the same receiver;
        # connects happen at start-up, so serializing them costs nothing on the request path.
        with self._links_lock:
            if endpoint not in self._links:
                self._links[endpoint] = self._handshake(endpoint)
            return self._links[endpoint]

    def _handshake(self, endpoint: str) -> ReceiverLink:
        conn = open_control(endpoint, self._authkey)
        try:
            conn.send(("hello", self.sender_id, self.generation, self.layout.to_dict(), self.backend,
                       self.device.type))
            kind, layout_fields, detail = recv_reply(conn, self.timeout_s, "handshake reply")
            if kind == "refused":
                check_layouts(self.layout, KVLayout.from_dict(layout_fields))  # names the fields
                raise TransferError(f"receiver {endpoint} refused: {detail}")
            link = ReceiverLink(endpoint, conn, int(detail.get("generation", 0)))
            self._open_link(link, detail)
            return link
        except BaseException:
            conn.close()
            raise

    def _send_control(self, ticket: TransferTicket, message: tuple) -> None:
        link = self._link(ticket.endpoint)
        with link.lock:
            self._guarded(link, link.conn.send, message)

    def _guarded(self, link: ReceiverLink, fn: Any, *args: Any) -> None:
        """Run fn; on failure count it, drop the link (the next use reconnects) and raise TransferError."""
        try:
            fn(*args)
        except (TransferError, OSError, EOFError, RuntimeError) as exc:
            self.counters.add_failure()
            with self._links_lock:
                if self._links.get(link.endpoint) is link:
                    del self._links[link.endpoint]
            self._disconnect(link, say_bye=False)
            if isinstance(exc, TransferError):
                raise
            raise TransferError(f"transfer to {link.endpoint} failed: {exc}") from exc

    def _disconnect(self, link: ReceiverLink, say_bye: bool) -> None:
        try:
            if say_bye:
                link.conn.send(("bye",))
        except OSError:
            pass
        finally:
            self._close_link(link)
            link.conn.close()
