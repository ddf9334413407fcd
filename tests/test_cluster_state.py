"""Cluster state against a real redis-server: the key schema, the worker registry with its
generations and leases, KV event batches and the index that follows them, an agent outliving a
Redis restart, and the private server's lifecycle."""
from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from cluster_state import ClusterKeys, RedisSettings, connect, redacted_url
from cluster_state.agent import AgentConfig, WorkerAgent
from cluster_state.block_index import BlockIndex, BlockIndexFollower
from cluster_state.kv_events import KVEventBatch, KVEventPublisher
from cluster_state.load import LoadReport
from cluster_state.registry import (HEARTBEAT_MISSING, HEARTBEAT_RENEWED, HEARTBEAT_SUPERSEDED,
                                    SupersededError, WorkerRecord, WorkerRegistry)
from cluster_state.server import PrivateRedis, RedisServerError


def run(coro):
    return asyncio.run(coro)


def record(worker_id: str = "decode-0", generation: int = 0) -> WorkerRecord:
    return WorkerRecord(worker_id, "decode", f"c/{worker_id}", "127.0.0.1", os.getpid(), "127.0.0.1:1",
                        "shm", {"block_size": 16}, max_num_seqs=8, num_blocks=100, generation=generation)


def test_every_key_sits_under_the_cluster_prefix():
    keys = ClusterKeys("blue")
    names = [keys.worker("w"), keys.generation("w"), keys.kv_blocks("w", 3), keys.kv_seq("w", 3),
             keys.kv_events, keys.workers, keys.router("r"), keys.routers, keys.pools, keys.pools_lock]
    assert all(name.startswith("pdserve:blue:") for name in names)
    assert len(set(names)) == len(names)
    for bad in ("", "a b", "x:y", "*", "{x}"):
        with pytest.raises(ValueError, match="cluster name"):
            ClusterKeys(bad)


def test_urls_take_the_password_from_the_environment_and_logs_never_show_it(monkeypatch):
    monkeypatch.setenv("PDSERVE_REDIS_PASSWORD", "s3cret/+")
    settings = RedisSettings.from_url("redis://redis.example:6380/2")
    assert settings.url == "redis://:s3cret%2F%2B@redis.example:6380/2"
    assert "s3cret" not in redacted_url(settings.url)
    assert RedisSettings.from_url("redis://:given@h:1/0").url == "redis://:given@h:1/0"
    with pytest.raises(ValueError, match="redis://, rediss:// or unix://"):
        RedisSettings("http://h:1")


def test_generations_grow_on_every_start_and_a_zombie_cannot_take_the_record_back(redis_server, cluster_name):
    async def scenario():
        redis = connect(RedisSettings(redis_server.url))
        registry = WorkerRegistry(redis, ClusterKeys(cluster_name))
        try:
            first = await registry.register(record(generation=await registry.next_generation("decode-0")),
                                            LoadReport(), ttl_s=5)
            second = await registry.register(record(generation=await registry.next_generation("decode-0")),
                                             LoadReport(num_running=2), ttl_s=5)
            assert (first.generation, second.generation) == (1, 2)
            live = await registry.live_workers()
            assert live["decode-0"].record.generation == 2 and live["decode-0"].load.num_running == 2
            # The first incarnation is a zombie now: its heartbeat and re-registration are refused.
            assert await registry.heartbeat(first, LoadReport(), 5) == HEARTBEAT_SUPERSEDED
            with pytest.raises(SupersededError, match="generation 2 is registered"):
                await registry.register(first, LoadReport(), ttl_s=5)
            assert await registry.heartbeat(second, LoadReport(), 5) == HEARTBEAT_RENEWED
            await registry.deregister(first)  # not its record: nothing happens
            assert "decode-0" in await registry.live_workers()
            await registry.deregister(second)
            assert await registry.live_workers() == {}
        finally:
            await redis.aclose()
    run(scenario())


def test_a_lapsed_lease_removes_the_worker_and_its_kv_index(redis_server, cluster_name):
    async def scenario():
        keys = ClusterKeys(cluster_name)
        redis = connect(RedisSettings(redis_server.url))
        registry = WorkerRegistry(redis, keys)
        try:
            worker = await registry.register(record(generation=await registry.next_generation("decode-0")),
                                             LoadReport(), ttl_s=0.4)
            await KVEventPublisher(redis, keys, "decode-0").publish(worker.generation, [1, 2], [], True, 0.4)
            assert "decode-0" in await registry.live_workers()
            await asyncio.sleep(0.6)
            assert await registry.live_workers() == {}
            assert not await redis.exists(keys.kv_blocks("decode-0", worker.generation))
            assert await registry.heartbeat(worker, LoadReport(), 1) == HEARTBEAT_MISSING
        finally:
            await redis.aclose()
    run(scenario())


def test_the_index_follows_batches_and_resyncs_after_a_gap(redis_server, cluster_name):
    async def scenario():
        keys = ClusterKeys(cluster_name)
        redis = connect(RedisSettings(redis_server.url))
        publisher = KVEventPublisher(redis, keys, "decode-0")
        live = [("decode-0", 1)]
        follower = BlockIndexFollower(redis, keys, lambda: live)
        try:
            assert await publisher.publish(1, [10, 11, 12], [], True, 5) == 1
            await publisher.publish(1, [13], [11], False, 5)
            await follower.poll_once(0)
            assert follower.index.blocks[("decode-0", 1)] == {10, 12, 13}
            assert follower.index.longest_prefixes([10, 12, 99], live) == {("decode-0", 1): 2}
            assert follower.index.longest_prefixes([11, 10], live) == {("decode-0", 1): 0}
            # A batch the follower never saw (as if the stream had been trimmed) forces a resync.
            await publisher.publish(1, [14], [], False, 5)
            follower.index.seqs[("decode-0", 1)] = 1  # pretend batch 2 was missed
            await publisher.publish(1, [15], [10], False, 5)
            await follower.poll_once(0)  # sees batch 3 after 1: a gap
            await follower.poll_once(0)  # resyncs from the block set
            assert follower.resyncs == 2
            assert follower.index.blocks[("decode-0", 1)] == {12, 13, 14, 15}
            assert follower.index.workers_holding(12) == {("decode-0", 1)}
        finally:
            await redis.aclose()
    run(scenario())


