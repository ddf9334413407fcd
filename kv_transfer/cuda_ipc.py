"""CUDA IPC between processes on one node: the receiver exports its CUDA cache's memory handle in
the handshake; each sender opens it once and copies chunks straight into the receiver's blocks
with device-to-device copies, then synchronizes before sending the header, so a header the
receiver sees always means the bytes are there.

The handle travels as plain fields (numbers, byte strings, a dtype name), not as the pickled
rebuild call torch's own sharing uses: nothing read from the control socket is unpickled, and the
sender rebuilds the tensor itself with torch's rebuild function and fixed classes.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from kv_transfer.blocks import chunk_nbytes, scatter_blocks
from kv_transfer.control import chunk_header
from kv_transfer.receiver import KVReceiver, PeerLink
from kv_transfer.sender import KVSender, ReceiverLink
from kv_transfer.ticket import TransferTicket


# The fields of torch's CUDA sharing tuple (torch.multiprocessing.reductions.reduce_tensor), in order.
_IPC_FIELDS = ("tensor_cls", "size", "stride", "tensor_offset", "storage_cls", "dtype", "device", "handle",
               "storage_size_bytes", "storage_offset_bytes", "requires_grad", "ref_counter_handle",
               "ref_counter_offset", "event_handle", "event_sync_required")


def ipc_fields(args: tuple) -> dict[str, Any]:
    """torch's sharing tuple of a CUDA tensor as JSON-safe fields (classes and dtype by name)."""
    fields = dict(zip(_IPC_FIELDS, args))
    fields["tensor_cls"] = "Tensor"
    fields["storage_cls"] = fields["storage_cls"].__name__
    fields["dtype"] = str(fields["dtype"]).removeprefix("torch.")
    fields["size"], fields["stride"] = list(fields["size"]), list(fields["stride"])
    return fields


_STORAGE_CLASSES = {"TypedStorage": torch.storage.TypedStorage, "UntypedStorage": torch.UntypedStorage}


def ipc_args(fields: dict[str, Any]) -> tuple:
    """The sharing tuple back, with only known classes and a real dtype; refuses anything else."""
    if fields.get("tensor_cls") != "Tensor" or fields.get("storage_cls") not in _STORAGE_CLASSES:
        raise ValueError(f"unexpected classes in a CUDA IPC handle: {fields.get('tensor_cls')}, "
                         f"{fields.get('storage_cls')}")
    dtype = getattr(torch, str(fields["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype in a CUDA IPC handle: {fields['dtype']!r}")
    values = {**fields, "tensor_cls": torch.Tensor, "storage_cls": _STORAGE_CLASSES[fields["storage_cls"]],
              "dtype": dtype, "size": torch.Size(fields["size"]), "stride": tuple(fields["stride"])}
    return tuple(values[name] for name in _IPC_FIELDS)


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
        # The fields carry the cudaIpcMemHandle of the cache's storage.
        _rebuild, args = reduce_tensor(self.kv_cache)
        return {"ipc": ipc_fields(args)}

    def _land_chunk(self, peer: PeerLink, block_ids: tuple[int, ...], layer: int | None, keep: bool) -> None:
        """Nothing to do: the sender copied and synchronized before sending the header."""


class CudaIpcSender(KVSender):
    backend = "cuda_ipc"

    def _open_link(self, link: ReceiverLink, backend_info: dict[str, Any]) -> None:
        # Opens the handle on the receiver's device; the mapping lives as long as this tensor.
        link.backend_state = rebuild_cuda_tensor(*ipc_args(backend_info["ipc"]))

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
