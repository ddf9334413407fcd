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
            await journal.begin("r1", [5, 6, 7], {"max_tokens": 9, "stop": ["x"]}, owner="d1g35t")
            await journal.begin("r2", [1], {"max_tokens": 2}, output_token_ids=[40, 41])  # taken over
            await journal.placed("r1", "decode-1", "r1#2")
            await journal.append([("r1", (10, 11), None), ("r2", (42,), "length"), ("r1", (12,), None)])
            await journal.append([("r1", (), "stop")])
            first, second = await journal.read("r1"), await journal.read("r2")
            assert (first.prompt_token_ids, first.output_token_ids, first.finish_reason) == ([5, 6, 7], [10, 11, 12], "stop")
            assert first.params == {"max_tokens": 9, "stop": ["x"]} and first.router_id == "router-a"
            assert first.placement == {"worker": "decode-1", "request": "r1#2"}
            assert (first.owner, second.owner) == ("d1g35t", "")
            assert (second.output_token_ids, second.finish_reason, second.placement) == ([40, 41, 42], "length", {})
            assert await journal.read("missing") is None
            await asyncio.sleep(0.7)  # expired with its lease
            assert await journal.read("r1") is None
        finally:
            await redis.aclose()
    asyncio.run(scenario())


def test_only_the_key_that_began_a_stream_can_resume_it(redis_server, cluster_name):
    """take_over() reads another key's stream (or a keyless one, from a key) as one that does not
    exist, with the same words, so a request id reveals nothing to whoever guesses it."""
    import types

    import pytest

    from router.security import Gatekeeper
    from router.security.api_keys import ApiKeys
    from router.takeover import ResumeError, take_over

    gate = Gatekeeper(keys=ApiKeys(("key-a", "key-b")))
    owner_a, owner_b = gate.owner("Bearer key-a"), gate.owner("Bearer key-b")
    assert owner_a and owner_a != owner_b and "key-a" not in owner_a  # a digest, never the key
    assert Gatekeeper().owner("Bearer key-a") == ""  # keys off: anyone may send anything

    async def scenario():
        redis = connect(RedisSettings(redis_server.url))
        journal = RequestJournal(redis, ClusterKeys(cluster_name), "router-a")
        backend = types.SimpleNamespace(journal=journal, streams={}, router_id="router-a")
        try:
            await journal.begin("mine", [1, 2], {"max_tokens": 4}, owner=owner_a)
            await journal.begin("open", [1, 2], {"max_tokens": 4})
            await journal.append([("mine", (7, 8), "length"), ("open", (9,), "length")])
            for request_id, owner in (("mine", owner_b), ("mine", ""), ("open", owner_a), ("absent", owner_a)):
                with pytest.raises(ResumeError) as refused:
                    await take_over(backend, None, request_id, 0, owner=owner)
                assert refused.value.code == "not_found"
                assert str(refused.value) == f"no journal for request {request_id!r} (never started, or expired)"
            resumed = await take_over(backend, None, "mine", 1, owner=owner_a)
            assert resumed.delivered == [7] and [d.new_token_ids async for d in resumed.deltas] == [(8,)]
            assert (await take_over(backend, None, "open", 0)).delivered == []
        finally:
            await redis.aclose()
    asyncio.run(scenario())
