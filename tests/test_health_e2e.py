"""Losing the only decode worker: health leaves SERVING, Ray brings the worker back, health
returns to SERVING and requests are served again, with no restart of the router. A request sent
while the pool is empty waits for the worker instead of failing."""
from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from router.embedded import EmbeddedCluster, workers_idle
from router.pools import PoolConfig
from router.serve import ServeConfig
from tests.cluster_helpers import collect, greedy_request

pytestmark = pytest.mark.slow

PROMPT = [5, 9, 13, 21, 34, 55, 89]


def status(channel) -> int:
    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
    except grpc.RpcError:
        return -1


def wait_for_status(channel, wanted: int, timeout_s: float) -> float:
    began = time.monotonic()
    while status(channel) != wanted:
        assert time.monotonic() - began < timeout_s, f"health never became {wanted}"
        time.sleep(0.05)
    return time.monotonic() - began


def test_health_follows_the_decode_pool_through_its_workers_death_and_return(tiny_checkpoints, ray_local):
    model = tiny_checkpoints["llama3"]
    options = dict(dtype="float32", device="cpu", num_blocks=64, block_size=4)
    expected = LLM(model, **options).generate([PROMPT], SamplingParams(max_tokens=6, temperature=0.0,
                                                                      ignore_eos=True))[0].token_ids
    config = ServeConfig(engine=EngineConfig.from_options(model, **options),
                         pools=PoolConfig(torch_threads=1), cluster_name="health")
    with EmbeddedCluster(config) as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        assert status(channel) == serving
        decode = server.backend.view.workers["decode-0"]
        generation = decode.generation
        os.kill(server.run(decode.actor.pid.remote()), signal.SIGKILL)
        wait_for_status(channel, not_serving, 10)
        # Sent while no decode worker is up: it waits in the queue for the replacement.
        waiting: dict = {}
        thread = threading.Thread(target=lambda: waiting.update(
            result=collect(server.stub().Generate(greedy_request(PROMPT, 6), timeout=120))))
        thread.start()
        wait_for_status(channel, serving, 120)
        assert decode.generation > generation
        thread.join(120)
        assert waiting["result"][0] == expected
        assert collect(server.stub().Generate(greedy_request(PROMPT, 6)))[0] == expected
        assert workers_idle(server.wait_for_baseline())
