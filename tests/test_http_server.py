"""The HTTP front door on a fake backend: status codes of backend failures, health, defaults.

A real aiohttp server on 127.0.0.1 in front of the gRPC tests' FakeBackend and FakeTokenizer;
what needs a real cluster (same tokens as gRPC, freed blocks, worker metrics) is in
tests/test_http_api.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
import pytest

from router.http import HttpServer
from router.metrics import ServingMetrics
from tests.test_grpc_server import SCRIPT, SCRIPT_TEXT, FakeBackend, FakeTokenizer

MSG = [{"role": "user", "content": "hi"}]


class ServingFake(FakeBackend):
    """A FakeBackend whose can_serve() the test sets."""

    serving = True

    def can_serve(self) -> bool:
        return self.serving


@contextlib.asynccontextmanager
async def serving(backend: FakeBackend, **options):
    server = HttpServer(backend, FakeTokenizer(), "127.0.0.1", 0, **options)
    port = await server.start()
    await server.set_serving(True)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            yield session, server
    finally:
        await server.stop()


async def post(session: aiohttp.ClientSession, path: str, body: dict) -> tuple[int, dict]:
    async with session.post(path, json=body) as response:
        return response.status, await response.json()


def run(coro):
    return asyncio.run(coro)


def test_a_full_queue_is_429_and_no_worker_is_503_in_openai_shape() -> None:
    async def scenario():
        async with serving(FakeBackend(queue_full="iterate")) as (session, _):
            full = await post(session, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
            streamed = await post(session, "/v1/chat/completions", {"messages": MSG, "stream": True})
        async with serving(FakeBackend(fail_after=0)) as (session, _):
            down = await post(session, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        return full, streamed, down
    full, streamed, down = run(scenario())
    assert full[0] == 429 and full[1]["error"]["type"] == "rate_limit_exceeded"
    assert "retry later" in full[1]["error"]["message"]
    assert streamed[0] == 429  # nothing was streamed yet: the status still tells
    assert down[0] == 503 and "decode worker 0 died" in down[1]["error"]["message"]


def test_a_failure_mid_stream_ends_the_events_with_an_error_and_done() -> None:
    async def scenario():
        async with serving(FakeBackend(fail_after=3)) as (session, _):
            async with session.post("/v1/completions", json={"prompt": "hi", "max_tokens": 6,
                                                             "stream": True}) as response:
                return response.status, await response.text()
    status, text = run(scenario())
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert status == 200 and events[-1] == "[DONE]"
    assert "backend unavailable" in json.loads(events[-2])["error"]["message"]
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2]) == "Hello world"


def test_health_follows_the_backend() -> None:
    backend = ServingFake()

    async def scenario():
        async with serving(backend) as (session, server):
            statuses = []
            for serving_now in (True, False, True):
                backend.serving = serving_now
                async with session.get("/health") as response:
                    statuses.append(response.status)
            await server.set_serving(False)
            async with session.get("/health") as response:
                statuses.append(response.status)
                body = await response.json()
        return statuses, body
    statuses, body = run(scenario())
    assert statuses == [200, 503, 200, 503]
    assert body["error"]["code"] == "not_serving"


def test_max_tokens_defaults_to_the_context_left_or_the_server_default() -> None:
    backend = FakeBackend()

    async def scenario():
        async with serving(backend) as (session, _):
            await post(session, "/v1/chat/completions", {"messages": MSG})
        async with serving(backend, default_max_tokens=5) as (session, _):
            await post(session, "/v1/completions", {"prompt": "hi"})
            await post(session, "/v1/completions", {"prompt": "hi", "max_tokens": 7})
            await post(session, "/v1/chat/completions", {"messages": MSG, "max_completion_tokens": 3})
    run(scenario())
    prompt_len = len(FakeTokenizer().apply_chat_template(MSG, add_generation_prompt=True))
    assert [params.max_tokens for _, _, params in backend.calls] == [
        FakeBackend.max_model_len - prompt_len, 5, 7, 3]


def test_stop_strings_and_sampling_fields_reach_the_backend() -> None:
    backend = FakeBackend()

    async def scenario():
        async with serving(backend) as (session, _):
            return await post(session, "/v1/completions", {
                "prompt": [5, 6, 7], "max_tokens": len(SCRIPT), "stop": "caf", "seed": 3, "top_k": 4,
                "min_p": 0.1, "repetition_penalty": 1.2, "presence_penalty": 0.5, "frequency_penalty": 0.25,
                "ignore_eos": True, "temperature": 0.7, "top_p": 0.9, "user": "someone", "unknown_extra": 1})
    status, body = run(scenario())
    assert status == 200
    assert body["choices"][0]["text"] == SCRIPT_TEXT.split(" caf")[0] + " "
    assert body["choices"][0]["finish_reason"] == "stop"
    _, prompt_ids, params = backend.calls[0]
    assert prompt_ids == [5, 6, 7]
    assert (params.seed, params.top_k, params.min_p, params.repetition_penalty, params.presence_penalty,
            params.frequency_penalty, params.ignore_eos, params.temperature, params.top_p, params.stop) == (
        3, 4, 0.1, 1.2, 0.5, 0.25, True, 0.7, 0.9, ("caf",))
    assert backend.aborted  # the stop string ended it while the backend still ran it


def test_metrics_count_requests_of_a_server_with_no_cluster_behind_it() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    metrics = ServingMetrics()

    async def scenario():
        async with serving(FakeBackend(), metrics=metrics) as (session, _):
            for n in (2, 3):
                await post(session, "/v1/completions", {"prompt": "hi", "max_tokens": n})
            async with session.get("/metrics") as response:
                return await response.text()
    families = {f.name: f for f in text_string_to_metric_families(run(scenario()))}
    generated = families["pdserve:generation_tokens"].samples[0].value
    success = {s.labels["finished_reason"]: s.value for s in families["pdserve:request_success"].samples
               if s.name.endswith("_total")}
    assert generated == 5 and success == {"length": 2}


def test_http_server_refuses_a_nonsense_body_limit() -> None:
    with pytest.raises(ValueError):
        HttpServer(FakeBackend(), FakeTokenizer(), max_body_bytes=0)

