"""The request journal against a real redis-server: tokens appended in batches, placement and the
end recorded, everything read back as written, expiry after the last write."""
from __future__ import annotations

import asyncio

from cluster_state import ClusterKeys, RedisSettings, connect
from cluster_state.journal import RequestJournal


def test_a_stream_is_journaled_and_read_back(redis_server, cluster_name):
    async def scenario():
        redis = connect(RedisSettings(redis_server.url))
        journal = RequestJournal(redis, ClusterKeys(cluster_name), "router-a", ttl_s=0.5)
        try:
            await journal.begin("r1", [5, 6, 7], {"max_tokens": 9, "stop": ["x"]})
            await journal.begin("r2", [1], {"max_tokens": 2}, output_token_ids=[40, 41])  # taken over
            await journal.placed("r1", "decode-1", "r1#2")
            await journal.append([("r1", (10, 11), None), ("r2", (42,), "length"), ("r1", (12,), None)])
            await journal.append([("r1", (), "stop")])
            first, second = await journal.read("r1"), await journal.read("r2")
            assert (first.prompt_token_ids, first.output_token_ids, first.finish_reason) == ([5, 6, 7], [10, 11, 12], "stop")
            assert first.params == {"max_tokens": 9, "stop": ["x"]} and first.router_id == "router-a"
            assert first.placement == {"worker": "decode-1", "request": "r1#2"}
            assert (second.output_token_ids, second.finish_reason, second.placement) == ([40, 41, 42], "length", {})
            assert await journal.read("missing") is None
            await asyncio.sleep(0.7)  # expired with its lease
            assert await journal.read("r1") is None
        finally:
            await redis.aclose()
    asyncio.run(scenario())
