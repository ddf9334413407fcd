"""Decode worker units on a tiny model, driven directly (no Ray), with a real shm KV sender."""
from __future__ import annotations

import asyncio
import time

import torch

from decode_worker import DecodeWorker
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from kv_transfer import KVLayout, create_sender

NUM_BLOCKS = 32


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
        worker = DecodeWorker(config, role="decode", transfer_backend="shm")
        info = await worker.start()
        layout = KVLayout(**info["layout"])
        sender = create_sender("shm", layout)
        sender.connect(info["endpoint"])
        try:
            reservation = await worker.reserve("r", list(range(3, 15)), SamplingParams(max_tokens=4))
            assert len(reservation.ticket.block_ids) == 3  # 12 tokens in blocks of 4
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
        worker = DecodeWorker(config, role="mixed")
        await worker.start()
        try:
            await worker.generate("m", list(range(3, 15)), SamplingParams(max_tokens=100, ignore_eos=True))
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
    assert engine.reserve_for_transfer("kv", list(range(20, 36)), SamplingParams(max_tokens=1))
    for _ in range(20):
        engine.step()  # "run" grows, gets preempted, then cannot come back while "kv" holds blocks
    assert engine.stalled and "run" in engine.scheduler.requests
    engine.start_after_transfer("kv", 5)  # max_tokens 1: finishes and frees its blocks
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks
