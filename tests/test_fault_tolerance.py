"""Workers killed for real (kill -9 of the actor's process) while requests run on them.

Streams on a decode worker that dies continue on another decode worker: greedy output equals an
uninterrupted run, with no error, no gap and no duplicate token. A prefill worker that dies
mid-prefill has its requests prefilled again on another one. The blocks held for a dead peer come
back on both sides within 10 s, and Ray brings the killed worker back as a new generation.
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import grpc
import pytest

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from protos.pdserve.v1 import generation_pb2_grpc as pb_grpc
from router.cluster_backend import RoutingConfig
from router.embedded import EmbeddedCluster, workers_idle
from router.pools import PoolConfig
from router.serve import ServeConfig, load_tokenizer
from tests.cluster_helpers import greedy_request

pytestmark = pytest.mark.slow

OPTIONS = dict(dtype="float32", device="cpu", kv_cache_memory_gb=0.25, max_num_batched_tokens=256)
WORDS = "amber falcon harbor quartz meadow signal copper lantern velvet summit prism glacier".split()
LEASE_S = 6.0


@pytest.fixture(scope="module")
def cluster(demo_gguf_path, ray_local):
    """2 prefill + 2 decode workers; every prompt through a prefill worker, so that a prefill
    worker can be caught mid-prefill."""
    config = ServeConfig(engine=EngineConfig.from_options(demo_gguf_path, **OPTIONS),
                         pools=PoolConfig(num_prefill_workers=2, num_decode_workers=2, torch_threads=1,
                                          lease_ttl_s=LEASE_S),
                         routing=RoutingConfig(disaggregation="always"), cluster_name="faults")
    with EmbeddedCluster(config) as server:
        yield server


@pytest.fixture(scope="module")
def reference(demo_gguf_path):
    return LLM(demo_gguf_path, **OPTIONS)


def prompts(demo_gguf_path, count: int, words: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    tokenizer = load_tokenizer(demo_gguf_path)
    return [tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(words))) for _ in range(count)]


class Streams:
    """Greedy streams from a thread of their own, each token recorded as it arrives."""

    def __init__(self, port: int, requests, timeout_s: float = 240) -> None:
        self.port, self.requests, self.timeout_s = port, requests, timeout_s
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.errors: list[str | None] = [None] * len(requests)
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> "Streams":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._thread.join(300)
        assert not self._thread.is_alive(), "streams hung"

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            await asyncio.gather(*(self._one(stub, i) for i in range(len(self.requests))))

    async def _one(self, stub, i: int) -> None:
        try:
            async for response in stub.Generate(self.requests[i], timeout=self.timeout_s):
                self.tokens[i].extend(response.token_ids)
        except grpc.aio.AioRpcError as err:
            self.errors[i] = f"{err.code()}: {err.details()}"


def worker(server: EmbeddedCluster, worker_id: str):
    return server.backend.view.workers[worker_id]


def pid_of(server: EmbeddedCluster, worker_id: str) -> int:
    return server.run(worker(server, worker_id).actor.pid.remote())


def free_blocks(server: EmbeddedCluster, worker_id: str) -> tuple[int, int]:
    stats = server.run(worker(server, worker_id).actor.stats.remote())
    stats = stats if isinstance(stats, dict) else stats.__dict__
    return stats["num_free_blocks"], stats["num_blocks"]


def wait_until(predicate, timeout_s: float, what: str) -> float:
    """Seconds it took; fails the test past timeout_s."""
    began = time.monotonic()
    while not predicate():
        assert time.monotonic() - began < timeout_s, f"timed out waiting for {what}"
        time.sleep(0.1)
    return time.monotonic() - began


def wait_back(server: EmbeddedCluster, worker_id: str, old_generation: int) -> None:
    wait_until(lambda: worker(server, worker_id).generation > old_generation
               and server.backend.view.routable(worker(server, worker_id)), 180, f"{worker_id} to come back")


def test_streams_on_a_killed_decode_worker_continue_on_the_other_one(cluster, reference, demo_gguf_path):
    batch = prompts(demo_gguf_path, 8, 12, seed=1)
    expected = [o.token_ids for o in reference.generate(
        batch, SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True))]
    resumed_before = cluster.backend.resumed
    with Streams(cluster.port, [greedy_request(p, 48) for p in batch]) as streams:
        wait_until(lambda: sum(len(t) > 4 for t in streams.tokens) == 8, 120, "all 8 streams to run")
        on_victim = [s for s in cluster.backend.streams.values()
                     if s.placement is not None and s.placement.decode.worker_id == "decode-1"]
        assert on_victim, "some streams should run on decode-1"
        generation = worker(cluster, "decode-1").generation
        os.kill(pid_of(cluster, "decode-1"), signal.SIGKILL)
    assert streams.errors == [None] * 8
    assert streams.tokens == expected  # no gap, no duplicate, the same greedy tokens
    assert cluster.backend.resumed - resumed_before >= len(on_victim)
    wait_back(cluster, "decode-1", generation)
    assert workers_idle(cluster.wait_for_baseline(60))


def test_a_prefill_worker_killed_mid_prefill_has_its_prompts_prefilled_again(cluster, reference, demo_gguf_path):
    batch = prompts(demo_gguf_path, 6, 180, seed=2)  # long prompts: seconds of prefill each
    expected = [o.token_ids for o in reference.generate(
        batch, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))]
    victim = worker(cluster, "prefill-0")
    generation = victim.generation
    with Streams(cluster.port, [greedy_request(p, 8) for p in batch]) as streams:
        wait_until(lambda: victim.in_flight > 0, 60, "prefill-0 to be prefilling")
        os.kill(pid_of(cluster, "prefill-0"), signal.SIGKILL)
    assert streams.errors == [None] * 6
    assert streams.tokens == expected
    wait_back(cluster, "prefill-0", generation)
    assert workers_idle(cluster.wait_for_baseline(60))


def test_blocks_held_for_a_dead_peer_come_back_within_10_seconds(cluster, demo_gguf_path):
    """A decode worker reserves blocks for a long prompt and a prefill worker computes it for
    it (driven directly, no router to clean up after them); then one of the two is killed.
    Decode side: the blocks reserved for the dead prefill worker come back when its lease lapses.
    Prefill side: the blocks a prefill worker holds for a dead decode worker come back once it
    finds its peer gone."""
    prompt = prompts(demo_gguf_path, 1, 1500, seed=3)[0]  # seconds of prefill on one thread
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    measured = {}
    for attempt, (dead, survivor) in enumerate((("prefill-1", "decode-0"), ("decode-0", "prefill-1"))):
        wait_until(lambda: all(cluster.backend.view.routable(w) for w in cluster.backend.view.workers.values()),
                   180, "every worker to be up")
        decode, prefill = worker(cluster, "decode-0"), worker(cluster, "prefill-1")
        victim = worker(cluster, dead)
        generation, pid = victim.generation, pid_of(cluster, dead)
        baseline = free_blocks(cluster, survivor)
        rid = f"stranded-{attempt}"
        reply = cluster.run(decode.actor.admit.remote("test", rid, prompt, params, True, (), ("prefill-1", prefill.node)))
        assert reply.admitted
        pending = prefill.actor.prefill.remote(rid, prompt, params, reply.reservation.ticket, decode.actor)
        def computing() -> bool:
            import ray
            if ray.wait([pending], timeout=0)[0]:
                raise AssertionError(f"the prefill ended before it was seen computing: {cluster.run(pending)!r}")
            return free_blocks(cluster, "prefill-1")[0] < free_blocks(cluster, "prefill-1")[1]
        wait_until(computing, 60, "prefill-1 to be computing the prompt")
        assert free_blocks(cluster, survivor)[0] < baseline[0]  # the survivor holds blocks for it
        os.kill(pid, signal.SIGKILL)
        measured[f"{survivor} after {dead} died"] = wait_until(
            lambda: free_blocks(cluster, survivor)[0] == baseline[0], 30, f"{survivor}'s blocks to come back")
        try:
            cluster.run(pending, timeout=60)
        except Exception:
            pass  # the prefill died with its worker, or was dropped because its peer died
        wait_back(cluster, dead, generation)
    print("stranded blocks came back after:", {k: f"{v:.1f}s" for k, v in measured.items()})
    assert all(seconds < 10 for seconds in measured.values()), measured


def test_a_prefill_worker_that_hangs_mid_prefill_has_its_prompts_prefilled_elsewhere(cluster, reference, demo_gguf_path):
    """SIGSTOP, not a kill: the process lives on, its actor calls never return. The decode
    workers give up the KV they reserved for it when it stops renewing its leases, and the
    router places those requests again instead of waiting on the hung call forever."""
    batch = prompts(demo_gguf_path, 4, 180, seed=4)
    expected = [o.token_ids for o in reference.generate(
        batch, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))]
    wait_until(lambda: all(cluster.backend.view.routable(w) for w in cluster.backend.view.workers.values()),
               180, "every worker to be up")
    victim = worker(cluster, "prefill-0")
    pid = pid_of(cluster, "prefill-0")
    resumed_before = cluster.backend.resumed
    stopped_at = None
    try:
        with Streams(cluster.port, [greedy_request(p, 8) for p in batch], timeout_s=90) as streams:
            wait_until(lambda: victim.in_flight > 0, 60, "prefill-0 to be prefilling")
            os.kill(pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            wait_until(lambda: all(len(t) == 8 for t in streams.tokens) or any(streams.errors), 60,
                       "the streams to end")
            took = time.monotonic() - stopped_at
    finally:
        os.kill(pid, signal.SIGCONT)
    assert streams.errors == [None] * 4
    assert streams.tokens == expected
    assert cluster.backend.resumed > resumed_before
    print(f"streams of the hung prefill worker ended {took:.1f} s after it stopped (lease {LEASE_S} s)")
    wait_until(lambda: cluster.backend.view.routable(victim), 60, "prefill-0 to be routable again")
    assert workers_idle(cluster.wait_for_baseline(60))
