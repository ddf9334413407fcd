"""The control channel's wire: length-prefixed JSON frames over TCP, after a mutual HMAC proof.

Nothing read from a socket is unpickled: every message is JSON (lists, strings, numbers, null,
and bytes as {"b64": ...}), so a peer can at worst send a message this side refuses. Before any
message, both sides prove they hold the cluster's secret without sending it:

    listener -> client   b"PDKV1" + server nonce (32 bytes)
    client   -> listener client nonce (32) + HMAC-SHA256(secret, "client" | server nonce | client nonce)
    listener -> client   HMAC-SHA256(secret, "server" | client nonce | server nonce)

Either side closes the socket on a wrong proof. Frames are a 4-byte big-endian length and that
many bytes of UTF-8 JSON, at most MAX_FRAME bytes, so a peer cannot make this side allocate
without bound.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import select
import socket
import struct
import threading
from typing import Any

MAGIC = b"PDKV1"
NONCE_BYTES = 32
MAX_FRAME = 16 * 2**20  # control messages are small; the largest is a welcome with a CUDA IPC handle
HANDSHAKE_TIMEOUT_S = 10.0


class AuthenticationFailed(ConnectionError):
    """The peer did not prove the cluster's secret (or is not a pdserve KV peer at all)."""


def _to_json(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return {"b64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            return base64.b64decode(value["b64"])
        return {k: _from_json(v) for k, v in value.items()}
    return value


def _mac(secret: bytes, role: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, role + b"|" + first + b"|" + second, hashlib.sha256).digest()


class FramedConnection:
    """One authenticated control connection. send() is safe from several threads."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()
        self._closed = False

    # --- handshake ---------------------------------------------------------------------
    @classmethod
    def accept(cls, sock: socket.socket, secret: bytes) -> "FramedConnection":
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        server_nonce = os.urandom(NONCE_BYTES)
        sock.sendall(MAGIC + server_nonce)
        reply = _read_exactly(sock, NONCE_BYTES + 32)
        client_nonce, proof = reply[:NONCE_BYTES], reply[NONCE_BYTES:]
        if not hmac.compare_digest(proof, _mac(secret, b"client", server_nonce, client_nonce)):
            raise AuthenticationFailed("the peer does not know the cluster secret")
        sock.sendall(_mac(secret, b"server", client_nonce, server_nonce))
        sock.settimeout(None)
        return cls(sock)

    @classmethod
    def connect(cls, address: tuple[str, int], secret: bytes, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> "FramedConnection":
        sock = socket.create_connection(address, timeout=timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            greeting = _read_exactly(sock, len(MAGIC) + NONCE_BYTES)
            if not greeting.startswith(MAGIC):
                raise AuthenticationFailed(f"{address[0]}:{address[1]} is not a pdserve KV receiver")
            server_nonce = greeting[len(MAGIC):]
            client_nonce = os.urandom(NONCE_BYTES)
            sock.sendall(client_nonce + _mac(secret, b"client", server_nonce, client_nonce))
            try:
                proof = _read_exactly(sock, 32)
            except EOFError:
                raise AuthenticationFailed("the receiver hung up on our proof: the cluster secrets differ") from None
            if not hmac.compare_digest(proof, _mac(secret, b"server", client_nonce, server_nonce)):
                raise AuthenticationFailed("the receiver does not know the cluster secret")
            sock.settimeout(None)
            return cls(sock)
        except BaseException:
            sock.close()
            raise

    # --- messages ---------------------------------------------------------------------
    def send(self, message: Any) -> None:
        body = json.dumps(_to_json(message), separators=(",", ":")).encode()
        if len(body) > MAX_FRAME:
            raise ValueError(f"control message of {len(body)} bytes exceeds {MAX_FRAME}")
        with self._send_lock:
            self._sock.sendall(struct.pack(">I", len(body)) + body)

    def recv(self) -> Any:
        """The next message; EOFError when the peer closed the connection."""
        (length,) = struct.unpack(">I", _read_exactly(self._sock, 4))
        if length > MAX_FRAME:
            raise ValueError(f"the peer sent a {length}-byte frame; at most {MAX_FRAME} are accepted")
        return _from_json(json.loads(_read_exactly(self._sock, length)))

    def poll(self, timeout_s: float) -> bool:
        """Whether a message (or the end of the stream) can be read within timeout_s."""
        ready, _, _ = select.select([self._sock], [], [], timeout_s)
        return bool(ready)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    chunks, left = [], count
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise EOFError("the peer closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
