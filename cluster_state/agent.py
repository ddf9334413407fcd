"""A worker's presence in the cluster: registration, heartbeat and load, KV events, peers.

Runs as one task on the worker's event loop. Every publish interval (100 ms by default) it
renews the lease and publishes the load in one script call, and applies the prefix-cache events
gathered since the last interval in another. When Redis is unreachable it keeps the worker
serving, retries with backoff, and when Redis answers again without its record (expired, or a
Redis that restarted empty) it registers again under the same generation and republishes a
full snapshot of its cache, from which the routers rebuild their index.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cluster_state.connection import Backoff, RedisSettings, connect, is_redis_error, redacted_url
from cluster_state.keys import ClusterKeys
from cluster_state.kv_events import KVEventPublisher
from cluster_state.load import LoadReport
from cluster_state.registry import (HEARTBEAT_MISSING, HEARTBEAT_SUPERSEDED, LiveWorker, SupersededError,
                                    WorkerRecord, WorkerRegistry)

logger = logging.getLogger(__name__)

# (stored, evicted) hashes since the last call; both may be empty.
DrainEvents = Callable[[], tuple[list[int], list[int]]]
# Every cached hash now, with the pending events discarded at the same instant.
TakeSnapshot = Callable[[], Awaitable[set[int]]]


@dataclass(frozen=True)
class AgentConfig:
    publish_interval_s: float = 0.1  # load and KV events at least this often
    lease_ttl_s: float = 3.0  # a worker that stops heartbeating leaves routing within this
    peer_refresh_s: float = 1.0  # how often the registry is read for peers

    def __post_init__(self) -> None:
        if not 0 < self.publish_interval_s < self.lease_ttl_s:
            raise ValueError("the publish interval must be positive and shorter than the lease TTL")


class EngineLike(Protocol):
    """What `WorkerAgent.for_engine` uses of an engine.background.BackgroundEngine."""

    load: Any  # an EngineLoad: its fields are LoadReport's
    engine: Any

    def call(self, fn: Callable[[Any], Any]) -> Any: ...  # a concurrent.futures.Future


class WorkerAgent:
    @classmethod
    def for_engine(cls, settings: RedisSettings, keys: ClusterKeys, record: WorkerRecord,
                   background: EngineLike, config: AgentConfig,
                   extra_load: Callable[[], dict] | None = None) -> "WorkerAgent":
        """An agent publishing a running engine's load and prefix-cache events."""
        from cluster_state.presence import load_report

        events = background.engine.enable_kv_events()

        def load() -> LoadReport:
            return load_report(background.load, **(extra_load() if extra_load else {}))

        async def snapshot() -> set[int]:
            def take(engine) -> set[int]:  # on the engine thread: the set and the log agree
                events.clear()
                return engine.kv_manager.cached_block_hashes()
            return await asyncio.wrap_future(background.call(take))

        return cls(settings, keys, record, load, events.drain, snapshot, config)

    def __init__(self, settings: RedisSettings, keys: ClusterKeys, record: WorkerRecord,
                 load: Callable[[], LoadReport], drain_events: DrainEvents | None = None,
                 snapshot: TakeSnapshot | None = None, config: AgentConfig = AgentConfig()) -> None:
        self.settings = settings
        self.keys = keys
        self.record = record
        self.load = load
        self.drain_events = drain_events
        self.snapshot = snapshot
        self.config = config
        self.redis = connect(settings)
        self.registry = WorkerRegistry(self.redis, keys)
        self.publisher = KVEventPublisher(self.redis, keys, record.worker_id)
        self.peers: dict[str, LiveWorker] = {}  # the registry as last read
        self.superseded = False
        self.connected = False
        self._needs_snapshot = True
        self._peers_read_at = 0.0

    @property
    def generation(self) -> int:
        return self.record.generation

    async def register(self, timeout_s: float = 60.0) -> WorkerRecord:
        """Take a new generation and register; waits for Redis (with backoff) up to timeout_s."""
        deadline = time.monotonic() + timeout_s
        backoff = Backoff()
        while True:
            try:
                generation = await self.registry.next_generation(self.record.worker_id)
                self.record = dataclasses.replace(self.record, generation=generation)
                self.record = await self.registry.register(self.record, self.load(), self.config.lease_ttl_s)
                await self._publish_snapshot()
                self.connected = True
                logger.info("%s registered as generation %d", self.record.worker_id, generation)
                return self.record
            except Exception as err:
                if not is_redis_error(err) or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.record.worker_id} could not register with Redis at "
                        f"{redacted_url(self.settings.url)}: {err}") from err
                await asyncio.sleep(backoff.next_delay())

    async def run(self) -> None:
        """Heartbeat, load and KV events until cancelled or superseded."""
        backoff = Backoff()
        interval = self.config.publish_interval_s
        while not self.superseded:
            started = time.monotonic()
            try:
                await self.tick()
                if not self.connected:
                    logger.warning("%s: Redis is back", self.record.worker_id)
                self.connected = True
                backoff.reset()
                await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
            except asyncio.CancelledError:
                raise
            except SupersededError as err:
                logger.error("%s stops publishing: %s", self.record.worker_id, err)
                self.superseded = True
            except Exception as err:
                if not is_redis_error(err):
                    logger.exception("%s: publishing to Redis failed", self.record.worker_id)
                elif self.connected:
                    logger.warning("%s: Redis unreachable (%s); serving on, retrying", self.record.worker_id, err)
                self.connected = False
                self._needs_snapshot = True  # events may have been lost with the connection
                await asyncio.sleep(backoff.next_delay())

    async def tick(self) -> None:
        """One publish interval's work."""
        status = await self.registry.heartbeat(self.record, self.load(), self.config.lease_ttl_s)
        if status == HEARTBEAT_SUPERSEDED:
            raise SupersededError(f"{self.record.worker_id}: a newer generation took the record")
        if status == HEARTBEAT_MISSING:
            logger.warning("%s: registry record missing (lease lapsed or Redis restarted); "
                           "registering again", self.record.worker_id)
            self.record = await self.registry.register(self.record, self.load(), self.config.lease_ttl_s)
            self._needs_snapshot = True
        if self._needs_snapshot:
            await self._publish_snapshot()
        else:
            await self._publish_events()
        if time.monotonic() - self._peers_read_at >= self.config.peer_refresh_s:
            self.peers = await self.registry.live_workers()
            self._peers_read_at = time.monotonic()

    async def _publish_events(self) -> None:
        if self.drain_events is None:
            return
        stored, evicted = self.drain_events()
        if stored or evicted:
            await self.publisher.publish(self.generation, stored, evicted, False, self.config.lease_ttl_s)

    async def _publish_snapshot(self) -> None:
        if self.snapshot is None:
            self._needs_snapshot = False
            return
        hashes = await self.snapshot()
        await self.publisher.publish(self.generation, sorted(hashes), [], True, self.config.lease_ttl_s)
        self._needs_snapshot = False

    async def close(self) -> None:
        """Leave the registry now (a clean stop), rather than when the lease lapses."""
        try:
            if self.record.generation and not self.superseded:
                await self.registry.deregister(self.record)
                await self.publisher.forget(self.generation)
        except Exception as err:
            logger.debug("%s deregister: %s", self.record.worker_id, err)
        finally:
            await self.redis.aclose()
