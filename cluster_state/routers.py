"""The routers of a cluster and the pools they share.

Routers register under a lease like workers do, so a stopping router can tell whether it is the
last one (the last one takes the pools down with it; a killed one takes nothing). The pool spec
is written once by the router that creates the pools; every later router attaches to the actors
it names. A creation lock with a TTL keeps two routers starting at once from both creating pools,
and frees itself if its holder dies mid-way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from cluster_state.keys import ClusterKeys
from cluster_state.records import JsonRecord

# Deregisters a router and returns how many other routers still hold a live lease, atomically,
# so two routers stopping together cannot both believe the other one stays.
_LEAVE = """
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
local others = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('EXISTS', ARGV[2] .. id) == 1 then others = others + 1
  else redis.call('SREM', KEYS[2], id) end
end
return others
"""
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class PoolSpec(JsonRecord):
    """What a joining router needs to attach to pools another router created."""

    mode: str  # disaggregated | colocated
    model: str  # as the creator was given it ("demo", a path): joiners load its tokenizer
    workers: dict[str, str] = field(default_factory=dict)  # worker id -> Ray actor name
    created_by: str = ""
    created_at: float = 0.0
    options: dict = field(default_factory=dict)  # the creator's pool and engine settings, for the record



class RouterRegistry:
    def __init__(self, redis, keys: ClusterKeys, router_id: str) -> None:
        self.redis = redis
        self.keys = keys
        self.router_id = router_id
        self._leave = redis.register_script(_LEAVE)
        self._release = redis.register_script(_RELEASE_LOCK)

    async def heartbeat(self, record: dict, ttl_s: float) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.keys.router(self.router_id), "record", json.dumps(record))
        pipe.pexpire(self.keys.router(self.router_id), int(ttl_s * 1000))
        pipe.sadd(self.keys.routers, self.router_id)
        await pipe.execute()

    async def leave(self) -> int:
        """Deregister; returns the number of other live routers."""
        return int(await self._leave(keys=[self.keys.router(self.router_id), self.keys.routers],
                                     args=[self.router_id, self.keys.router("")]))

    async def others_alive(self, wait_s: float) -> list[str]:
        """Other routers seen heartbeating within wait_s (their lease TTL went up): a router
        killed just now still has a live lease, but renews it no more."""
        import asyncio

        others = [r for r in await self.live_routers() if r != self.router_id]
        if not others:
            return []
        first = {r: await self.redis.pttl(self.keys.router(r)) for r in others}
        await asyncio.sleep(wait_s)
        return [r for r in others if await self.redis.pttl(self.keys.router(r)) > first[r]]

    async def live_routers(self) -> list[str]:
        ids = sorted(i.decode() for i in await self.redis.smembers(self.keys.routers))
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for router_id in ids:
            pipe.exists(self.keys.router(router_id))
        return [rid for rid, alive in zip(ids, await pipe.execute()) if alive]

    # --- the pools ---------------------------------------------------------------------
    async def read_pools(self) -> PoolSpec | None:
        raw = await self.redis.get(self.keys.pools)
        return PoolSpec.from_json(raw) if raw else None

    async def write_pools(self, spec: PoolSpec) -> None:
        await self.redis.set(self.keys.pools, spec.to_json())

    async def forget_pools(self) -> None:
        await self.redis.delete(self.keys.pools)

    async def lock_pools(self, ttl_s: float) -> bool:
        """Take the creation lock; False when another router holds it."""
        return bool(await self.redis.set(self.keys.pools_lock, self.router_id, nx=True, px=int(ttl_s * 1000)))

    async def unlock_pools(self) -> None:
        await self._release(keys=[self.keys.pools_lock], args=[self.router_id])

    async def delete_cluster_keys(self) -> int:
        """Every key of this cluster (`pdserve down`); returns how many were deleted."""
        deleted = 0
        async for key in self.redis.scan_iter(match=self.keys.pattern, count=500):
            deleted += await self.redis.delete(key)
        return deleted
