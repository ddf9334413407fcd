"""Health that tells the truth: SERVING only while the cluster can serve a request.

A load balancer or a Kubernetes probe reads the gRPC health service; it must see NOT_SERVING
while the decode pool is empty (its only worker died and Ray is bringing it back), and SERVING
again once it is back, without anyone restarting the router.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)


async def follow_health(can_serve: Callable[[], bool], set_serving: Callable[[bool], Awaitable[None]],
                        period_s: float = 0.25) -> None:
    """Mirror can_serve() into the health service until cancelled."""
    serving: bool | None = None
    while True:
        now = bool(can_serve())
        if now != serving:
            if serving is not None:
                (logger.info if now else logger.warning)(
                    "health: %s", "SERVING again" if now else "NOT_SERVING: no worker can serve requests now")
            await set_serving(now)
            serving = now
        await asyncio.sleep(period_s)
