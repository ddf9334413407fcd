"""Errors raised by the transfer service. All derive from TransferError so callers can catch one type."""
from __future__ import annotations


class TransferError(RuntimeError):
    """A transfer (or the connection it runs on) failed; the request's blocks hold no usable KV."""


class TransferTimeout(TransferError):
    """A transfer did not finish in time: the peer stalled or died without closing its connection."""


class KVLayoutMismatch(TransferError):
    """Sender and receiver disagree on the KV layout; moving bytes between them would garble the cache."""
