"""Per-API-key rate limits shared by every router: token buckets in Redis.

Each key has two buckets, requests per minute and tokens per minute, refilled continuously at
their rate and drained by one atomic script, so routers that admit requests of the same key at
the same instant still never let it past its limit together. A request takes one request and its
prompt tokens plus max_tokens up front; what it did not generate is given back when it ends (a
bucket may then exceed nothing: it is capped at its size). A refused request learns how long to
wait (retry-after) until the bucket holds enough.

The API key itself never reaches Redis: buckets are named by a hash of it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cluster_state.keys import ClusterKeys

WINDOW_S = 60.0

# KEYS: the request bucket, the token bucket. ARGV: now (ms), rpm, tpm, token cost.
# A limit of 0 means unlimited. Returns {1, 0} when admitted, else {0, retry-after ms}.
_TAKE = """
local now = tonumber(ARGV[1])
local function level(key, size)
  local state = redis.call('HMGET', key, 'level', 'at')
  local value, at = tonumber(state[1]), tonumber(state[2])
  if value == nil then return size end
  return math.min(size, value + (now - at) * size / 60000)
end
local limits = {tonumber(ARGV[2]), tonumber(ARGV[3])}
local costs = {1, tonumber(ARGV[4])}
local levels = {}
local wait = 0
for i = 1, 2 do
  if limits[i] > 0 then
    levels[i] = level(KEYS[i], limits[i])
    if levels[i] < costs[i] then
      wait = math.max(wait, math.ceil((costs[i] - levels[i]) * 60000 / limits[i]))
    end
  end
end
if wait > 0 then return {0, wait} end
for i = 1, 2 do
  if limits[i] > 0 then
    redis.call('HSET', KEYS[i], 'level', levels[i] - costs[i], 'at', now)
    redis.call('PEXPIRE', KEYS[i], 120000)
  end
end
return {1, 0}
"""
# KEYS: the token bucket. ARGV: now (ms), tpm, tokens given back.
_GIVE_BACK = """
local now = tonumber(ARGV[1])
local size = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'level', 'at')
local value, at = tonumber(state[1]), tonumber(state[2])
if value == nil then return 0 end
value = math.min(size, value + (now - at) * size / 60000 + tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'level', value, 'at', now)
return 1
"""


@dataclass(frozen=True)
class RateLimit:
    requests_per_minute: int = 0  # 0: unlimited
    tokens_per_minute: int = 0  # prompt + completion tokens; 0: unlimited

    @property
    def unlimited(self) -> bool:
        return self.requests_per_minute <= 0 and self.tokens_per_minute <= 0


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float = 0.0


def key_id(api_key: str) -> str:
    """What names a key's buckets: a hash, so Redis never holds the key."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:32]


class RateLimiter:
    def __init__(self, redis, keys: ClusterKeys, limit: RateLimit) -> None:
        self.redis = redis
        self.keys = keys
        self.limit = limit
        self._take = redis.register_script(_TAKE)
        self._give_back = redis.register_script(_GIVE_BACK)

    def _buckets(self, api_key: str) -> list[str]:
        base = f"{self.keys.base}:ratelimit:{key_id(api_key)}"
        return [base + ":requests", base + ":tokens"]

    async def take(self, api_key: str, tokens: int, now_s: float) -> Decision:
        if self.limit.unlimited:
            return Decision(True)
        allowed, wait_ms = await self._take(keys=self._buckets(api_key), args=[
            int(now_s * 1000), self.limit.requests_per_minute, self.limit.tokens_per_minute, tokens])
        return Decision(bool(allowed), int(wait_ms) / 1000)

    async def give_back(self, api_key: str, tokens: int, now_s: float) -> None:
        if self.limit.tokens_per_minute > 0 and tokens > 0:
            await self._give_back(keys=self._buckets(api_key)[1:], args=[
                int(now_s * 1000), self.limit.tokens_per_minute, tokens])
