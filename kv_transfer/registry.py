"""The one place a backend is chosen. A backend module is imported only when it is picked, so a
host without CUDA never imports the CUDA IPC code, and adding a backend is one line here."""
from __future__ import annotations

import importlib
from typing import Any

from kv_transfer.layout import KVLayout
from kv_transfer.receiver import KVReceiver
from kv_transfer.sender import KVSender

# backend name -> module defining `Sender` and `Receiver`
BACKENDS: dict[str, str] = {
    "torch_dist": "kv_transfer.torch_dist",
    "shm": "kv_transfer.shm",
    "cuda_ipc": "kv_transfer.cuda_ipc",
}


def _backend_module(backend: str) -> Any:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kv transfer backend {backend!r}; known: {', '.join(sorted(BACKENDS))}")
    return importlib.import_module(BACKENDS[backend])


def create_sender(backend: str, layout: KVLayout, **options: Any) -> KVSender:
    """A sender for `backend`; options: sender_id, generation, host, device, authkey, timeout_s. Connect it to
    receivers with `connect(endpoint)` when the worker starts."""
    return _backend_module(backend).Sender(layout, **options)


def create_receiver(backend: str, layout: KVLayout, num_blocks: int | None = None, **options: Any) -> KVReceiver:
    """A started receiver for `backend` (already accepting senders at `.endpoint`).
    options: kv_cache, device, host, port, authkey, timeout_s."""
    receiver = _backend_module(backend).Receiver(layout, num_blocks, **options)
    receiver.start()
    return receiver
