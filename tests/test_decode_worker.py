"""Decode worker units on a tiny model, driven directly (no Ray), with a real shm KV sender."""
from __future__ import annotations

import asyncio
import time

import torch

from cluster_state.worker_spec import WorkerSpec
from decode_worker import DecodeWorker
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from kv_transfer import KVLayout, create_sender

NUM_BLOCKS = 32


def decode_spec(config: EngineConfig, role: str = "decode", **kwargs) -> WorkerSpec:
    """A worker driven directly: no Redis, no calibration (fast), loopback endpoints."""
    return WorkerSpec(worker_id=f"{role}-0", role=role, engine=config, calibrate=False,
                      host="127.0.0.1", **kwargs)


async def wait_until(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.05)
    return False


def test_abort_mid_transfer_holds_blocks_until_the_sender_settles(tiny_checkpoints):
    config = EngineConfig.from_options(tiny_checkpoints["llama3"], dtype="float32", device="cpu",
                                       num_blocks=NUM_BLOCKS, block_size=4)

    async def scenario():
        worker = DecodeWorker(decode_spec(config))
        info = await worker.start()
        layout = KVLayout(**info["layout"])
        sender = create_sender("shm", layout)
        sender.connect(info["endpoint"])
        try:
            reply = await worker.admit("router-a", "r", list(range(3, 15)), SamplingParams(max_tokens=4), True)
            reservation = reply.reservation
            assert reply.admitted and len(reservation.ticket.block_ids) == 3  # 12 tokens in blocks of 4
            # The first block lands, then the request is aborted while the rest is in flight.
            sender.send_blocks(reservation.ticket, torch.randn(layout.cache_shape(1)), start=0)
            await worker.abort("r")
            await asyncio.sleep(0.3)
            held = await worker.stats()
            assert held.num_free_blocks == NUM_BLOCKS - 3, "blocks freed while a write may land"
            sender.send_failed(reservation.ticket, "prefill aborted")

            async def all_free():
                stats = await worker.stats()
                return stats.num_free_blocks == NUM_BLOCKS and stats.num_requests == 0
            assert await wait_until(all_free)
        finally:
            sender.close()
            await worker.shutdown()

    asyncio.run(scenario())


def test_abort_without_transfer_in_flight_frees_at_once(tiny_checkpoints):
    config = EngineConfig.from_options(tiny_checkpoints["llama3"], dtype="float32", device="cpu",
                                       num_blocks=NUM_BLOCKS, block_size=4)

    async def scenario():
        worker = DecodeWorker(decode_spec(config, "mixed"))
        await worker.start()
        try:
            reply = await worker.admit("router-a", "m", list(range(3, 15)),
                                       SamplingParams(max_tokens=100, ignore_eos=True), False)
            assert reply.admitted
            await worker.abort("m")
            stats = await worker.stats()
            assert stats.num_free_blocks == NUM_BLOCKS and stats.num_requests == 0
        finally:
            await worker.shutdown()

    asyncio.run(scenario())


def test_decode_waits_instead_of_failing_when_kv_in_flight_holds_the_blocks(tiny_checkpoints):
    # 8 blocks of 4: a running request and a reservation fill the cache; the running one must
    # wait for the reserved blocks rather than abort everything.
    config = EngineConfig.from_options(tiny_checkpoints["llama3"], dtype="float32", device="cpu",
                                       num_blocks=8, block_size=4)
    from engine.llm_engine import LLMEngine

    engine = LLMEngine(config)
    engine.add_request(list(range(3, 7)), SamplingParams(max_tokens=20, ignore_eos=True), "run")
    engine.step()
    assert engine.reserve_for_transfer("kv", list(range(20, 36)), SamplingParams(max_tokens=1))[0] == 0
    for _ in range(20):
        engine.step()  # "run" grows, gets preempted, then cannot come back while "kv" holds blocks
    assert engine.stalled and "run" in engine.scheduler.requests
    engine.start_after_transfer("kv", 5)  # max_tokens 1: finishes and frees its blocks
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks


def test_each_router_gets_its_own_tokens_and_a_silent_router_loses_its_requests(tiny_checkpoints):
    config = EngineConfig.from_options(tiny_checkpoints["llama3"], dtype="float32", device="cpu",
                                       num_blocks=NUM_BLOCKS, block_size=4)

    async def scenario():
        worker = DecodeWorker(decode_spec(config, router_lease_s=1.5))
        info = await worker.start()
        sender = create_sender("shm", KVLayout(**info["layout"]))
        try:
            params = SamplingParams(max_tokens=3, ignore_eos=True)
            for router, rid in (("a", "a-1"), ("b", "b-1")):
                assert (await worker.admit(router, rid, list(range(3, 11)), params, False)).admitted
            got: dict[str, list] = {"a": [], "b": []}
            while sum(d.finish_reason is not None for r in got for d in got[r]) < 2:
                for router in got:
                    got[router] += (await worker.next_outputs(router, 0.2)).deltas
            assert {d.request_id for d in got["a"]} == {"a-1"}
            assert {d.request_id for d in got["b"]} == {"b-1"}
            assert sum(len(d.new_token_ids) for d in got["a"]) == 3
            # Router "b" holds a reservation for KV, then stops polling (it died): the worker
            # aborts its request; the blocks come back once the prefill side settles.
            reply = await worker.admit("b", "b-2", list(range(3, 15)), params, True)
            assert reply.admitted and worker.outboxes.requests_of("b") == ["b-2"]

            async def expired():
                await worker.next_outputs("a", 0.05)  # router "a" is alive and keeps polling
                return worker.outboxes.requests_of("b") == []
            assert await wait_until(expired, timeout_s=15)
            sender.connect(info["endpoint"])
            sender.send_failed(reply.reservation.ticket, "its router is gone")

            async def freed():
                stats = await worker.stats()
                return stats.num_requests == 0 and stats.num_free_blocks == NUM_BLOCKS
            assert await wait_until(freed)
        finally:
            sender.close()
            await worker.shutdown()

    asyncio.run(scenario())


def test_admission_is_refused_naming_the_limit_when_slots_run_out(tiny_checkpoints):
    config = EngineConfig.from_options(tiny_checkpoints["llama3"], dtype="float32", device="cpu",
                                       num_blocks=NUM_BLOCKS, block_size=4, max_num_seqs=2,
                                       max_model_len=100)

    async def scenario():
        worker = DecodeWorker(decode_spec(config))
        await worker.start()
        try:
            long = SamplingParams(max_tokens=10_000, ignore_eos=True)
            replies = [await worker.admit("a", f"r{i}", list(range(3, 9)), long, i == 1) for i in range(3)]
            assert [r.admitted for r in replies] == [True, True, False]
            assert replies[2].limit == "sequence slots" and "max_num_seqs 2" in replies[2].detail
            assert replies[2].load.num_unfinished == 2 and replies[2].load.free_slots == 0
            for i in range(2):
                await worker.abort(f"r{i}")
        finally:
            await worker.shutdown()

    asyncio.run(scenario())
