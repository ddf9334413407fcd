"""Workers' prefix-cache events on their way into Redis.

A worker publishes, once per publish interval, the block hashes its prefix cache stored and
evicted since the last batch. One script applies a batch atomically: the worker's block set
(`kv_blocks:{id}:{generation}`, the snapshot a late router reads; its TTL is the worker's lease,
renewed with each heartbeat), its batch counter (`kv_seq`),
and one entry on the cluster's `kv_events` stream (what running routers follow). So the set and
the stream never disagree, and a router that reads the set and the counter together knows exactly
which later stream entries to apply. A snapshot batch replaces the set wholesale: a worker sends
one when it registers and whenever Redis may have lost its state.

Hashes travel as 8-byte little-endian strings; a stream entry packs them end to end.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from cluster_state.keys import ClusterKeys

STREAM_MAXLEN = 10_000  # entries kept (approximately); a router further behind resyncs from the sets
_LUA_CHUNK = 4000  # members per SADD / SREM call (Lua's unpack has a stack limit)

# KEYS: block set, seq key, stream. ARGV: worker id, generation, snapshot flag, ttl ms, maxlen,
# number of stored hashes, then the stored and the evicted hashes.
_PUBLISH = """
local n_stored = tonumber(ARGV[6])
local stored, evicted = {}, {}
for i = 7, 6 + n_stored do stored[#stored + 1] = ARGV[i] end
for i = 7 + n_stored, #ARGV do evicted[#evicted + 1] = ARGV[i] end
local snapshot = ARGV[3] == '1'
if snapshot then redis.call('DEL', KEYS[1]) end
for i = 1, #stored, %(chunk)d do
  redis.call('SADD', KEYS[1], unpack(stored, i, math.min(i + %(chunk)d - 1, #stored)))
end
if not snapshot then
  for i = 1, #evicted, %(chunk)d do
    redis.call('SREM', KEYS[1], unpack(evicted, i, math.min(i + %(chunk)d - 1, #evicted)))
  end
end
local seq = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'w', ARGV[1], 'g', ARGV[2], 's', seq,
           'snap', ARGV[3], 'add', table.concat(stored), 'del', table.concat(evicted))
return seq
""" % {"chunk": _LUA_CHUNK}


def pack_hashes(hashes: Iterable[int]) -> list[bytes]:
    return [struct.pack("<Q", h) for h in hashes]


def unpack_blob(blob: bytes) -> list[int]:
    if len(blob) % 8:
        raise ValueError(f"a packed hash list has {len(blob)} bytes, not a multiple of 8")
    return list(struct.unpack(f"<{len(blob) // 8}Q", blob))


@dataclass(frozen=True)
class KVEventBatch:
    """One entry of the kv_events stream, decoded."""

    worker_id: str
    generation: int
    seq: int
    snapshot: bool  # True: `stored` is the worker's whole cache, replacing what was known
    stored: tuple[int, ...]
    evicted: tuple[int, ...]

    @classmethod
    def from_stream_fields(cls, fields: dict[bytes, bytes]) -> "KVEventBatch":
        return cls(worker_id=fields[b"w"].decode(), generation=int(fields[b"g"]), seq=int(fields[b"s"]),
                   snapshot=fields[b"snap"] == b"1", stored=tuple(unpack_blob(fields[b"add"])),
                   evicted=tuple(unpack_blob(fields[b"del"])))


class KVEventPublisher:
    """Worker side: applies batches of this worker's events to Redis."""

    def __init__(self, redis, keys: ClusterKeys, worker_id: str) -> None:
        self.redis = redis
        self.keys = keys
        self.worker_id = worker_id
        self._publish = redis.register_script(_PUBLISH)

    async def publish(self, generation: int, stored: list[int], evicted: list[int],
                      snapshot: bool, ttl_s: float) -> int:
        """Apply one batch; returns its sequence number. `stored` and `evicted` must be
        disjoint (a batch is the net change since the previous one)."""
        keys = [self.keys.kv_blocks(self.worker_id, generation), self.keys.kv_seq(self.worker_id, generation),
                self.keys.kv_events]
        args = [self.worker_id, generation, "1" if snapshot else "0", int(ttl_s * 1000), STREAM_MAXLEN,
                len(stored), *pack_hashes(stored), *([] if snapshot else pack_hashes(evicted))]
        return int(await self._publish(keys=keys, args=args))

    async def forget(self, generation: int) -> None:
        await self.redis.delete(self.keys.kv_blocks(self.worker_id, generation),
                                self.keys.kv_seq(self.worker_id, generation))
