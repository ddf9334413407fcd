"""Per-key token buckets in a real redis-server, shared by every router that uses them."""
from __future__ import annotations

import asyncio

import pytest

from cluster_state import ClusterKeys, RedisSettings, connect
from cluster_state.rate_limits import RateLimit, RateLimiter, key_id


def test_buckets_refuse_past_the_limit_with_a_retry_after_and_refill(redis_server, cluster_name):
    async def scenario():
        redis = connect(RedisSettings(redis_server.url))
        keys = ClusterKeys(cluster_name)
        # Two routers, one budget: 3 requests and 600 tokens a minute per key.
        routers = [RateLimiter(redis, keys, RateLimit(requests_per_minute=3, tokens_per_minute=600)) for _ in range(2)]
        try:
            t = 1000.0
            assert (await routers[0].take("key-a", 100, t)).allowed
            assert (await routers[1].take("key-a", 100, t)).allowed
            assert (await routers[0].take("key-a", 100, t)).allowed
            refused = await routers[1].take("key-a", 100, t)
            assert not refused.allowed and refused.retry_after_s == pytest.approx(20.0)  # 1 request per 20 s
            assert (await routers[1].take("key-b", 100, t)).allowed  # another key, its own buckets
            assert (await routers[0].take("key-a", 100, t + 20.0)).allowed  # refilled
            # Tokens: 600 a minute; 300 were taken, another 400 must wait for 100 to come back.
            big = await routers[0].take("key-c", 550, t)
            assert big.allowed
            over = await routers[1].take("key-c", 100, t)
            assert not over.allowed and over.retry_after_s == pytest.approx(5.0)
            await routers[0].give_back("key-c", 500, t)  # the request generated little
            assert (await routers[1].take("key-c", 100, t)).allowed
            # The key never reaches Redis, only its hash.
            names = [k.decode() async for k in redis.scan_iter(match=f"{keys.base}:*")]
            assert names and not any("key-a" in n for n in names)
            assert any(key_id("key-a") in n for n in names)
            assert (await RateLimiter(redis, keys, RateLimit()).take("key-a", 10**9, t)).allowed  # unlimited
        finally:
            await redis.aclose()
    asyncio.run(scenario())
