"""The admission queue: priority then arrival order, the bound and its message, cancels."""
from __future__ import annotations

import asyncio

import pytest

from engine.sampling_params import SamplingParams
from router.admission import AdmissionQueue, QueuedRequest
from router.backend import QueueFullError


def run(coro):
    return asyncio.run(coro)


def entry(rid: str, priority: int = 0) -> QueuedRequest:
    return QueuedRequest(rid, [1, 2, 3], SamplingParams(), priority)


def test_lower_priority_first_then_arrival_order():
    async def scenario():
        queue = AdmissionQueue(10)
        for rid, priority in (("a", 0), ("b", 5), ("c", -1), ("d", 0), ("e", 5)):
            queue.put(entry(rid, priority))
        return [queue.pop().request_id for _ in range(len(queue))]
    assert run(scenario()) == ["c", "a", "d", "b", "e"]


def test_full_queue_refuses_naming_the_limit_and_a_cancel_frees_its_place():
    async def scenario():
        queue = AdmissionQueue(2)
        first, second = entry("a"), entry("b")
        queue.put(first)
        queue.put(second)
        with pytest.raises(QueueFullError, match=r"--max-queued-requests 2") as err:
            queue.put(entry("c"))
        assert "2 requests are waiting" in str(err.value)
        assert queue.remove(first) and not queue.remove(first)
        assert len(queue) == 1
        queue.put(entry("c"))  # the cancelled request's place is free at once
        return [queue.pop().request_id for _ in range(len(queue))]
    assert run(scenario()) == ["b", "c"]


def test_a_requeued_request_keeps_its_place_at_the_head():
    async def scenario():
        queue = AdmissionQueue(1)
        head = entry("a")
        queue.put(head)
        taken = queue.pop()
        queue.put(entry("b"))  # the bound counts waiting requests only
        queue.requeue(taken)  # no worker admitted it: back in line, ahead of "b"
        return [queue.pop().request_id for _ in range(len(queue))]
    assert run(scenario()) == ["a", "b"]


def test_zero_queue_refuses_everything_that_must_wait():
    async def scenario():
        with pytest.raises(QueueFullError, match="--max-queued-requests 0"):
            AdmissionQueue(0).put(entry("a"))
    run(scenario())
