"""Redis killed (kill -9) and restarted empty under load: no request fails, the workers register
again, and every router's KV block index is rebuilt from the workers' snapshots."""
from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from cluster_state import ClusterKeys, RedisSettings, connect
from cluster_state.kv_events import unpack_blob
from cluster_state.registry import WorkerRegistry
from cluster_state.server import PrivateRedis
from engine import LLM, SamplingParams
from engine.config import EngineConfig
from protos.pdserve.v1 import generation_pb2_grpc as pb_grpc
from router.embedded import EmbeddedCluster, workers_idle
from router.pools import PoolConfig
from router.serve import ServeConfig
from tests.cluster_helpers import greedy_request

pytestmark = pytest.mark.slow

PROMPTS = [[3 + (11 * i + j) % 300 for j in range(6 + 3 * i)] for i in range(8)]
MAX_TOKENS = 40


class LoadLoop:
    """Streams that run back to back from a thread of their own until stopped."""

    def __init__(self, port: int, expected: list[list[int]], concurrency: int = 6) -> None:
        self.port, self.expected, self.concurrency = port, expected, concurrency
        self.done = 0
        self.failures: list[str] = []
        self.wrong: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> "LoadLoop":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(120)

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            await asyncio.gather(*(self._client(stub, c) for c in range(self.concurrency)))

    async def _client(self, stub, client: int) -> None:
        i = client
        while not self._stop.is_set():
            prompt = i % len(PROMPTS)
            tokens = []
            try:
                async for response in stub.Generate(greedy_request(PROMPTS[prompt], MAX_TOKENS), timeout=60):
                    tokens.extend(response.token_ids)
            except grpc.aio.AioRpcError as err:
                self.failures.append(f"{err.code()}: {err.details()}")
            else:
                self.done += 1
                if tokens != self.expected[prompt]:
                    self.wrong.append(prompt)
            i += self.concurrency


def redis_state(url: str, cluster_name: str) -> tuple[dict, dict]:
    """(live workers, their block sets in Redis)."""
    async def read():
        redis = connect(RedisSettings(url))
        keys = ClusterKeys(cluster_name)
        try:
            live = await WorkerRegistry(redis, keys).live_workers()
            sets = {}
            for worker_id, worker in live.items():
                members = await redis.smembers(keys.kv_blocks(worker_id, worker.record.generation))
                sets[worker_id] = set(unpack_blob(b"".join(members)))
            return live, sets
        finally:
            await redis.aclose()
    return asyncio.run(read())


def test_redis_killed_and_restarted_under_load_fails_no_request_and_the_index_is_rebuilt(
        tiny_checkpoints, ray_local, cluster_name):
    model = tiny_checkpoints["llama3"]
    options = dict(dtype="float32", device="cpu", num_blocks=128, block_size=4, max_num_seqs=4)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    expected = [out.token_ids for out in LLM(model, **options).generate(PROMPTS, params)]
    redis = PrivateRedis(password="outage-test").start()
    config = ServeConfig(engine=EngineConfig.from_options(model, **options),
                         pools=PoolConfig(num_decode_workers=2, torch_threads=1),
                         redis_url=redis.url, cluster_name=cluster_name)
    try:
        with EmbeddedCluster(config) as server:
            follower = server.backend.index_follower
            resyncs_before = follower.resyncs
            with LoadLoop(server.port, expected) as load:
                time.sleep(2.0)
                served_before = load.done
                redis.kill()  # kill -9: the cluster's shared state is gone
                time.sleep(2.0)
                assert not follower.connected and not server.backend.view.connected
                redis.start()  # the same address, empty
                time.sleep(4.0)
            assert load.failures == [] and load.wrong == []
            assert served_before > 0 and load.done > served_before + 10  # it kept serving throughout

            def rebuilt() -> bool:
                live, sets = redis_state(redis.url, cluster_name)
                if set(live) != {"prefill-0", "decode-0", "decode-1"}:
                    return False
                for worker in server.backend.view.workers.values():
                    cached = server.run(worker.actor.cached_block_hashes.remote())
                    if sets[worker.worker_id] != cached or follower.index.blocks.get(worker.key, set()) != cached:
                        return False
                return True

            print("redis alive:", redis.process.poll(), redis._log_tail())
            deadline = time.monotonic() + 20
            while not rebuilt():
                assert time.monotonic() < deadline, "the registry and the index were not rebuilt"
                time.sleep(0.2)
            assert follower.resyncs > resyncs_before and follower.connected
            assert workers_idle(server.wait_for_baseline())
    finally:
        redis.stop()
