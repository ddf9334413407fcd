"""Admission through a real cluster: a burst far past the sequence slots waits and completes,
a full queue refuses naming its limit, and a request cancelled while queued leaves nothing behind."""
from __future__ import annotations

import asyncio
import random
import threading
import time

import grpc
import pytest

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from protos.pdserve.v1 import generation_pb2 as pb
from protos.pdserve.v1 import generation_pb2_grpc as pb_grpc
from router.cluster_backend import RoutingConfig
from router.embedded import EmbeddedCluster, workers_idle
from router.pools import PoolConfig
from router.serve import ServeConfig, load_tokenizer
from tests.cluster_helpers import greedy_request

pytestmark = pytest.mark.slow

WORDS = "amber falcon harbor quartz meadow signal copper lantern velvet summit prism glacier".split()


async def stream(channel, request: pb.GenerateRequest) -> tuple[list[int], grpc.StatusCode | None, str]:
    """(tokens, error code, error message) of one stream."""
    tokens: list[int] = []
    try:
        async for response in pb_grpc.GenerationStub(channel).Generate(request):
            tokens.extend(response.token_ids)
        return tokens, None, ""
    except grpc.aio.AioRpcError as err:
        return tokens, err.code(), err.details()


async def burst(port: int, requests: list[pb.GenerateRequest]):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return await asyncio.gather(*(stream(channel, r) for r in requests))


def test_300_concurrent_streams_against_the_default_cluster_all_complete(demo_gguf_path, ray_local):
    tokenizer = load_tokenizer(demo_gguf_path)
    rng = random.Random(3)
    prompts = [tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 24))))
               for _ in range(300)]
    expected = [out.token_ids for out in LLM(demo_gguf_path, dtype="float32", device="cpu").generate(
        prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))]
    # The defaults of `pdserve serve`: 1 prefill + 1 decode worker, 64 sequence slots each.
    with EmbeddedCluster(ServeConfig(engine=EngineConfig(model=demo_gguf_path))) as server:
        results = asyncio.run(burst(server.port, [greedy_request(p, 8) for p in prompts]))
        assert [code for _, code, _ in results] == [None] * 300, [m for _, c, m in results if c][:3]
        assert [tokens for tokens, _, _ in results] == expected
        assert workers_idle(server.wait_for_baseline())
        stats = server.backend.stats()
        assert stats["queued"] == 0 and stats["streams"] == 0


@pytest.fixture(scope="module")
def small_cluster(tiny_checkpoints, ray_local):
    """Four sequence slots, room for ten waiting requests."""
    engine = EngineConfig.from_options(tiny_checkpoints["llama3"], dtype="float32", device="cpu",
                                       num_blocks=256, block_size=4, max_num_seqs=4)
    config = ServeConfig(engine=engine, pools=PoolConfig(torch_threads=1, lease_ttl_s=10.0),
                         routing=RoutingConfig(max_queued_requests=10))
    with EmbeddedCluster(config) as server:
        yield server


def long_request(i: int, max_tokens: int = 200) -> pb.GenerateRequest:
    return greedy_request([3 + (7 * i + j) % 400 for j in range(6)], max_tokens)


def pool_counters_at_baseline(server: EmbeddedCluster) -> bool:
    """Every worker's blocks free and requests gone, and nothing held for them by the router."""
    idle = workers_idle(server.wait_for_baseline())
    deadline = time.monotonic() + 10  # the router's side settles as the aborts come back
    while time.monotonic() < deadline:
        stats = server.backend.stats()
        counters = [(w.in_flight, w.pending_admissions, w.pending_blocks, w.prefill_tokens_in_flight)
                    for w in server.backend.view.workers.values()]
        if stats["queued"] == 0 and stats["streams"] == 0 and all(c == (0, 0, 0, 0) for c in counters):
            return idle
        time.sleep(0.05)
    print("not at baseline:", stats, counters)
    return False


def test_a_full_queue_refuses_the_surplus_naming_the_limit(small_cluster):
    results = asyncio.run(burst(small_cluster.port, [long_request(i) for i in range(40)]))
    refused = [message for _, code, message in results if code is not None]
    served = [tokens for tokens, code, _ in results if code is None]
    assert {code for _, code, _ in results} <= {None, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert len(refused) >= 20  # 4 running + 10 waiting; what finished early made some room
    assert all("--max-queued-requests 10" in message for message in refused), refused[:2]
    assert len(served) + len(refused) == 40 and all(len(tokens) == 200 for tokens in served)
    assert pool_counters_at_baseline(small_cluster)


def test_a_request_cancelled_while_queued_leaves_the_counters_at_baseline(small_cluster):
    async def scenario():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{small_cluster.port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            holders = [stub.Generate(long_request(i, 230)) for i in range(4)]
            for call in holders:
                await call.read()  # each is running: all four slots are taken
            request = long_request(99, 5)
            request.request_id = "queued-99"
            waiting = stub.Generate(request)
            read = asyncio.ensure_future(waiting.read())
            deadline = time.monotonic() + 10
            while small_cluster.backend.stats()["queued"] != 1:
                assert time.monotonic() < deadline, "the fifth request should wait in the queue"
                await asyncio.sleep(0.01)
            assert small_cluster.backend.streams["queued-99"].placement is None
            waiting.cancel()
            with pytest.raises((asyncio.CancelledError, grpc.aio.AioRpcError)):
                await read
            deadline = time.monotonic() + 2
            while "queued-99" in small_cluster.backend.streams:  # gone at once, not when a slot frees
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert small_cluster.backend.stats()["queued"] == 0
            assert all(not call.done() for call in holders)  # no slot had freed up meanwhile
            for call in holders:
                call.cancel()
    asyncio.run(scenario())
    assert pool_counters_at_baseline(small_cluster)


class StalledJournal:
    """The cluster's journal, except that a stream's first write never returns."""

    def __init__(self, inner) -> None:
        self.inner, self.stalled = inner, threading.Event()

    async def begin(self, *args, **kwargs) -> None:
        self.stalled.set()
        await asyncio.sleep(3600)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_client_gone_before_its_stream_began_leaves_nothing_behind(small_cluster):
    """Placed (a decode worker holds its reservation), then cancelled while its journal entry is
    being written: the router forgets it and the worker frees the reservation."""
    backend = small_cluster.backend
    journal = backend.journal
    assert journal is not None
    backend.journal = StalledJournal(journal)

    async def scenario():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{small_cluster.port}") as channel:
            request = long_request(7, 50)
            request.request_id = "gone-early"
            call = pb_grpc.GenerationStub(channel).Generate(request)
            read = asyncio.ensure_future(call.read())
            deadline = time.monotonic() + 10
            while not (backend.journal.stalled.is_set() and "gone-early" in backend.streams
                       and backend.streams["gone-early"].entry.placed.done()):
                assert time.monotonic() < deadline, "the request should be placed, its journal write pending"
                await asyncio.sleep(0.01)
            call.cancel()
            with pytest.raises((asyncio.CancelledError, grpc.aio.AioRpcError)):
                await read
            deadline = time.monotonic() + 5
            while "gone-early" in backend.streams:
                assert time.monotonic() < deadline, "the router still holds the stream"
                await asyncio.sleep(0.01)
    try:
        asyncio.run(scenario())
    finally:
        backend.journal = journal
    assert pool_counters_at_baseline(small_cluster)
