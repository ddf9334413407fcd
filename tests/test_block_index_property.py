"""The KV block index stays exact under eviction pressure (property-based).

Random prompts, many sharing prefixes, run through a real engine with a KV pool far too small to
keep them all cached, so blocks are stored and evicted all the time. After every publish interval
(one agent tick: the worker's batch of stored / evicted hashes into a real redis-server) the
worker's block set in Redis and the router-side index that follows the event stream must both
equal the engine's prefix cache exactly, and the index must answer "longest cached prefix" for
any prompt as the engine's own cache would.
"""
from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import Future

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster_state import ClusterKeys, RedisSettings, connect
from cluster_state.agent import AgentConfig, WorkerAgent
from cluster_state.block_index import BlockIndexFollower
from cluster_state.kv_events import unpack_blob
from cluster_state.registry import WorkerRecord
from engine.config import EngineConfig
from engine.kv_cache import hash_request_blocks
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

BLOCK_SIZE = 4
NUM_BLOCKS = 12  # 48 tokens: a few prompts' worth, so the cache churns
STEMS = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23], [30, 31, 32, 33, 34, 35, 36, 37], [40]]


class InlineEngine:
    """What WorkerAgent.for_engine needs of a BackgroundEngine, run on the calling thread."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine

    @property
    def load(self):
        return self.engine.load_snapshot()

    def call(self, fn) -> Future:
        future: Future = Future()
        future.set_result(fn(self.engine))
        return future


@pytest.fixture(scope="module")
def engine(tiny_checkpoints) -> LLMEngine:
    config = EngineConfig.from_options(tiny_checkpoints["llama3"], dtype="float32", device="cpu",
                                       num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, max_model_len=40)
    return LLMEngine(config, detokenize=False)


prompts = st.builds(
    lambda stem, tail: STEMS[stem] + tail,
    st.integers(0, len(STEMS) - 1),
    st.lists(st.integers(50, 60), min_size=0, max_size=12))
batches = st.lists(st.lists(prompts, min_size=1, max_size=3), min_size=1, max_size=6)


def run_batch(engine: LLMEngine, batch: list[list[int]]) -> None:
    for prompt in batch:
        engine.add_request(prompt, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
                           f"r-{uuid.uuid4().hex[:8]}")
    while engine.has_unfinished_requests():
        engine.step()


def leading_hits(cached: set[int], prompt: list[int]) -> int:
    hits = 0
    for h in hash_request_blocks(prompt, BLOCK_SIZE):
        if h not in cached:
            break
        hits += 1
    return hits


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=batches, probes=st.lists(prompts, min_size=1, max_size=4))
def test_index_equals_the_workers_cache_after_every_publish_interval(engine, redis_server, batches, probes):
    engine.kv_manager.reset_prefix_cache()
    keys = ClusterKeys(f"prop-{uuid.uuid4().hex[:8]}")

    async def scenario():
        record = WorkerRecord("decode-0", "decode", "c/decode-0", "127.0.0.1", 1, None, "shm",
                              {"block_size": BLOCK_SIZE})
        agent = WorkerAgent.for_engine(RedisSettings(redis_server.url), keys, record, InlineEngine(engine),
                                       AgentConfig(publish_interval_s=0.1, lease_ttl_s=5.0))
        await agent.register()
        key = ("decode-0", agent.generation)
        follower = BlockIndexFollower(agent.redis, keys, lambda: [key])
        redis = connect(RedisSettings(redis_server.url))
        evictions = 0
        try:
            for batch in batches:
                before = engine.kv_manager.cached_block_hashes()
                run_batch(engine, batch)
                cached = engine.kv_manager.cached_block_hashes()
                evictions += len(before - cached)
                await agent.tick()  # one publish interval
                await follower.poll_once(0)
                in_redis = set(unpack_blob(b"".join(await redis.smembers(keys.kv_blocks(*key)))))
                assert in_redis == cached
                assert follower.index.blocks.get(key, set()) == cached
                for probe in probes + batch:
                    claimed = follower.index.longest_prefixes(hash_request_blocks(probe, BLOCK_SIZE), [key])
                    assert claimed[key] == leading_hits(cached, probe)
            return evictions
        finally:
            await agent.close()
            await redis.aclose()

    asyncio.run(scenario())
    engine.kv_manager.check_invariants()


def test_the_pool_really_evicts_under_this_workload(engine):
    """The property above is only meaningful if its workloads evict: check one that must."""
    engine.kv_manager.reset_prefix_cache()
    log = engine.enable_kv_events()
    log.clear()
    for stem in STEMS:
        run_batch(engine, [stem + [50, 51, 52, 53, 54, 55, 56, 57]])
    stored, evicted = log.drain()
    assert evicted, "the workload should force evictions"
    assert set(stored) == engine.kv_manager.cached_block_hashes()
