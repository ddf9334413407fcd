"""Decides which blocks a prefill step completed, copies them out, and sends them in order.

Two granularities. "chunk": after each forward pass, the blocks the step completed go out with
all their layers in one push. "layer": after each layer of the pass, that layer's slice of the
same blocks goes out, so the transfer of early layers overlaps the compute of later ones (the
mode for GPUs, where a step's layers take long enough for this to pay). Either way a block is
sent once all its tokens are computed, and the last, partial block when the prompt ends.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

import torch

from engine.scheduler import ScheduledRequest
from kv_transfer import KVSender, TransferTicket, gather_blocks

logger = logging.getLogger(__name__)


@dataclass
class PushState:
    """Per request: the ticket and how many of its blocks have been queued for sending."""

    ticket: TransferTicket
    first_block: int  # the request's block index the ticket starts at (decode's cached prefix)
    num_queued: int = 0
    failed: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


GRANULARITIES = ("chunk", "layer")


def resolve_granularity(granularity: str, device: torch.device) -> str:
    """"auto" is "chunk" on every device for now. Layer pushes only pay on a GPU once the sender
    copies and sends on a stream of its own, ordered after each layer by an event; on the default
    stream every per-layer push waits for (and stalls) the compute queued with it."""
    if granularity == "auto":
        return "chunk"
    if granularity not in GRANULARITIES:
        raise ValueError(f"push granularity must be auto, chunk or layer, got {granularity!r}")
    return granularity


class KVPusher:
    """Engine thread: `after_layer` / `after_forward` gather completed blocks. Sender thread:
    pushes them, in the order they were gathered.

    Blocks are copied out of the KV cache on the engine thread, so the engine may free or reuse
    them as soon as the step ends; the copy is what travels.
    """

    def __init__(self, sender: KVSender, kv_cache: torch.Tensor, block_size: int,
                 block_table_of, granularity: str = "chunk") -> None:
        self.sender = sender
        self.kv_cache = kv_cache  # (blocks, layers, 2, block_size, kv_heads, head_dim)
        self.block_size = block_size
        self.granularity = resolve_granularity(granularity, kv_cache.device)
        self.block_table_of = block_table_of  # request_id -> list of block ids
        self.states: dict[str, PushState] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._send_forever, name="kv-pusher", daemon=True)
        self._thread.start()

    def track(self, ticket: TransferTicket) -> PushState:
        state = PushState(ticket, ticket.first_token // self.block_size)
        self.states[ticket.request_id] = state
        return state

    def _ready(self, item: ScheduledRequest) -> tuple[PushState, int, int, bool] | None:
        """(state, begin, upto, finished): blocks [begin, upto) of the request's table are
        complete after this step and not yet queued; None if the request is not pushed here.
        A failed state is returned too: it must still be ended when its prefill finishes."""
        state = self.states.get(item.request.request_id)
        if state is None:
            return None
        request = item.request
        computed = request.num_computed_tokens + item.num_new_tokens
        finished = computed >= request.num_tokens  # the prompt and any resumed outputs
        # A block is sent once all its tokens are computed; the last, partial one at the end.
        upto = -(-computed // self.block_size) if finished else computed // self.block_size
        return state, state.first_block + state.num_queued, upto, finished

    def after_layer(self, layer: int, scheduled: tuple[ScheduledRequest, ...]) -> None:
        if self.granularity != "layer":
            return
        for item in scheduled:
            ready = self._ready(item)
            if ready is not None and not ready[0].failed and ready[2] > ready[1]:
                state, begin, upto, _ = ready
                table = self.block_table_of(item.request.request_id)
                blocks = gather_blocks(self.kv_cache, table[begin:upto], layer)  # (n, 2, bs, kv_heads, hd)
                self._queue.put((state, blocks, state.num_queued, layer))

    def after_forward(self, scheduled: tuple[ScheduledRequest, ...]) -> None:
        for item in scheduled:
            ready = self._ready(item)
            if ready is None:
                continue
            state, begin, upto, finished = ready
            if upto > begin and not state.failed:
                if self.granularity == "chunk":
                    table = self.block_table_of(item.request.request_id)
                    blocks = gather_blocks(self.kv_cache, table[begin:upto])  # (n, layers, 2, bs, kv_heads, hd)
                    self._queue.put((state, blocks, state.num_queued, None))
                state.num_queued += upto - begin  # in layer mode, every layer is queued by now
            if finished:  # done, or failed if a push failed: the receiver is told either way
                self._queue.put((state, None, None, None))
                del self.states[item.request.request_id]

    def abandon(self, request_id: str, reason: str) -> None:
        """The request was aborted before its KV was all sent: tell the receiver."""
        state = self.states.pop(request_id, None)
        if state is not None:
            state.failed = state.failed or reason
            self._queue.put((state, None, None, None))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _send_forever(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            state, blocks, start, layer = job
            try:
                if blocks is not None:
                    if not state.failed:
                        self.sender.send_blocks(state.ticket, blocks, start=start, layer=layer)
                elif state.failed:
                    self.sender.send_failed(state.ticket, state.failed)
                    state.done.set()
                else:
                    self.sender.send_done(state.ticket)
                    state.done.set()
            except Exception as err:
                logger.warning("KV push for %s failed: %s", state.ticket.request_id, err)
                state.failed = state.failed or str(err)
                if blocks is None:  # the final message itself failed: the link is gone
                    state.done.set()
                # Otherwise the request's final job (queued when its prefill finishes or is
                # abandoned) reports the failure to the receiver, best effort.
