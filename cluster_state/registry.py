"""The worker registry: who serves the cluster, where, and which incarnation.

Each worker registers a record (id, role, node, transfer endpoint, KV layout, capacity) with a
generation number taken by INCR at every start, under a lease (the record's TTL) that its
heartbeats renew. Routers list the live records; a worker whose lease lapsed is simply gone.
The generation is what tells a restarted worker from its dead predecessor: tickets and KV pushes
carry it and are refused when it is not the current one.

Scripts make each heartbeat and re-registration atomic and refuse to touch a record that a newer
generation of the same worker owns, so a zombie cannot overwrite its successor.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from cluster_state.keys import ClusterKeys
from cluster_state.load import LoadReport
from cluster_state.records import JsonRecord

# Registers (or re-registers) a record under a generation. A generation below the counter means
# a newer incarnation exists: refused, returning minus the counter.
_REGISTER = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local generation = tonumber(ARGV[1])
if current > generation then return -current end
if current < generation then redis.call('SET', KEYS[1], generation) end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'generation', generation, 'record', ARGV[2], 'load', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('SADD', KEYS[3], ARGV[5])
return generation
"""
# KEYS: the record, then the worker's KV index keys, which share its lease.
# 1: renewed; 0: the record is gone (expired, or Redis lost it): register again;
# -1: another generation owns it (this worker was replaced).
_HEARTBEAT = """
local generation = redis.call('HGET', KEYS[1], 'generation')
if not generation then return 0 end
if tonumber(generation) ~= tonumber(ARGV[1]) then return -1 end
redis.call('HSET', KEYS[1], 'load', ARGV[2])
for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
return 1
"""
# Deletes the record only if this generation still owns it.
_DEREGISTER = """
local generation = redis.call('HGET', KEYS[1], 'generation')
if generation and tonumber(generation) == tonumber(ARGV[1]) then redis.call('DEL', KEYS[1]) end
return 1
"""

HEARTBEAT_RENEWED, HEARTBEAT_MISSING, HEARTBEAT_SUPERSEDED = 1, 0, -1


class SupersededError(RuntimeError):
    """A newer generation of this worker is registered: this process must stop serving."""


@dataclass(frozen=True)
class WorkerRecord(JsonRecord):
    worker_id: str  # stable across restarts, e.g. "decode-0"
    role: str  # prefill | decode | mixed
    actor_name: str  # the Ray actor's name (namespace "pdserve")
    node_ip: str
    pid: int
    endpoint: str | None  # the KV receiver's control endpoint (decode), None otherwise
    transfer_backend: str
    kv_layout: dict = field(default_factory=dict)  # model, dtype, block_size, layers, kv heads, head dim
    max_num_seqs: int = 1
    num_blocks: int = 0
    bytes_per_block: int = 0
    max_model_len: int = 0
    generation: int = 0  # 0 until registered
    started_at: float = 0.0

    @property
    def block_size(self) -> int:
        return int(self.kv_layout.get("block_size", 16))



@dataclass(frozen=True)
class LiveWorker:
    """A registered worker as a router reads it: its record and its latest load report."""

    record: WorkerRecord
    load: LoadReport

    @property
    def key(self) -> tuple[str, int]:
        return self.record.worker_id, self.record.generation


class WorkerRegistry:
    def __init__(self, redis, keys: ClusterKeys) -> None:
        self.redis = redis
        self.keys = keys
        self._register = redis.register_script(_REGISTER)
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._deregister = redis.register_script(_DEREGISTER)

    async def next_generation(self, worker_id: str) -> int:
        """The generation of a new start: one more than any before it."""
        return int(await self.redis.incr(self.keys.generation(worker_id)))

    async def register(self, record: WorkerRecord, load: LoadReport, ttl_s: float) -> WorkerRecord:
        """Write the record under its generation (from next_generation, or the one this process
        already holds when Redis lost it). Raises SupersededError when a newer one exists."""
        if record.generation < 1:
            raise ValueError("take a generation with next_generation() first")
        record = dataclasses.replace(record, started_at=record.started_at or time.time())
        result = int(await self._register(
            keys=[self.keys.generation(record.worker_id), self.keys.worker(record.worker_id),
                  self.keys.workers],
            args=[record.generation, record.to_json(), load.to_json(), int(ttl_s * 1000), record.worker_id]))
        if result < 0:
            raise SupersededError(
                f"{record.worker_id}: generation {-result} is registered, this is {record.generation}")
        return record

    async def heartbeat(self, record: WorkerRecord, load: LoadReport, ttl_s: float) -> int:
        """Renew the lease (the record's and its KV index keys') and publish the load;
        HEARTBEAT_RENEWED / _MISSING / _SUPERSEDED."""
        worker_id, generation = record.worker_id, record.generation
        keys = [self.keys.worker(worker_id), self.keys.kv_blocks(worker_id, generation),
                self.keys.kv_seq(worker_id, generation)]
        return int(await self._heartbeat(keys=keys,
                                         args=[record.generation, load.to_json(), int(ttl_s * 1000)]))

    async def deregister(self, record: WorkerRecord) -> None:
        await self._deregister(keys=[self.keys.worker(record.worker_id)], args=[record.generation])

    async def live_workers(self) -> dict[str, LiveWorker]:
        """Every worker whose lease is live, by worker id (two round trips)."""
        ids = sorted(i.decode() for i in await self.redis.smembers(self.keys.workers))
        if not ids:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for worker_id in ids:
            pipe.hmget(self.keys.worker(worker_id), "record", "load")
        live = {}
        for worker_id, (record, load) in zip(ids, await pipe.execute()):
            if record is None:
                continue
            live[worker_id] = LiveWorker(WorkerRecord.from_json(record),
                                         LoadReport.from_json(load) if load else LoadReport())
        return live
