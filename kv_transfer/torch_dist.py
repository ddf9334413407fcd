"""torch.distributed point-to-point: gloo for CPU caches, NCCL for CUDA caches, one code path.

Every sender/receiver pair gets its own two-rank process group (receiver rank 0, sender rank 1),
formed at connect time through a TCPStore that the receiver hosts; pairs are told apart by a
store prefix. So a pool of P prefill and D decode workers needs no global world: each prefill
worker joins one small group per decode worker it connects to, and workers can come and go.

Per chunk the sender writes the ("chunk", ...) header on the control channel, then sends the
blocks as one contiguous byte tensor (one message per chunk keeps gloo near its bandwidth). The
receiver's peer thread reads headers in order and posts the matching recv into a staging buffer,
then scatters the blocks into the cache.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kv_transfer.blocks import chunk_nbytes, chunk_shape, scatter_blocks
from kv_transfer.control import chunk_header, split_endpoint
from kv_transfer.receiver import KVReceiver, PeerLink
from kv_transfer.sender import KVSender, ReceiverLink
from kv_transfer.ticket import TransferTicket

RECEIVER_RANK, SENDER_RANK, PAIR_SIZE = 0, 1, 2
PAYLOAD_TAG = 0


def make_pair_group(store: dist.Store, rank: int, device: torch.device, local_host: str, timeout_s: float) -> Any:
    """A two-rank process group whose backend follows the tensor device (the only branch)."""
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, PAIR_SIZE, options)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host)]
    return dist.ProcessGroupGloo(store, rank, PAIR_SIZE, options)


def local_address_towards(host: str) -> str:
    """The local IP this host uses to reach `host` (no packet is sent: UDP connect only routes)."""
    if host in ("127.0.0.1", "localhost"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))
        return probe.getsockname()[0]


def _wait(work: Any, device: torch.device, timeout_s: float) -> None:
    work.wait(timedelta(seconds=timeout_s))
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


@dataclass
class _PairChannel:
    group: Any
    staging: torch.Tensor | None = None  # receiver only: grown to the largest chunk seen


class TorchDistReceiver(KVReceiver):
    backend = "torch_dist"

    def start(self) -> str:
        host = self._listener.endpoint.rpartition(":")[0]
        self._store = dist.TCPStore(
            host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=self.timeout_s)
        )
        return super().start()

    def _needs_same_device(self) -> bool:
        return True

    def _welcome(self, peer: PeerLink) -> dict[str, Any]:
        return {"store_port": self._store.port, "prefix": f"kv-pair/{peer.index}"}

    def _after_welcome(self, peer: PeerLink) -> None:
        store = dist.PrefixStore(f"kv-pair/{peer.index}", self._store)
        host = self._listener.endpoint.rpartition(":")[0]
        group = make_pair_group(store, RECEIVER_RANK, self.kv_cache.device, host, self.timeout_s)
        peer.backend_state = _PairChannel(group)

    def _land_chunk(self, peer: PeerLink, block_ids: tuple[int, ...], layer: int | None, keep: bool) -> None:
        channel: _PairChannel = peer.backend_state
        nbytes = chunk_nbytes(self.layout, len(block_ids), layer)
        if channel.staging is None or channel.staging.numel() < nbytes:
            channel.staging = torch.empty(nbytes, dtype=torch.uint8, device=self.kv_cache.device)
        payload = channel.staging[:nbytes]
        _wait(channel.group.recv([payload], SENDER_RANK, PAYLOAD_TAG), self.kv_cache.device, self.timeout_s)
        if keep:
            blocks = payload.view(self.layout.torch_dtype).view(chunk_shape(self.layout, len(block_ids), layer))
            scatter_blocks(self.kv_cache, block_ids, blocks, layer)

    def _drop_peer(self, peer: PeerLink) -> None:
        peer.backend_state = None

    def _release_cache(self) -> None:
        self._store = None


class TorchDistSender(KVSender):
    backend = "torch_dist"

    def _open_link(self, link: ReceiverLink, backend_info: dict[str, Any]) -> None:
        host, _ = split_endpoint(link.endpoint)
        store = dist.TCPStore(
            host, backend_info["store_port"], is_master=False, timeout=timedelta(seconds=self.timeout_s)
        )
        pair_store = dist.PrefixStore(backend_info["prefix"], store)
        group = make_pair_group(pair_store, SENDER_RANK, self.device, local_address_towards(host), self.timeout_s)
        link.backend_state = _PairChannel(group)

    def _push(
        self, link: ReceiverLink, ticket: TransferTicket, block_ids: tuple[int, ...], blocks: torch.Tensor,
        layer: int | None,
    ) -> None:
        channel: _PairChannel = link.backend_state
        payload = blocks.to(self.device).contiguous().view(torch.uint8).reshape(-1)  # (nbytes,)
        link.conn.send(chunk_header(ticket.request_id, ticket.generation, block_ids, layer, payload.numel()))
        _wait(channel.group.send([payload], RECEIVER_RANK, PAYLOAD_TAG), self.device, self.timeout_s)

    def _close_link(self, link: ReceiverLink) -> None:
        link.backend_state = None


Receiver = TorchDistReceiver
Sender = TorchDistSender
