"""The router's view of the cluster: which workers serve, their generations and their load.

Refreshed from the registry every interval (100 ms by default), so every router routes on the
same published load, and from this router's own traffic (admit replies and token batches carry
the worker's load too), so its own decisions never wait for the next refresh. A worker whose
lease lapsed leaves routing at the next refresh. When Redis is unreachable, or comes back empty
(restarted) and the workers have not registered again yet, the view keeps the last known state
for a grace period instead of emptying the cluster.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from cluster_state.connection import Backoff, is_redis_error
from cluster_state.registry import LiveWorker, WorkerRegistry
from router.pools.handle import WorkerHandle

logger = logging.getLogger(__name__)

RAY_NAMESPACE = "pdserve"


class ClusterView:
    def __init__(self, registry: WorkerRegistry | None, lease_ttl_s: float,
                 refresh_s: float = 0.1, presence_key: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        # A key this router keeps alive (its own registry record): when it is missing, Redis
        # lost its state (a restart) and the workers' records may not be back yet either.
        self.presence_key = presence_key
        self.refresh_s = refresh_s
        # After Redis trouble, a worker missing from the registry stays routable this long: it
        # re-registers within one heartbeat of Redis answering again.
        self.grace_s = 2 * lease_ttl_s
        self.workers: dict[str, WorkerHandle] = {}
        self.connected = registry is not None
        self._clock = clock
        self._trouble_at = -1e9  # last Redis error or state loss seen
        self._on_new: list[Callable[[WorkerHandle], None]] = []
        self._on_generation: list[Callable[[WorkerHandle, int], None]] = []
        self.refreshes = 0

    # --- callbacks --------------------------------------------------------------------
    def on_new_worker(self, callback: Callable[[WorkerHandle], None]) -> None:
        self._on_new.append(callback)

    def on_generation_change(self, callback: Callable[[WorkerHandle, int], None]) -> None:
        """callback(handle, old_generation): the worker restarted; what ran on the old one is gone."""
        self._on_generation.append(callback)

    # --- membership ---------------------------------------------------------------------
    def add(self, handle: WorkerHandle) -> WorkerHandle:
        known = self.workers.get(handle.worker_id)
        if known is not None:
            return known
        self.workers[handle.worker_id] = handle
        for callback in self._on_new:
            callback(handle)
        return handle

    def routable(self, handle: WorkerHandle) -> bool:
        if not handle.healthy or not handle.info:
            return False
        if handle.registered or self.registry is None:
            return True
        return self._clock() - self._trouble_at < self.grace_s

    def of_role(self, role: str, routable_only: bool = True) -> list[WorkerHandle]:
        workers = [w for w in self.workers.values() if w.role == role]
        return [w for w in workers if self.routable(w)] if routable_only else workers

    def note_failure(self, handle: WorkerHandle, err: BaseException) -> None:
        """A call found the actor dead or restarting: no new request goes to it until it
        registers again (a new generation, or the same one once Ray says it is back)."""
        if handle.healthy:
            logger.error("%s is unavailable; no new requests go to it: %s", handle.name, err)
        handle.healthy = False

    def note_alive(self, handle: WorkerHandle, generation: int) -> None:
        """A call just succeeded on the worker at `generation`."""
        self._set_generation(handle, generation)
        if not handle.healthy and handle.generation == generation:
            logger.info("%s is back (generation %d)", handle.name, generation)
            handle.healthy = True

    # --- refresh ------------------------------------------------------------------------
    async def run(self) -> None:
        backoff = Backoff()
        while True:
            try:
                await self.refresh()
                backoff.reset()
                await asyncio.sleep(self.refresh_s)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                if not is_redis_error(err):
                    logger.exception("refreshing the worker registry failed")
                elif self.connected:
                    logger.warning("Redis unreachable (%s): routing on the last known workers and load", err)
                self.connected = False
                self._trouble_at = self._clock()
                await asyncio.sleep(backoff.next_delay())

    async def refresh(self) -> None:
        live = await self.registry.live_workers()
        if self.presence_key is not None and not await self.registry.redis.exists(self.presence_key):
            self._trouble_at = self._clock()
        if not self.connected:
            logger.warning("Redis answers again: %d workers registered", len(live))
        self.connected = True
        for worker_id, worker in live.items():
            self._apply(worker_id, worker)
        for handle in self.workers.values():
            handle.registered = handle.worker_id in live
        self.refreshes += 1

    def _apply(self, worker_id: str, live: LiveWorker) -> None:
        handle = self.workers.get(worker_id)
        if handle is None:
            handle = self._attach(live)
            if handle is None:
                return
        old = handle.generation
        handle.record = live.record
        handle.update_load(live.load)
        if live.record.generation > old:
            self._set_generation(handle, live.record.generation, old)
            handle.healthy = True  # a fresh incarnation registered

    def _attach(self, live: LiveWorker) -> WorkerHandle | None:
        """A worker the registry lists that this router has no handle for yet."""
        import ray

        try:
            actor = ray.get_actor(live.record.actor_name, namespace=RAY_NAMESPACE)
        except ValueError:
            return None  # registered, but its actor is gone (a pool being torn down)
        info = {"layout": live.record.kv_layout, "max_model_len": live.record.max_model_len,
                "endpoint": live.record.endpoint, "generation": live.record.generation}
        return self.add(WorkerHandle(live.record.worker_id, live.record.role, actor, live.record,
                                     live.load, info))

    def _set_generation(self, handle: WorkerHandle, generation: int, old: int | None = None) -> None:
        old = handle.generation if old is None else old
        if generation == old or generation < old:
            return
        handle.info = {**handle.info, "generation": generation}
        if handle.record is not None and handle.record.generation != generation:
            handle.record = None  # the registry's next read brings the new record
        logger.info("%s restarted: generation %d -> %d", handle.name, old, generation)
        for callback in self._on_generation:
            callback(handle, old)
