"""Stopping background tasks that talk to Redis.

A task cancelled while redis-py's asyncio client is inside a command can have the CancelledError
swallowed (a known redis-py behaviour), and then runs on as if nothing happened. So tasks are
stopped by cancelling them again until they end, never by waiting forever on the first cancel.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

logger = logging.getLogger(__name__)


async def stop_tasks(tasks: Iterable[asyncio.Task], timeout_s: float = 5.0, rounds: int = 5) -> None:
    pending = {t for t in tasks if not t.done()}
    for _ in range(rounds):
        if not pending:
            return
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=timeout_s / rounds)
    for task in pending:
        logger.warning("task %s did not stop", task.get_name())
