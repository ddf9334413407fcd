"""The KV block index as a router holds it: block hash -> the workers that cache that block.

Every router keeps its own copy in memory, built from the workers' block sets in Redis (their
snapshots) and kept current by following the `kv_events` stream, so a routing decision asks no
one: "the longest cached prefix of this prompt on each worker" is one pass over the prompt's
chained block hashes. When Redis is unreachable the copy stays as it was (the last known state)
and is rebuilt from the snapshots once Redis answers again, whether it restarted empty or not.

Consistency: a worker publishes its stored / evicted hashes once per publish interval, and the
follower applies each batch as soon as the stream delivers it, so the index claims an evicted
block for at most one publish interval (plus a stream round trip). Batches carry a per-worker
sequence number; a batch that does not follow the last applied one means something was missed
(a trimmed stream, a Redis restart), and the follower resyncs from the snapshots.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence

from cluster_state.connection import Backoff, is_redis_error
from cluster_state.keys import ClusterKeys
from cluster_state.kv_events import KVEventBatch, unpack_blob

logger = logging.getLogger(__name__)

WorkerKey = tuple[str, int]  # (worker id, generation)
# A worker whose snapshot just arrived may not be in a router's registry view yet.
_GRACE_S = 5.0

# KEYS: the stream, then (block set, seq key) per worker. Returns the stream's last id and, per
# worker, its applied batch count and its block set, all read at one instant.
_SNAPSHOT = """
local out = {}
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if last[1] then out[1] = last[1][1] else out[1] = '0-0' end
for i = 2, #KEYS, 2 do
  out[#out + 1] = redis.call('GET', KEYS[i + 1]) or '0'
  out[#out + 1] = redis.call('SMEMBERS', KEYS[i])
end
return out
"""


class BlockIndex:
    """hash -> holders and worker -> hashes, plus each worker's last applied batch.

    Invariant: h in blocks[w] exactly when w in holders[h]; holders has no empty sets.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.holders: dict[int, set[WorkerKey]] = {}
        self.blocks: dict[WorkerKey, set[int]] = {}
        self.seqs: dict[WorkerKey, int] = {}
        self._since: dict[WorkerKey, float] = {}
        self._clock = clock

    def replace(self, key: WorkerKey, hashes: Iterable[int], seq: int) -> None:
        """A worker's whole cache, as of batch `seq`."""
        self.drop(key)
        stored = set(hashes)
        self.blocks[key] = stored
        for h in stored:
            self.holders.setdefault(h, set()).add(key)
        self.seqs[key] = seq
        self._since[key] = self._clock()

    def apply(self, batch: KVEventBatch) -> bool:
        """Apply one stream batch; False when it does not follow what is known (resync needed)."""
        key = (batch.worker_id, batch.generation)
        if batch.snapshot:
            self.replace(key, batch.stored, batch.seq)
            return True
        last = self.seqs.get(key)
        if last is not None and batch.seq <= last:
            return True  # already part of the snapshot this index was built from
        if last is None or batch.seq != last + 1:
            return False
        stored = self.blocks[key]
        for h in batch.evicted:
            if h in stored:
                stored.discard(h)
                holders = self.holders[h]
                holders.discard(key)
                if not holders:
                    del self.holders[h]
        for h in batch.stored:
            if h not in stored:
                stored.add(h)
                self.holders.setdefault(h, set()).add(key)
        self.seqs[key] = batch.seq
        return True

    def drop(self, key: WorkerKey) -> None:
        for h in self.blocks.pop(key, ()):
            holders = self.holders[h]
            holders.discard(key)
            if not holders:
                del self.holders[h]
        self.seqs.pop(key, None)
        self._since.pop(key, None)

    def retain(self, live: set[WorkerKey]) -> None:
        """Forget workers that left the registry (a lapsed lease, a newer generation)."""
        now = self._clock()
        for key in [k for k in self.blocks if k not in live]:
            if now - self._since.get(key, 0.0) > _GRACE_S:
                self.drop(key)

    def clear(self) -> None:
        self.holders.clear()
        self.blocks.clear()
        self.seqs.clear()
        self._since.clear()

    def workers_holding(self, block_hash: int) -> set[WorkerKey]:
        return set(self.holders.get(block_hash, ()))

    def longest_prefixes(self, hashes: Sequence[int], workers: Iterable[WorkerKey]) -> dict[WorkerKey, int]:
        """For each worker, how many of `hashes` (a prompt's chained block hashes, in order) it
        caches from the start."""
        result = {key: 0 for key in workers}
        matching = set(result)
        for depth, h in enumerate(hashes):
            matching &= self.holders.get(h, set())
            if not matching:
                break
            for key in matching:
                result[key] = depth + 1
        return result


class BlockIndexFollower:
    """Keeps a BlockIndex in step with Redis: resync from the snapshots, then follow the stream.

    `live_workers()` returns the (worker id, generation) pairs whose snapshots to read.
    """

    def __init__(self, redis, keys: ClusterKeys, live_workers: Callable[[], Iterable[WorkerKey]],
                 index: BlockIndex | None = None, block_s: float = 1.0) -> None:
        self.redis = redis
        self.keys = keys
        self.live_workers = live_workers
        self.index = index or BlockIndex()
        self.block_s = block_s
        self.connected = False  # False while Redis is unreachable: the index is the last known state
        self.resyncs = 0
        self._snapshot = redis.register_script(_SNAPSHOT)
        self._last_id = b"0-0"
        self._needs_resync = True

    async def run(self) -> None:
        backoff = Backoff()
        while True:
            try:
                await self.poll_once()
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                if not is_redis_error(err):
                    logger.exception("KV index follower failed; resyncing")
                elif self.connected:
                    logger.warning("KV index: Redis unreachable (%s); routing on the last known index", err)
                self.connected = False
                self._needs_resync = True
                await asyncio.sleep(backoff.next_delay())

    async def poll_once(self, block_s: float | None = None) -> int:
        """Resync if needed, then apply what the stream holds (waiting up to block_s for it).
        Returns the number of batches applied."""
        if self._needs_resync:
            await self.resync()
        block_ms = int((self.block_s if block_s is None else block_s) * 1000)
        reply = await self.redis.xread({self.keys.kv_events: self._last_id}, block=block_ms or None, count=500)
        self.connected = True
        applied = 0
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                self._last_id = entry_id
                if not self.index.apply(KVEventBatch.from_stream_fields(fields)):
                    self._needs_resync = True
                    return applied
                applied += 1
        return applied

    async def resync(self) -> None:
        """Rebuild the whole index from the workers' block sets, at one instant of Redis."""
        workers = sorted(set(self.live_workers()))
        keys = [self.keys.kv_events]
        for worker_id, generation in workers:
            keys += [self.keys.kv_blocks(worker_id, generation), self.keys.kv_seq(worker_id, generation)]
        reply = await self._snapshot(keys=keys, args=[])
        self.index.clear()
        for i, key in enumerate(workers):
            seq, members = int(reply[1 + 2 * i]), reply[2 + 2 * i]
            if seq:
                self.index.replace(key, unpack_blob(b"".join(members)), seq)
        self._last_id = reply[0]
        self._needs_resync = False
        self.connected = True
        self.resyncs += 1
