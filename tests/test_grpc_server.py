"""The router's gRPC front door, through a real grpc.aio server on 127.0.0.1 and real stubs.

The cluster is replaced by FakeBackend (deterministic tokens, can hang, refuse or fail, records
aborts) and the tokenizer by FakeTokenizer, a byte-level vocabulary of a few words.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from engine.sampling_params import SamplingParams
from protos.pdserve.v1 import generation_pb2 as pb
from protos.pdserve.v1 import generation_pb2_grpc as pb_grpc
from router.backend import BackendError, QueueFullError, TokenDelta
from router.client import run_client
from router.grpc_server import GrpcServer, serve_grpc

EOS, BOS = 0, 1
# Id 2 + i is WORDS[i]. "é" is split over two tokens to exercise UTF-8 safe streaming.
WORDS = [b"Hello", b" wor", b"ld", b" caf", b"\xc3", b"\xa9", b"!", b" more"]
SCRIPT = (2, 3, 4, 5, 6, 7, 8, 9)
SCRIPT_TEXT = "Hello world café! more"
WAIT_S = 10.0  # a safety net against hangs, never a timing assertion


class FakeTokenizer:
    vocab_size = 64
    eos_token_ids = (EOS,)
    special_token_ids = frozenset({EOS, BOS})

    def __init__(self) -> None:
        filler = [bytes([ord("a") + i % 26]) for i in range(self.vocab_size - 2 - len(WORDS))]
        self.byte_level_token_bytes = [b"<eos>", b"<bos>", *WORDS, *filler]

    def encode(self, text: str) -> list[int]:
        return [BOS] + [2 + b % 60 for b in text.encode()]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        kept = [i for i in ids if not (skip_special_tokens and i in self.special_token_ids)]
        return b"".join(self.byte_level_token_bytes[i] for i in kept).decode(errors="replace")

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return self.encode(text + ("<assistant>" if add_generation_prompt else ""))


class FakeBackend:
    """Emits SCRIPT one token per step until max_tokens, then finishes with "length"."""

    max_model_len = 64

    def __init__(
        self,
        hang_after: int | None = None,
        queue_full: str | None = None,  # "call" or "iterate": where QueueFullError is raised
        fail_after: int | None = None,
        cached_tokens: int = 0,
    ) -> None:
        self.hang_after, self.queue_full, self.fail_after = hang_after, queue_full, fail_after
        self.cached_tokens = cached_tokens
        self.calls: list[tuple[str, list[int], SamplingParams]] = []
        self.priorities: list[int] = []
        self.aborted: list[str] = []
        self.abort_event = asyncio.Event()
        self._never = asyncio.Event()

    def model_names(self) -> list[str]:
        return ["tiny"]

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.abort_event.set()

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 priority: int = 0, owner: str = "") -> AsyncIterator[TokenDelta]:
        self.calls.append((request_id, prompt_ids, params))
        self.priorities.append(priority)
        if self.queue_full == "call":
            raise QueueFullError("8 requests waiting")
        return self._steps(request_id, params)

    async def _steps(self, request_id: str, params: SamplingParams) -> AsyncIterator[TokenDelta]:
        if self.queue_full == "iterate":
            raise QueueFullError("8 requests waiting")
        for step in range(params.max_tokens):
            if step == self.hang_after:
                await self._never.wait()
            if step == self.fail_after:
                raise BackendError("decode worker 0 died")
            token = SCRIPT[step % len(SCRIPT)]
            last = step == params.max_tokens - 1
            logprobs = None if params.logprobs is None else ({token: -0.25, EOS: -2.0},)
            cached = self.cached_tokens if step == 0 else 0
            yield TokenDelta(request_id, (token,), "length" if last else None, logprobs, cached)
            await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def serving(backend: FakeBackend, serving_state: bool = True):
    server = GrpcServer(backend, FakeTokenizer(), host="127.0.0.1", port=0)
    port = await server.start()
    if serving_state:
        await server.set_serving(True)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pb_grpc.GenerationStub(channel), channel, server
    finally:
        await channel.close()
        await server.stop(None)


def prompt_request(prompt: str = "hi", **params) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, sampling_params=pb.SamplingParams(**params))


async def collect(stub, request, **kwargs) -> list[pb.GenerateResponse]:
    return [r async for r in stub.Generate(request, **kwargs)]


def run(coro):
    return asyncio.run(coro)


# --- streaming ------------------------------------------------------------------------------
def test_stream_text_deltas_concatenate_and_final_carries_usage() -> None:
    async def scenario():
        backend = FakeBackend(cached_tokens=2)
        async with serving(backend) as (stub, _, _):
            request = prompt_request("hi", max_tokens=len(SCRIPT))
            request.request_id = "r1"
            responses = await collect(stub, request)
        return backend, responses

    backend, responses = run(scenario())
    assert "".join(r.text for r in responses) == SCRIPT_TEXT
    assert all("\ufffd" not in r.text for r in responses)
    assert [t for r in responses for t in r.token_ids] == list(SCRIPT)
    assert {r.request_id for r in responses} == {"r1"}
    assert [r.finish_reason for r in responses[:-1]] == [pb.FINISH_REASON_UNSPECIFIED] * (len(responses) - 1)
    final = responses[-1]
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (3, len(SCRIPT))
    assert final.usage.cached_prompt_tokens == 2
    assert 0 < final.timing.time_to_first_token_ms <= final.timing.total_time_ms
    assert backend.calls[0][1] == FakeTokenizer().encode("hi")
    assert backend.aborted == []  # the engine finished the request itself


def test_chat_input_uses_chat_template_and_logprobs_are_returned() -> None:
    async def scenario():
        backend = FakeBackend()
        async with serving(backend) as (stub, _, _):
            request = pb.GenerateRequest(sampling_params=pb.SamplingParams(max_tokens=2, logprobs=1))
            request.chat.messages.add(role="user", content="hey")
            responses = await collect(stub, request)
        return backend, responses

    backend, responses = run(scenario())
    assert backend.calls[0][1] == FakeTokenizer().apply_chat_template(
        [{"role": "user", "content": "hey"}], add_generation_prompt=True
    )
    entries = [lp for r in responses for lp in r.logprobs]
    assert [e.token_id for e in entries] == [2, 3]
    assert entries[0].logprob == -0.25
    assert [t.token_id for t in entries[0].top_logprobs] == [2, EOS]  # most likely first


def test_defaulted_max_tokens_is_lowered_to_fit_the_context() -> None:
    async def scenario():
        backend = FakeBackend()
        async with serving(backend) as (stub, _, _):
            responses = await collect(stub, prompt_request("x" * 55))  # 56 prompt tokens of 64
        return backend, responses

    backend, responses = run(scenario())
    assert backend.calls[0][2].max_tokens == 8
    assert responses[-1].usage.completion_tokens == 8


# --- invalid input --------------------------------------------------------------------------
def _token_ids_request(ids: list[int]) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids))


@pytest.mark.parametrize(
    "request_, field",
    [
        (pb.GenerateRequest(), "input"),
        (prompt_request(""), "prompt"),
        (pb.GenerateRequest(prompt="hi", model="llama-70b"), "model"),
        (prompt_request(max_tokens=0), "sampling_params.max_tokens"),
        (prompt_request(temperature=-0.5), "sampling_params.temperature"),
        (prompt_request(top_p=1.5), "sampling_params.top_p"),
        (prompt_request(logprobs=21), "sampling_params.logprobs"),
        (prompt_request(stop=[""]), "sampling_params.stop"),
        (prompt_request(stop_token_ids=[64]), "sampling_params.stop_token_ids[0]"),
        (prompt_request("x" * 59, max_tokens=10), "sampling_params.max_tokens"),
        (prompt_request("x" * 70), "prompt"),
        (_token_ids_request([5, 64]), "token_ids.ids[1]"),
        (_token_ids_request([-1]), "token_ids.ids[0]"),
        (_token_ids_request([]), "token_ids.ids"),
        (pb.GenerateRequest(chat=pb.ChatMessages()), "chat.messages"),
        (pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(content="x")])),
         "chat.messages[0].role"),
    ],
)
def test_invalid_input_is_rejected_naming_the_field(request_: pb.GenerateRequest, field: str) -> None:
    async def scenario():
        backend = FakeBackend()
        async with serving(backend) as (stub, _, _):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(stub, request_)
        return backend, info.value

    backend, error = run(scenario())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{field}: "), error.details()
    assert backend.calls == []


# --- backend refusals and failures ------------------------------------------------------------
@pytest.mark.parametrize("where", ["call", "iterate"])
def test_queue_full_is_resource_exhausted(where: str) -> None:
    async def scenario():
        backend = FakeBackend(queue_full=where)
        async with serving(backend) as (stub, _, _):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(stub, prompt_request())
        return info.value

    error = run(scenario())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "8 requests waiting" in error.details()


def test_priority_reaches_the_backend_and_a_request_too_large_is_invalid() -> None:
    from router.backend import RequestTooLargeError

    class TooLarge(FakeBackend):
        def generate(self, request_id, prompt_ids, params, priority=0, owner=""):
            if priority == 99:
                raise RequestTooLargeError("prompt + max_tokens is 900 tokens, the largest KV cache holds 512")
            return super().generate(request_id, prompt_ids, params, priority, owner)

    async def scenario():
        backend = TooLarge()
        async with serving(backend) as (stub, _, _):
            request = prompt_request(max_tokens=2)
            request.priority = -3
            await collect(stub, request)
            request.priority = 99
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(stub, request)
        return backend, info.value

    backend, error = run(scenario())
    assert backend.priorities[0] == -3
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_tokens" in error.details() and "largest KV cache" in error.details()


def test_backend_failure_mid_stream_ends_stream_and_server_keeps_serving() -> None:
    async def scenario():
        backend = FakeBackend(fail_after=2)
        async with serving(backend) as (stub, _, _):
            received = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for response in stub.Generate(prompt_request(max_tokens=5)):
                    received.append(response)
            backend.fail_after = None
            after = await collect(stub, prompt_request(max_tokens=2))
        return backend, received, info.value, after

    backend, received, error, after = run(scenario())
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "decode worker 0 died" in error.details()
    assert [t for r in received for t in r.token_ids] == list(SCRIPT[:2])
    assert len(backend.aborted) == 1  # the workers are told to free what they hold
    assert after[-1].finish_reason == pb.FINISH_REASON_LENGTH


# --- stop, cancel, deadline -------------------------------------------------------------------
def test_stop_string_spanning_tokens_ends_stream_with_stop_and_aborts() -> None:
    async def scenario():
        backend = FakeBackend()
        async with serving(backend) as (stub, _, _):
            request = prompt_request(max_tokens=len(SCRIPT), stop=["world"])
            request.request_id = "stopper"
            responses = await collect(stub, request)
        return backend, responses

    backend, responses = run(scenario())
    assert "".join(r.text for r in responses) == "Hello "
    assert responses[-1].finish_reason == pb.FINISH_REASON_STOP
    assert responses[-1].stop_string == "world"
    assert responses[-1].usage.completion_tokens == 3  # "Hello", " wor", "ld"
    assert backend.aborted == ["stopper"]


def test_client_cancel_mid_stream_aborts_backend_request() -> None:
    async def scenario():
        backend = FakeBackend(hang_after=2)
        async with serving(backend) as (stub, _, _):
            request = prompt_request(max_tokens=8)
            request.request_id = "cancel-me"
            call = stub.Generate(request)
            stream = call.__aiter__()
            first_two = [await stream.__anext__(), await stream.__anext__()]
            call.cancel()
            await asyncio.wait_for(backend.abort_event.wait(), WAIT_S)
            after = await collect(stub, prompt_request(max_tokens=1))
        return backend, first_two, after

    backend, first_two, after = run(scenario())
    assert [r.token_ids[0] for r in first_two] == list(SCRIPT[:2])
    assert backend.aborted == ["cancel-me"]
    assert after[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_deadline_mid_stream_aborts_backend_request() -> None:
    async def scenario():
        backend = FakeBackend(hang_after=1)
        async with serving(backend) as (stub, _, _):
            request = prompt_request(max_tokens=8)
            request.request_id = "too-slow"
            received = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for response in stub.Generate(request, timeout=1.5):
                    received.append(response)
            await asyncio.wait_for(backend.abort_event.wait(), WAIT_S)
        return backend, received, info.value

    backend, received, error = run(scenario())
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(received) == 1
    assert backend.aborted == ["too-slow"]


def test_duplicate_in_flight_request_id_is_refused() -> None:
    async def scenario():
        backend = FakeBackend(hang_after=1)
        async with serving(backend) as (stub, _, _):
            request = prompt_request(max_tokens=4)
            request.request_id = "same"
            first = stub.Generate(request)
            await first.__aiter__().__anext__()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(stub, request)
            first.cancel()
            await asyncio.wait_for(backend.abort_event.wait(), WAIT_S)
        return backend, info.value

    backend, error = run(scenario())
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert len(backend.calls) == 1 and backend.aborted == ["same"]


def test_graceful_stop_lets_a_running_stream_finish() -> None:
    async def scenario():
        backend = FakeBackend()
        server = GrpcServer(backend, FakeTokenizer(), host="127.0.0.1", port=0)
        port = await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = pb_grpc.GenerationStub(channel).Generate(prompt_request(max_tokens=len(SCRIPT)))
            stream = call.__aiter__()
            responses = [await stream.__anext__()]
            stopping = asyncio.create_task(server.stop(WAIT_S))
            responses += [r async for r in stream]
            await stopping
        return responses

    responses = run(scenario())
    assert "".join(r.text for r in responses) == SCRIPT_TEXT
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_serve_grpc_serves_until_cancelled_then_stops() -> None:
    async def scenario():
        started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            serve_grpc(FakeBackend(), FakeTokenizer(), "127.0.0.1", 0, 1.0, started.set_result)
        )
        port = await asyncio.wait_for(started, WAIT_S)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = health_pb2.HealthCheckRequest(service="")
            status = (await health_pb2_grpc.HealthStub(channel).Check(check)).status
            responses = await collect(pb_grpc.GenerationStub(channel), prompt_request(max_tokens=2))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health_pb2_grpc.HealthStub(channel).Check(check, timeout=WAIT_S)
        return status, responses, info.value

    status, responses, error = run(scenario())
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert "".join(r.text for r in responses) == "Hello wor"
    # Refused either way: a connection that races the close of the listening socket is accepted
    # by the shutting-down server and its call cancelled; later ones find nothing listening.
    assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def test_second_server_on_a_taken_port_fails_to_start() -> None:
    async def scenario():
        async with serving(FakeBackend()) as (_, _, server):
            clash = GrpcServer(FakeBackend(), FakeTokenizer(), host="127.0.0.1", port=server.port)
            with pytest.raises(RuntimeError, match="cannot listen on 127.0.0.1"):
                await clash.start()

    run(scenario())


# --- health, reflection, models ---------------------------------------------------------------
def test_health_reports_serving_only_once_marked_ready() -> None:
    async def scenario():
        async with serving(FakeBackend(), serving_state=False) as (_, channel, server):
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest
            before = await health.Check(check(service=""))
            await server.set_serving(True)
            whole = await health.Check(check(service=""))
            generation = await health.Check(check(service="pdserve.v1.Generation"))
        return before.status, whole.status, generation.status

    before, whole, generation = run(scenario())
    assert before == health_pb2.HealthCheckResponse.NOT_SERVING
    assert whole == generation == health_pb2.HealthCheckResponse.SERVING


def _generate_through_reflection(target: str) -> tuple[list[str], str]:
    """Discover the service by reflection and call it with messages built from the reflected
    descriptors only (a private pool, none of the generated classes)."""
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = list(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName("pdserve.v1.Generation").methods_by_name["Generate"]
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        request = request_cls(prompt="hi")
        request.sampling_params.max_tokens = 3
        generate = channel.unary_stream(
            "/pdserve.v1.Generation/Generate",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        text = "".join(r.text for r in generate(request, timeout=WAIT_S))
    return services, text


def test_reflection_lists_services_and_describes_generate() -> None:
    async def scenario():
        async with serving(FakeBackend()) as (_, channel, server):
            return await asyncio.to_thread(_generate_through_reflection, f"127.0.0.1:{server.port}")

    services, text = run(scenario())
    assert "pdserve.v1.Generation" in services
    assert "grpc.health.v1.Health" in services
    assert text == "Hello world"


def test_list_models() -> None:
    async def scenario():
        async with serving(FakeBackend()) as (stub, _, _):
            return await stub.ListModels(pb.ListModelsRequest())

    response = run(scenario())
    assert [(m.name, m.max_model_len) for m in response.models] == [("tiny", 64)]


# --- client -----------------------------------------------------------------------------------
def test_client_streams_text_and_reports_errors() -> None:
    async def scenario():
        async with serving(FakeBackend()) as (_, _, server):
            target = f"127.0.0.1:{server.port}"
            ok_out, ok_err = io.StringIO(), io.StringIO()
            ok = await asyncio.to_thread(
                run_client, target, "hi", max_tokens=len(SCRIPT), temperature=0.0,
                show_usage=True, out=ok_out, err=ok_err,
            )
            bad_out, bad_err = io.StringIO(), io.StringIO()
            bad = await asyncio.to_thread(
                run_client, target, "hi", max_tokens=0, chat=True, out=bad_out, err=bad_err
            )
            full_out = io.StringIO()
            full = await asyncio.to_thread(
                run_client, target, "hi", chat=True, out=full_out, err=io.StringIO(),
                params=SamplingParams(max_tokens=len(SCRIPT), stop=("world",)),
            )
        return (ok, ok_out.getvalue(), ok_err.getvalue()), (bad, bad_err.getvalue()), (full, full_out.getvalue())

    (ok, ok_out, ok_err), (bad, bad_err), (full, full_out) = run(scenario())
    assert (full, full_out) == (0, "Hello \n")
    assert ok == 0 and ok_out == SCRIPT_TEXT + "\n"
    assert f"completion={len(SCRIPT)}" in ok_err and "[length]" in ok_err
    assert bad != 0
    assert "INVALID_ARGUMENT" in bad_err and "sampling_params.max_tokens" in bad_err
