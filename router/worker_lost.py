"""The failure a request survives: the worker running it died, restarted or lost its KV."""
from __future__ import annotations

from typing import Any

from router.backend import BackendError


class WorkerLost(BackendError):
    """A worker a request depended on is gone (dead, restarting, a new incarnation) or failed
    the request's KV transfer. The request resumes elsewhere with the tokens it already has."""

    def __init__(self, worker: Any, message: str) -> None:
        super().__init__(message)
        self.worker = worker
