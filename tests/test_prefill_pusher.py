"""The prefill side's KV pusher on a tiny model, driven directly (no Ray), over a real shm link."""
from __future__ import annotations

import random

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kv_transfer import KVLayout, create_receiver, create_sender
from kv_transfer.errors import TransferError
from prefill_worker.pusher import KVPusher, resolve_granularity

BLOCK_SIZE = 4


def _engine_and_link(tiny_checkpoints):
    """A tiny prefill engine (chunks of 8 tokens) and a shm link to a 40-block receiver."""
    config = EngineConfig.from_options(tiny_checkpoints["llama3"], dtype="float32", device="cpu",
                                       num_blocks=32, block_size=BLOCK_SIZE, max_num_batched_tokens=8)
    engine = LLMEngine(config, None, False)
    layout = KVLayout(**engine.kv_layout_fields())
    receiver = create_receiver("shm", layout, num_blocks=40, timeout_s=20)
    sender = create_sender("shm", layout)
    sender.connect(receiver.endpoint)
    return engine, layout, receiver, sender


@pytest.mark.parametrize("granularity", ["chunk", "layer"])
def test_pushed_blocks_equal_the_prefill_cache(tiny_checkpoints, granularity):
    """A 30-token prompt prefilled in chunks of 8 tokens; the decode side already caches the
    first 2 blocks, so blocks 2..7 (the last one partial) must land, bit for bit."""
    engine, layout, receiver, sender = _engine_and_link(tiny_checkpoints)
    pusher = KVPusher(sender, engine.runner.kv_cache, BLOCK_SIZE, engine.kv_manager.get_block_ids,
                      granularity)
    tables = []

    def after_forward(scheduled):
        tables.append(list(engine.kv_manager.get_block_ids("r")))
        pusher.after_forward(scheduled)

    engine.after_forward = after_forward
    engine.after_layer = pusher.after_layer
    try:
        engine.add_request(list(range(3, 33)), SamplingParams(max_tokens=1), "r")
        decode_blocks = random.Random(0).sample(range(40), 6)
        ticket = receiver.issue_ticket("r", decode_blocks, 30, "lease-r", first_token=8)
        pusher.track(ticket)
        while engine.has_unfinished_requests():
            engine.step()
        assert receiver.wait("r").name == "DONE"
        prefill_blocks = tables[-1][2:]
        assert len(tables) == 4 and len(prefill_blocks) == 6
        assert torch.equal(receiver.kv_cache[decode_blocks], engine.runner.kv_cache[prefill_blocks])
        sent = sender.snapshot()
        # Steps 2-4 complete blocks past the cached prefix: one push each, or one per layer.
        per_step = layout.num_layers if granularity == "layer" else 1
        assert sent.chunks == 3 * per_step
        assert receiver.snapshot().bytes == sent.bytes == 6 * layout.bytes_per_block
    finally:
        pusher.close()
        sender.close()
        receiver.close()


@pytest.mark.parametrize("granularity", ["chunk", "layer"])
def test_a_failed_push_is_reported_to_the_receiver_when_the_prefill_ends(tiny_checkpoints, granularity):
    """The first block push fails; the prefill goes on, and when it ends the receiver hears of
    the failure at once (not by its lease running out) and nothing stays tracked."""
    engine, _, receiver, sender = _engine_and_link(tiny_checkpoints)
    real_send, calls = sender.send_blocks, []

    def send_blocks(*args, **kwargs):
        calls.append(kwargs.get("start"))
        if len(calls) == 1:
            raise ConnectionError("link dropped")
        return real_send(*args, **kwargs)
    sender.send_blocks = send_blocks
    pusher = KVPusher(sender, engine.runner.kv_cache, BLOCK_SIZE, engine.kv_manager.get_block_ids,
                      granularity)
    engine.after_forward = pusher.after_forward
    engine.after_layer = pusher.after_layer
    try:
        engine.add_request(list(range(3, 33)), SamplingParams(max_tokens=1), "r")
        state = pusher.track(receiver.issue_ticket("r", list(range(8)), 30, "lease-r", first_token=0))
        while engine.has_unfinished_requests():
            engine.step()
        with pytest.raises(TransferError, match="link dropped"):
            receiver.wait("r")
        assert state.done.wait(5) and "link dropped" in state.failed
        assert calls == [0]  # nothing more was pushed for a request whose push failed
        assert pusher.states == {}
    finally:
        pusher.close()
        sender.close()
        receiver.close()


def test_auto_granularity_is_chunk():
    """Per-layer pushes stall a GPU's default stream; "auto" sends by chunk until the sender has
    a stream of its own (see resolve_granularity)."""
    assert resolve_granularity("auto", torch.device("cpu")) == "chunk"
    assert resolve_granularity("auto", torch.device("cuda")) == "chunk"
    assert resolve_granularity("layer", torch.device("cpu")) == "layer"
    with pytest.raises(ValueError, match="auto, chunk or layer"):
        resolve_granularity("block", torch.device("cpu"))
