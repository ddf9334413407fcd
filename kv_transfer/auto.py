"""Several backends at once, chosen per (prefill, decode) pair: `auto`.

A decode worker opens one receiver per backend it may need, all over one KV cache (the first one
allocates it where the same-node backend can reach it: a shared-memory file on the CPU, CUDA
memory on a GPU; the others adopt it), and issues each ticket on the receiver its pair should use:
on one node, shared memory (CPU) or CUDA IPC (GPU); across nodes, torch.distributed (gloo for CPU
caches, NCCL for CUDA ones). A prefill worker holds one sender per backend it has pushed over and
sends each ticket through the sender of the ticket's backend. Choices are counted per backend and
logged once per peer.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from kv_transfer.counters import CountersSnapshot
from kv_transfer.layout import KVLayout
from kv_transfer.receiver import KVReceiver
from kv_transfer.registry import BACKENDS, create_receiver, create_sender
from kv_transfer.sender import KVSender
from kv_transfer.ticket import TransferState, TransferTicket

log = logging.getLogger(__name__)

AUTO = "auto"
CHOICES = (AUTO, *BACKENDS)


def same_node_backend(device_type: str) -> str:
    return "cuda_ipc" if device_type == "cuda" else "shm"


def backends_for(configured: str, device_type: str) -> list[str]:
    """The receivers a decode worker opens; the first allocates the cache."""
    if configured == AUTO:
        return [same_node_backend(device_type), "torch_dist"]
    if configured not in BACKENDS:
        raise ValueError(f"kv transfer backend must be one of {', '.join(CHOICES)}, got {configured!r}")
    return [configured]


def choose_backend(configured: str, sender_node: str | None, receiver_node: str, device_type: str) -> str:
    """The backend a pair uses: the configured one, or for auto, by whether both share a node."""
    if configured != AUTO:
        return configured
    if sender_node is not None and sender_node == receiver_node:
        return same_node_backend(device_type)
    return "torch_dist"


def add_snapshots(backend: str, snapshots: list[CountersSnapshot]) -> CountersSnapshot:
    return CountersSnapshot(backend, sum(s.bytes for s in snapshots), sum(s.transfers for s in snapshots),
                            sum(s.chunks for s in snapshots), sum(s.seconds for s in snapshots),
                            sum(s.failures for s in snapshots))


class ReceiverSet:
    """A decode worker's receivers, by backend, over one cache; a ticket's calls go to the
    receiver that issued it."""

    def __init__(self, configured: str, layout: KVLayout, num_blocks: int, node: str,
                 device: str | torch.device = "cpu", **options: Any) -> None:
        self.configured = configured
        self.node = node
        self.device_type = torch.device(device).type
        self.receivers: dict[str, KVReceiver] = {}
        for i, backend in enumerate(backends_for(configured, self.device_type)):
            cache = {"num_blocks": num_blocks} if i == 0 else {"kv_cache": self.kv_cache}
            self.receivers[backend] = create_receiver(backend, layout, host=node, device=device, **cache, **options)
        self._issued_by: dict[str, KVReceiver] = {}  # request id -> the receiver of its ticket
        self.choices: Counter[str] = Counter()
        self._logged: set[tuple[str, str]] = set()

    @property
    def primary(self) -> KVReceiver:
        return next(iter(self.receivers.values()))

    @property
    def kv_cache(self) -> torch.Tensor:
        return self.primary.kv_cache

    @property
    def layout(self) -> KVLayout:
        return self.primary.layout

    @property
    def timeout_s(self) -> float:
        return self.primary.timeout_s

    @property
    def endpoints(self) -> dict[str, str]:
        return {backend: receiver.endpoint for backend, receiver in self.receivers.items()}

    def configure(self, generation: int, peer_check: Callable[[str, int], str | None] | None) -> None:
        for receiver in self.receivers.values():
            receiver.generation = generation
            receiver.peer_check = peer_check

    def issue_ticket(self, request_id: str, block_ids, num_tokens: int, lease_id: str, first_token: int,
                     sender_id: str | None, sender_node: str | None) -> TransferTicket:
        backend = choose_backend(self.configured, sender_node, self.node, self.device_type)
        self.choices[backend] += 1
        if sender_id is not None and (sender_id, backend) not in self._logged:
            self._logged.add((sender_id, backend))
            log.info("KV from %s (node %s) arrives over %s", sender_id, sender_node, backend)
        receiver = self.receivers[backend]
        ticket = receiver.issue_ticket(request_id, block_ids, num_tokens, lease_id, first_token)
        self._issued_by[request_id] = receiver
        return ticket

    def _of(self, request_id: str) -> KVReceiver | None:
        return self._issued_by.get(request_id)

    def poll(self, request_id: str) -> TransferState:
        return self._issued_by[request_id].poll(request_id)

    def wait(self, request_id: str, timeout_s: float | None = None) -> TransferState:
        return self._issued_by[request_id].wait(request_id, timeout_s)

    def cancel(self, request_id: str, reason: str) -> None:
        receiver = self._of(request_id)
        if receiver is not None:
            receiver.cancel(request_id, reason)

    def release(self, request_id: str) -> None:
        receiver = self._issued_by.pop(request_id, None)
        if receiver is not None:
            receiver.release(request_id)

    def snapshot(self) -> CountersSnapshot:
        return add_snapshots(self.configured, [r.snapshot() for r in self.receivers.values()])

    def snapshots(self) -> dict[str, CountersSnapshot]:
        return {backend: r.snapshot() for backend, r in self.receivers.items()}

    def close(self) -> None:
        for receiver in reversed(list(self.receivers.values())):  # the cache's owner last
            receiver.close()


class SenderSet:
    """A prefill worker's senders, one per backend, made when first needed; each ticket goes
    through the sender of the backend its receiver chose."""

    def __init__(self, layout: KVLayout, sender_id: str, device: str | torch.device = "cpu", **options: Any) -> None:
        self.layout = layout
        self.sender_id = sender_id
        self.device = device
        self.options = options
        self.senders: dict[str, KVSender] = {}
        self._generation = 0

    @property
    def generation(self) -> int:
        return self._generation

    @generation.setter
    def generation(self, value: int) -> None:
        self._generation = value
        for sender in self.senders.values():
            sender.generation = value

    def sender(self, backend: str) -> KVSender:
        if backend not in self.senders:
            sender = create_sender(backend, self.layout, sender_id=self.sender_id, device=self.device,
                                   generation=self._generation, **self.options)
            self.senders[backend] = sender
        return self.senders[backend]

    def connect(self, endpoint: str, backend: str) -> None:
        self.sender(backend).connect(endpoint)

    def send_blocks(self, ticket: TransferTicket, blocks: torch.Tensor, start: int = 0, layer: int | None = None) -> None:
        self.sender(ticket.backend).send_blocks(ticket, blocks, start, layer)

    def send_done(self, ticket: TransferTicket) -> None:
        self.sender(ticket.backend).send_done(ticket)

    def send_failed(self, ticket: TransferTicket, reason: str) -> None:
        self.sender(ticket.backend).send_failed(ticket, reason)

    def snapshot(self) -> CountersSnapshot:
        return add_snapshots("all", [s.snapshot() for s in self.senders.values()])

    def snapshots(self) -> dict[str, CountersSnapshot]:
        return {backend: s.snapshot() for backend, s in self.senders.items()}

    def close(self) -> None:
        for sender in self.senders.values():
            sender.close()
