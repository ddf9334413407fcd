"""The router's gRPC front door: the pdserve.v1.Generation servicer and the server around it.

Admission happens here (step 1 of a request's life): the request is converted from protobuf
and checked by router.intake (validate, tokenize, check the context length), then router.relay
streams the backend's tokens back as text (step 6) and tells the backend when the client no
longer wants them (step 7). Errors end the stream with a gRPC status and never take the server
down. The HTTP front door (router.http) shares intake and relay.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.sampling_params import SamplingParams
from protos.pdserve.v1 import generation_pb2 as pb
from protos.pdserve.v1 import generation_pb2_grpc as pb_grpc
from router import relay
from router.backend import GenerationBackend, TokenDelta
from router.convert import from_proto, to_proto
from router.grpc_decode import DecodeGuardInterceptor, request_types
from router.intake import AdmittedRequest, Intake, InvalidArgument
from router.relay import FinalStats, Relay, RequestObservation
from router.security import Gatekeeper, RateLimited
from router.security.grpc_auth import ApiKeyInterceptor, metadata_value
from router.streaming import StreamChunk, TextStream
from router.takeover import ResumeError, take_over

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name


_STATUS = {
    relay.BUSY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    relay.TOO_LARGE: grpc.StatusCode.INVALID_ARGUMENT,
    relay.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    relay.INTERNAL: grpc.StatusCode.INTERNAL,
    relay.DISCONNECTED: grpc.StatusCode.CANCELLED,
}
_RESUME_CODES = {"not_found": grpc.StatusCode.NOT_FOUND, "out_of_range": grpc.StatusCode.OUT_OF_RANGE,
                 "still_running": grpc.StatusCode.UNAVAILABLE}


class GenerationServicer(pb_grpc.GenerationServicer):
    """Serves Generate / ListModels on top of a GenerationBackend.

    tokenizer is duck-typed: encode(text) -> ids, apply_chat_template(messages,
    add_generation_prompt=True) -> ids, vocab_size, and whatever engine.detokenizer needs.
    observe, when given, receives each request's router.relay.RequestObservation (metrics).
    API keys are checked before a call gets here (ApiKeyInterceptor); the gatekeeper's limits,
    rate limits and streams per connection here.
    """

    def __init__(self, backend: GenerationBackend, tokenizer: Any, default_max_tokens: int | None = None,
                 observe: Callable[[RequestObservation], None] | None = None,
                 gatekeeper: Gatekeeper | None = None) -> None:
        self._backend = backend
        self._gate = gatekeeper or Gatekeeper()
        self._intake = Intake(backend, tokenizer, default_max_tokens, limits=self._gate.limits)
        self._relay = Relay(backend, tokenizer, observe)
        self._active_ids: set[str] = set()  # request ids with a stream open on this servicer

    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        max_len = self._backend.max_model_len
        return pb.ListModelsResponse(
            models=[pb.ModelInfo(name=n, max_model_len=max_len) for n in self._backend.model_names()]
        )

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> None:
        # Responses go out through context.write rather than `yield`: a cancellation then lands
        # in this coroutine (at a write or while waiting on the backend), so the abort in the
        # relay always runs, instead of in grpc's own task while a generator sits suspended.
        admitted_at = time.monotonic()
        peer = context.peer()
        if not self._gate.streams.try_open(peer):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._gate.streams.refusal(peer))
        try:
            if request.HasField("resume_from"):
                await self._resume(request, context, admitted_at)
            else:
                await self._generate(request, context, admitted_at)
        finally:
            self._gate.streams.close(peer)

    async def _generate(self, request: pb.GenerateRequest, context: Any, admitted_at: float) -> None:
        try:
            admitted = replace(await self._intake.admit_async(from_proto(request), admitted_at),
                               owner=self._owner(context))
            admitted = self._gate.quota.fit_defaulted_max_tokens(admitted)
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))  # raises
            return
        except Exception as exc:  # a tokenizer bug must fail this request only
            logger.exception("admitting a request failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"tokenization failed: {exc}")
            return
        grant = await self._charge(context, admitted)
        stream = self._relay.text_stream(admitted)
        try:
            await self._run(admitted, context, stream)
        finally:
            await self._gate.quota.give_back(grant, stream.num_output_tokens)

    async def _run(self, admitted: AdmittedRequest, context: Any, stream: TextStream, deltas: Any = None) -> None:
        request_id = admitted.request_id
        if request_id in self._active_ids:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"request_id: {request_id!r} is already streaming"
            )
        self._active_ids.add(request_id)

        async def emit(chunk: StreamChunk, final: FinalStats | None) -> None:
            await context.write(to_proto(request_id, chunk, final))

        try:
            failure = await self._relay.run(admitted, emit, stream, deltas)
        finally:
            self._active_ids.discard(request_id)
        if failure is not None:
            message = failure.message
            if failure.kind == relay.TOO_LARGE:
                message = f"sampling_params.max_tokens: {message}"
            await context.abort(_STATUS[failure.kind], message)

    def _owner(self, context: Any) -> str:
        return self._gate.owner(metadata_value(context.invocation_metadata(), "authorization"))

    async def _charge(self, context: Any, admitted: AdmittedRequest):
        """Take the request's share of its key's rate limits; RESOURCE_EXHAUSTED with a
        `retry-after` (seconds) in the trailing metadata when it is over them."""
        if not self._gate.quota.enabled:
            return None
        client = self._gate.client_id(metadata_value(context.invocation_metadata(), "authorization"),
                                      context.peer())
        try:
            return await self._gate.quota.take(client, len(admitted.prompt_token_ids), admitted.params.max_tokens)
        except RateLimited as exc:
            retry = exc.retry_after_header
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc),
                                (("retry-after", retry),) if retry else ())

    # --- resuming a stream another router began -------------------------------------------
    async def _resume(self, request: pb.GenerateRequest, context: Any, admitted_at: float) -> None:
        """Continue a journaled stream from the client's `resume_from` tokens on, for the key that
        began it only (another key's stream reads as NOT_FOUND). It takes nothing from the rate
        limits: the stream's admission took its prompt and all of its max_tokens, and the router
        that died never gave back what it did not generate."""
        request_id, resume_from = request.request_id, request.resume_from
        if not request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: required with resume_from")
        if resume_from < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"resume_from: must be at least 0, got {resume_from}")
        if getattr(self._backend, "journal", None) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "resume_from: this router keeps no request journal")
        owner = self._owner(context)
        try:
            resumed = await take_over(self._backend, getattr(self._backend, "routers", None),
                                      request_id, resume_from, owner=owner)
        except ResumeError as exc:
            await context.abort(_RESUME_CODES[exc.code], f"resume_from: {exc}")
            return
        admitted = AdmittedRequest(request_id, resumed.prompt_token_ids, resumed.params, 0, admitted_at, owner)
        stream = self._relay.text_stream(admitted)
        # The client has these tokens; replaying them puts the detokenizer and the stop-string
        # matcher where the dead router left them, text held back included.
        stream.process(TokenDelta(request_id, tuple(resumed.delivered)))
        if stream.finished:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, f"resume_from: the stream ended at a "
                                f"stop string within its first {resume_from} tokens")
        await self._run(admitted, context, stream, resumed.deltas)


class GrpcServer:
    """A grpc.aio server with the Generation service, standard health and reflection.

    Health reports NOT_SERVING until set_serving(True); the caller flips it once the backend's
    workers are ready.
    """

    def __init__(
        self, backend: GenerationBackend, tokenizer: Any, host: str = "0.0.0.0", port: int = 50051, *,
        default_max_tokens: int | None = None, observe: Callable[[RequestObservation], None] | None = None,
        gatekeeper: Gatekeeper | None = None,
    ) -> None:
        self._address = f"{host}:{port}"
        self._gate = gatekeeper or Gatekeeper()
        open_services = (health.SERVICE_NAME, reflection.SERVICE_NAME)
        interceptors = [ApiKeyInterceptor(self._gate.keys, open_services),
                        DecodeGuardInterceptor(request_types(pb.DESCRIPTOR.services_by_name["Generation"], pb))]
        self._server = grpc.aio.server(options=server_options(self._gate), interceptors=interceptors)
        self._health = health.aio.HealthServicer()
        self._tokenizer = tokenizer
        self.port: int | None = None  # the bound port, known after start()
        self.servicer = GenerationServicer(backend, tokenizer, default_max_tokens, observe, self._gate)
        pb_grpc.add_GenerationServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )

    async def start(self) -> int:
        """Bind and start; returns the port (useful with port 0, which picks a free one)."""
        try:
            if self._gate.tls is None:
                self.port = self._server.add_insecure_port(self._address)
            else:
                self.port = self._server.add_secure_port(self._address, self._gate.tls.grpc_credentials())
        except RuntimeError as exc:
            raise RuntimeError(f"cannot listen on {self._address}: {exc}") from exc
        await self.set_serving(False)
        # The first detokenizer built for a tokenizer may fill per-vocabulary tables (lazily
        # cached); build one now so that cost is not billed to the first request's TTFT.
        TextStream(self._tokenizer, [], SamplingParams())
        await self._server.start()
        logger.info("gRPC server listening on %s (port %d)%s", self._address, self.port,
                    "" if self._gate.tls is None else " with mutual TLS" if self._gate.tls.mutual else " with TLS")
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):  # "" is the whole server
            await self._health.set(service, status)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, refuse new RPCs, let running streams finish for `grace` seconds."""
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


def server_options(gate: Gatekeeper) -> list[tuple[str, int]]:
    limits = gate.limits
    return [
        # SO_REUSEPORT off: a second router on the same port must fail to bind, not silently
        # share the port with the first one.
        ("grpc.so_reuseport", 0),
        # A bigger message is refused by gRPC itself with RESOURCE_EXHAUSTED naming both sizes.
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        # HTTP/2's own cap sits above the servicer's, which refuses the stream past the limit with
        # a message (at HTTP/2's cap a client's extra streams would wait, not fail); the headroom
        # leaves health checks and ListModels through.
        ("grpc.max_concurrent_streams", limits.max_streams_per_connection + 16),
    ]


async def serve_grpc(
    backend: GenerationBackend,
    tokenizer: Any,
    host: str = "0.0.0.0",
    port: int = 50051,
    grace: float = 5.0,
    on_started: Callable[[int], None] | None = None,
    default_max_tokens: int | None = None,
    observe: Callable[[RequestObservation], None] | None = None,
    gatekeeper: Gatekeeper | None = None,
) -> None:
    """Serve until cancelled, then stop gracefully. The backend must already be ready.

    on_started, when given, is called with the bound port once the server reports SERVING.
    Health follows the backend's can_serve() when it has one.
    """
    from router.health import follow_health

    server = GrpcServer(backend, tokenizer, host, port, default_max_tokens=default_max_tokens, observe=observe,
                        gatekeeper=gatekeeper)
    await server.start()
    await server.set_serving(True)
    health = None
    if hasattr(backend, "can_serve"):
        health = asyncio.get_running_loop().create_task(follow_health(backend.can_serve, server.set_serving))
    if on_started is not None:
        on_started(server.port)
    try:
        await server.wait_for_termination()
    finally:
        if health is not None:
            health.cancel()
        await asyncio.shield(server.stop(grace))
