"""CUDA IPC between processes on one node: the receiver exports its CUDA cache's memory handle in
the handshake; each sender opens it once and copies chunks straight into the receiver's blocks
with device-to-device copies, then synchronizes before sending the header, so a header the
receiver sees always means the bytes are there.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.multiprocessing.reductions import reduce_tensor

from kv_transfer.blocks import chunk_nbytes, scatter_blocks
from kv_transfer.control import chunk_header
from kv_transfer.receiver import KVReceiver, PeerLink
from kv_transfer.sender import KVSender, ReceiverLink
from kv_transfer.ticket import TransferTicket


class CudaIpcReceiver(KVReceiver):
    backend = "cuda_ipc"

    def _allocate_cache(self, num_blocks: int, device: str | torch.device) -> torch.Tensor:
        if torch.device(device).type != "cuda":
            raise ValueError("the cuda_ipc backend needs a CUDA cache; pass device='cuda[:i]'")
        return super()._allocate_cache(num_blocks, device)

    def _adopt_cache(self, kv_cache: torch.Tensor) -> torch.Tensor:
        if not kv_cache.is_cuda:
            raise ValueError("the cuda_ipc backend needs a CUDA cache")
        return super()._adopt_cache(kv_cache)

    def _welcome(self, peer: PeerLink) -> dict[str, Any]:
        # (rebuild function, args): args carry the cudaIpcMemHandle of the cache's storage.
        rebuild, args = reduce_tensor(self.kv_cache)
        return {"rebuild": rebuild, "args": args}

    def _land_chunk(self, peer: PeerLink, block_ids: tuple[int, ...], layer: int | None, keep: bool) -> None:
        """Nothing to do: the sender copied and synchronized before sending the header."""


class CudaIpcSender(KVSender):
    backend = "cuda_ipc"

    def _open_link(self, link: ReceiverLink, backend_info: dict[str, Any]) -> None:
        # Opens the handle on the receiver's device; the mapping lives as long as this tensor.
        link.backend_state = backend_info["rebuild"](*backend_info["args"])

    def _push(
        self, link: ReceiverLink, ticket: TransferTicket, block_ids: tuple[int, ...], blocks: torch.Tensor,
        layer: int | None,
    ) -> None:
        remote_cache: torch.Tensor = link.backend_state
        scatter_blocks(remote_cache, block_ids, blocks, layer)
        torch.cuda.current_stream(remote_cache.device).synchronize()
        nbytes = chunk_nbytes(self.layout, len(block_ids), layer)
        link.conn.send(chunk_header(ticket.request_id, ticket.generation, block_ids, layer, nbytes))

    def _close_link(self, link: ReceiverLink) -> None:
        link.backend_state = None


Receiver = CudaIpcReceiver
Sender = CudaIpcSender