def test_index_batches_decode_and_stale_batches_are_skipped():
    index = BlockIndex()
    index.replace(("w", 1), [1, 2, 3], seq=5)
    assert index.apply(KVEventBatch("w", 1, 4, False, (9,), ()))  # already in the snapshot
    assert index.blocks[("w", 1)] == {1, 2, 3}
    assert not index.apply(KVEventBatch("w", 1, 7, False, (9,), ()))  # batch 6 missing
    assert not index.apply(KVEventBatch("v", 1, 3, False, (9,), ()))  # never had a snapshot
    assert index.apply(KVEventBatch("w", 1, 6, False, (4,), (1,)))
    assert index.holders == {2: {("w", 1)}, 3: {("w", 1)}, 4: {("w", 1)}}
    index.drop(("w", 1))
    assert index.holders == {} and index.blocks == {}


def test_an_agent_registers_again_with_a_full_snapshot_after_redis_restarts_empty(cluster_name):
    async def scenario(server: PrivateRedis):
        cached = {100, 200, 300}
        events: list[tuple[list[int], list[int]]] = []

        async def snapshot():
            events.clear()
            return set(cached)

        def drain():
            return events.pop(0) if events else ([], [])

        keys = ClusterKeys(cluster_name)
        agent = WorkerAgent(RedisSettings(server.url), keys, record(), LoadReport, drain, snapshot,
                            AgentConfig(publish_interval_s=0.05, lease_ttl_s=1.0))
        await agent.register()
        task = asyncio.create_task(agent.run())
        redis = connect(RedisSettings(server.url))
        try:
            cached.add(400)
            events.append(([400], []))
            await asyncio.sleep(0.3)
            members = await redis.smembers(keys.kv_blocks("decode-0", 1))
            assert len(members) == 4
            server.kill()  # kill -9: everything in it is gone
            await asyncio.sleep(0.5)
            assert not agent.connected  # it noticed, and keeps retrying
            server.start()  # same port, empty
            deadline = time.monotonic() + 10
            registry = WorkerRegistry(redis, keys)
            while time.monotonic() < deadline:
                try:
                    live = await registry.live_workers()
                    if live and len(await redis.smembers(keys.kv_blocks("decode-0", 1))) == 4:
                        break
                except Exception:
                    pass
                await asyncio.sleep(0.1)
            live = await registry.live_workers()
            assert live["decode-0"].record.generation == 1  # the same incarnation, re-registered
            assert int(await redis.get(keys.generation("decode-0"))) == 1  # the counter is restored
        finally:
            task.cancel()
            await agent.close()
            await redis.aclose()

    server = PrivateRedis(password="pw").start()
    try:
        run(scenario(server))
    finally:
        server.stop()


def test_private_redis_dies_with_its_owner_and_reports_a_bad_binary(tmp_path):
    import subprocess
    import sys

    code = ("from cluster_state.server import PrivateRedis; import time, sys; "
            "r = PrivateRedis().start(); print(r.pid, flush=True); time.sleep(60)")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    pid = int(owner.stdout.readline())
    os.kill(pid, 0)  # alive
    owner.kill()  # kill -9 of the owner takes its redis-server with it
    owner.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the private redis-server outlived its owner")
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(RedisServerError, match="cannot start"):
        PrivateRedis(binary=str(fake)).start()


def test_load_reports_carry_prefix_cache_and_kv_transfer_figures_through_json():
    import dataclasses

    from cluster_state.presence import load_report
    from engine.step_stats import EngineLoad
    from kv_transfer.counters import TransferCounters

    counters = TransferCounters("shm")
    counters.add_chunk(4096, 0.5)
    counters.add_transfer()
    counters.add_failure()
    engine_load = EngineLoad(num_running=1, num_waiting=0, num_waiting_for_kv=0, num_unfinished=1,
                             max_num_seqs=4, num_free_blocks=3, num_blocks=8, queued_prefill_tokens=0,
                             max_num_batched_tokens=64, step_base_s=0.0, mixed_step_s=0.0,
                             prefill_s_per_token=0.0, decode_s_per_seq=0.0, step_samples=0,
                             prefix_cache_queries=40, prefix_cache_hits=16, taken_at=1234.5)
    report = load_report(engine_load, kv_transfer={"shm": counters.snapshot().as_load()})
    # Dated when the engine took it, however long after (a step running) it is sent.
    assert report.published_at == 1234.5
    again = LoadReport.from_json(report.to_json())
    assert again == report
    assert (again.prefix_cache_queries, again.prefix_cache_hits) == (40, 16)
    assert again.kv_transfer == {"shm": {"bytes": 4096, "seconds": 0.5, "transfers": 1, "failures": 1}}
    # A report from a worker that predates these figures still reads, with zeros.
    old = {k: v for k, v in dataclasses.asdict(report).items()
           if k not in ("prefix_cache_queries", "prefix_cache_hits", "kv_transfer")}
    assert LoadReport.from_json(json.dumps(old)).kv_transfer == {}
