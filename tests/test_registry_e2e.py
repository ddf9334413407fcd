"""The worker registry with real Ray actors and a real redis-server: kill -9 of a worker takes it
out of routing within its lease, Ray restarts it, the successor registers with a higher
generation, and a ticket of the dead incarnation is refused by the new one."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from decode_worker import StaleGenerationError
from engine import LLM, SamplingParams
from engine.config import EngineConfig
from kv_transfer import KVLayout, TransferError, create_sender
from router.embedded import EmbeddedCluster, workers_idle
from router.pools import PoolConfig
from router.serve import ServeConfig
from tests.cluster_helpers import live_workers, collect, greedy_request

pytestmark = pytest.mark.slow

TTL_S = 3.0
PROMPTS = [[3 + (5 * i + j) % 300 for j in range(9 + i)] for i in range(6)]




def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_killed_worker_leaves_routing_and_its_successor_refuses_the_old_tickets(
        tiny_checkpoints, redis_server, ray_local, cluster_name):
    model = tiny_checkpoints["llama3"]
    options = dict(dtype="float32", device="cpu", num_blocks=128, block_size=4)
    config = ServeConfig(engine=EngineConfig.from_options(model, **options),
                         pools=PoolConfig(num_decode_workers=2, torch_threads=1, registry_ttl_s=TTL_S),
                         redis_url=redis_server.url, cluster_name=cluster_name)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    expected = [out.token_ids for out in LLM(model, **options).generate(PROMPTS, params)]
    with EmbeddedCluster(config) as server:
        stub = server.stub()
        assert [collect(stub.Generate(greedy_request(p, 6)))[0] for p in PROMPTS] == expected
        victim = next(w for w in server.backend.view.workers.values() if w.worker_id == "decode-1")
        old = live_workers(redis_server.url, cluster_name)["decode-1"].record
        assert old.generation == victim.generation >= 1 and old.pid != os.getpid()
        # A ticket issued by this incarnation, as a prefill worker would hold it.
        reply = server.run(victim.actor.admit.remote("test-router", "old-ticket", PROMPTS[0], params, True))
        assert reply.admitted and reply.reservation.ticket.generation == old.generation

        os.kill(old.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: not server.backend.view.routable(victim) or victim.generation > old.generation,
                 TTL_S + 2, "the router to stop routing to the dead worker")
        wait_for(lambda: live_workers(redis_server.url, cluster_name).get("decode-1") is None
                 or live_workers(redis_server.url, cluster_name)["decode-1"].record.generation > old.generation,
                 TTL_S + 2, "the dead worker's record to leave the registry")
        assert time.monotonic() - killed_at <= TTL_S + 2
        # Meanwhile the cluster serves on the other decode worker.
        assert [collect(stub.Generate(greedy_request(p, 6)))[0] for p in PROMPTS[:2]] == expected[:2]

        new = wait_for(lambda: (r := live_workers(redis_server.url, cluster_name).get("decode-1"))
                       and r.record.generation > old.generation and r.record, 120, "the successor to register")
        assert new.pid != old.pid
        # The successor refuses the dead incarnation's ticket: on the router's path ...
        with pytest.raises(Exception, match=f"generation {old.generation}.*now generation {new.generation}") as err:
            server.run(victim.actor.start_decode.remote("old-ticket", old.generation, 5))
        assert isinstance(getattr(err.value, "cause", err.value), StaleGenerationError) or "Stale" in str(err.value)
        # ... and on the KV path, even if the old ticket reached the new incarnation's address.
        stale = type(reply.reservation.ticket)(**{**reply.reservation.ticket.__dict__, "endpoint": new.endpoint})
        sender = create_sender("shm", KVLayout(**new.kv_layout), sender_id="prefill-0", generation=99)
        try:
            sender.connect(new.endpoint)
            with pytest.raises(TransferError, match="stale ticket"):
                sender.send_blocks(stale, torch.zeros(KVLayout(**new.kv_layout).cache_shape(1)))
        finally:
            sender.close()
        # Once registered, the successor takes requests again.
        wait_for(lambda: server.backend.view.routable(victim) and victim.generation == new.generation, 10,
                 "the successor to be routable")
        assert [collect(stub.Generate(greedy_request(p, 6)))[0] for p in PROMPTS] == expected
        assert workers_idle(server.wait_for_baseline())
