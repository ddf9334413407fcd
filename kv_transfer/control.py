"""The control channel between a sender and a receiver: small pickled tuples over one TCP socket.

Every backend uses it for the handshake, for chunk headers and for "done"; only the payload path
differs (a process group, a shared mapping, a CUDA IPC mapping). Messages on one connection are
handled in order, so a "done" is seen only after every chunk sent before it has landed.

Messages (sender -> receiver):
    ("hello", sender_id, sender_generation, layout_dict, backend, device_type)
    ("chunk", request_id, ticket_generation, block_ids, layer, nbytes)    layer None means all layers
    ("done", request_id, ticket_generation, ok, reason)
    ("bye",)
Generations tell incarnations of a worker apart: a receiver refuses a hello from an older
incarnation of a sender than one it knows, and drops chunks of a ticket that another incarnation
of itself issued; the welcome names the receiver's generation, and a sender refuses to push a
ticket of another one (shm and CUDA IPC write into the receiver's memory before the header), so
a restarted worker is never confused with its dead predecessor.
Replies (receiver -> sender), only to "hello":
    ("welcome", layout_dict, backend_info) or ("refused", layout_dict, reason)
    backend_info always holds "generation", the receiver's.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener

from kv_transfer.errors import TransferError, TransferTimeout

log = logging.getLogger(__name__)

DEFAULT_AUTHKEY = b"pdserve-kv-transfer"


def chunk_header(request_id: str, generation: int, block_ids: tuple[int, ...], layer: int | None,
                 nbytes: int) -> tuple:
    return ("chunk", request_id, generation, block_ids, layer, nbytes)


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"endpoint must be 'host:port', got {endpoint!r}")
    return host, int(port)


class ControlListener:
    """Accepts sender connections on (host, port) and serves each on its own daemon thread."""

    def __init__(self, host: str, port: int, authkey: bytes, serve: Callable[[Connection], None]) -> None:
        self._listener = Listener((host, port), authkey=authkey)
        self._host = host
        self._serve = serve
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="kv-accept", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"{self._host}:{self._listener.address[1]}"

    def start(self) -> None:
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn = self._listener.accept()
            except Exception as exc:  # closed listener, or a client that failed authentication
                if self._closed.is_set():
                    return
                log.warning("kv_transfer: refused a control connection: %s", exc)
                continue
            threading.Thread(target=self._serve, args=(conn,), name="kv-peer", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()


def open_control(endpoint: str, authkey: bytes) -> Connection:
    try:
        return Client(split_endpoint(endpoint), authkey=authkey)
    except (OSError, EOFError) as exc:
        raise TransferError(f"cannot reach receiver at {endpoint}: {exc}") from exc


def recv_reply(conn: Connection, timeout_s: float, what: str) -> tuple:
    """Receive one message, or raise TransferTimeout / TransferError instead of hanging."""
    try:
        if not conn.poll(timeout_s):
            raise TransferTimeout(f"no {what} from receiver within {timeout_s:.1f}s")
        return conn.recv()
    except (OSError, EOFError) as exc:
        raise TransferError(f"receiver closed the connection during {what}: {exc}") from exc
