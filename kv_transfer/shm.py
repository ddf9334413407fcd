"""Same-host shared memory: the receiver's KV cache is a file in /dev/shm mapped shared; each
sender maps the same file and copies chunks straight into the receiver's blocks (one memcpy,
no staging). The control header is sent after the copy, so a chunk is complete when it is seen.
"""
from __future__ import annotations

import math
import os
import uuid
from typing import Any

import torch

from kv_transfer.blocks import chunk_nbytes, scatter_blocks
from kv_transfer.control import chunk_header
from kv_transfer.layout import KVLayout
from kv_transfer.receiver import KVReceiver, PeerLink
from kv_transfer.sender import KVSender, ReceiverLink
from kv_transfer.ticket import TransferTicket

SHM_DIR = "/dev/shm"


def map_shared_cache(path: str, layout: KVLayout, num_blocks: int) -> torch.Tensor:
    """Map `path` as a shared cache tensor; writes are visible to every process mapping it."""
    shape = layout.cache_shape(num_blocks)
    flat = torch.from_file(path, shared=True, size=math.prod(shape), dtype=layout.torch_dtype)
    return flat.view(shape)  # (num_blocks, num_layers, 2, block_size, kv_heads, head_dim)


def prefault(cache: torch.Tensor, page_bytes: int = 4096) -> None:
    """Map every page of a fresh mapping into this process now, at connect time, by reading one
    byte per page (reading never races with writers). Otherwise the first transfers into each
    page pay a page fault per 4 KiB, which costs about as much as the copy itself."""
    cache.reshape(-1).view(torch.uint8)[::page_bytes].sum()


class ShmReceiver(KVReceiver):
    backend = "shm"

    def _allocate_cache(self, num_blocks: int, device: str | torch.device) -> torch.Tensor:
        if torch.device(device).type != "cpu":
            raise ValueError("the shm backend keeps the cache in host memory; use device='cpu'")
        self._path = os.path.join(SHM_DIR, f"pdserve-kv-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        cache = map_shared_cache(self._path, self.layout, num_blocks)
        cache.zero_()  # touch every page now, so the first transfer does not pay the page faults
        return cache

    def _adopt_cache(self, kv_cache: torch.Tensor) -> torch.Tensor:
        raise ValueError("the shm receiver allocates its cache in shared memory: pass num_blocks, use .kv_cache")

    def _release_cache(self) -> None:
        # Unlinking only removes the name; live mappings (ours, senders') stay valid until unmapped.
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass

    def _welcome(self, peer: PeerLink) -> dict[str, Any]:
        return {"path": self._path, "num_blocks": self.num_blocks}

    def _land_chunk(self, peer: PeerLink, block_ids: tuple[int, ...], layer: int | None, keep: bool) -> None:
        """Nothing to do: the sender already wrote the blocks before sending the header."""


class ShmSender(KVSender):
    backend = "shm"

    def _open_link(self, link: ReceiverLink, backend_info: dict[str, Any]) -> None:
        remote_cache = map_shared_cache(backend_info["path"], self.layout, backend_info["num_blocks"])
        prefault(remote_cache)
        link.backend_state = remote_cache

    def _push(
        self, link: ReceiverLink, ticket: TransferTicket, block_ids: tuple[int, ...], blocks: torch.Tensor,
        layer: int | None,
    ) -> None:
        remote_cache: torch.Tensor = link.backend_state
        bad = [b for b in block_ids if b >= remote_cache.shape[0]]
        if bad:
            raise ValueError(f"blocks {bad} out of range for the receiver's {remote_cache.shape[0]} blocks")
        scatter_blocks(remote_cache, block_ids, blocks, layer)
        nbytes = chunk_nbytes(self.layout, len(block_ids), layer)
        link.conn.send(chunk_header(ticket.request_id, ticket.generation, block_ids, layer, nbytes))

    def _close_link(self, link: ReceiverLink) -> None:
        link.backend_state = None  # drops the mapping once no view of it is alive


Receiver = ShmReceiver
Sender = ShmSender
