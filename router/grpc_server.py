"""The router's gRPC front door: the pdserve.v1.Generation servicer and the server around it.

Admission happens here (step 1 of a request's life): validate, tokenize, check the context
length, then stream the backend's tokens back as text (step 6) and tell the backend when the
client no longer wants them (step 7). Errors end the stream with a gRPC status and never take
the server down.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.sampling_params import SamplingParams
from protos.pdserve.v1 import generation_pb2 as pb
from protos.pdserve.v1 import generation_pb2_grpc as pb_grpc
from router.backend import BackendError, GenerationBackend, QueueFullError, RequestTooLargeError, TokenDelta
from router.convert import FinalStats, GenerateInput, InvalidArgument, from_proto, to_proto
from router.grpc_decode import DecodeGuardInterceptor, request_types
from router.security import Gatekeeper, RateLimited
from router.security.grpc_auth import ApiKeyInterceptor, metadata_value
from router.streaming import TextStream
from router.takeover import ResumeError, take_over

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
Failure = tuple[grpc.StatusCode, str]


class GenerationServicer(pb_grpc.GenerationServicer):
    """Serves Generate / ListModels on top of a GenerationBackend.

    tokenizer is duck-typed: encode(text) -> ids, apply_chat_template(messages,
    add_generation_prompt=True) -> ids, vocab_size, and whatever engine.detokenizer needs.
    """

    def __init__(self, backend: GenerationBackend, tokenizer: Any, gatekeeper: Gatekeeper | None = None) -> None:
        self._backend = backend
        self._tokenizer = tokenizer
        self._gate = gatekeeper or Gatekeeper()  # API keys are checked before: ApiKeyInterceptor
        self._active_ids: set[str] = set()  # request ids with a stream open on this servicer

    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        max_len = self._backend.max_model_len
        return pb.ListModelsResponse(
            models=[pb.ModelInfo(name=n, max_model_len=max_len) for n in self._backend.model_names()]
        )

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> None:
        # Responses go out through context.write rather than `yield`: a cancellation then lands
        # in this coroutine (at a write or while waiting on the backend), so the abort below
        # always runs, instead of in grpc's own task while a generator sits suspended.
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
            request_id, prompt_ids, params, priority = self._admit(request)
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))  # raises
            return
        except Exception as exc:  # a tokenizer bug must fail this request only
            logger.exception("admitting a request failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"tokenization failed: {exc}")
            return
        grant = await self._charge(context, len(prompt_ids), params.max_tokens)
        stream = TextStream(self._tokenizer, prompt_ids, params)
        try:
            await self._relay(request_id, prompt_ids, params, priority, context, admitted_at, stream)
        finally:
            await self._gate.quota.give_back(grant, stream.num_output_tokens)

    async def _relay(self, request_id: str, prompt_ids: list[int], params: SamplingParams, priority: int,
                     context: Any, admitted_at: float, stream: TextStream, deltas: Any = None) -> None:
        if request_id in self._active_ids:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"request_id: {request_id!r} is already streaming"
            )
        self._active_ids.add(request_id)
        try:
            failure = await self._stream(request_id, prompt_ids, params, priority, context, admitted_at,
                                         stream, deltas)
        finally:
            self._active_ids.discard(request_id)
        if failure is not None:
            await context.abort(*failure)

    async def _charge(self, context: Any, prompt_tokens: int, max_tokens: int):
        """Take the request's share of its key's rate limits; RESOURCE_EXHAUSTED with a
        `retry-after` (seconds) in the trailing metadata when it is over them."""
        if not self._gate.quota.enabled:
            return None
        client = self._gate.client_id(metadata_value(context.invocation_metadata(), "authorization"),
                                      context.peer().rsplit(":", 1)[0])
        try:
            return await self._gate.quota.take(client, prompt_tokens, max_tokens)
        except RateLimited as exc:
            retry = exc.retry_after_header
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc),
                                (("retry-after", retry),) if retry else ())

    # --- resuming a stream another router began -------------------------------------------
    async def _resume(self, request: pb.GenerateRequest, context: Any, admitted_at: float) -> None:
        """Continue a journaled stream from the client's `resume_from` tokens on."""
        request_id, resume_from = request.request_id, request.resume_from
        if not request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: required with resume_from")
        if resume_from < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"resume_from: must be at least 0, got {resume_from}")
        if getattr(self._backend, "journal", None) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "resume_from: this router keeps no request journal")
        try:
            resumed = await take_over(self._backend, getattr(self._backend, "routers", None),
                                      request_id, resume_from)
        except ResumeError as exc:
            await context.abort(_RESUME_CODES[exc.code], f"resume_from: {exc}")
            return
        stream = TextStream(self._tokenizer, resumed.prompt_token_ids, resumed.params)
        # The client has these tokens; replaying them puts the detokenizer and the stop-string
        # matcher where the dead router left them, text held back included.
        stream.process(TokenDelta(request_id, tuple(resumed.delivered)))
        if stream.finished:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, f"resume_from: the stream ended at a "
                                f"stop string within its first {resume_from} tokens")
        await self._relay(request_id, resumed.prompt_token_ids, resumed.params, 0, context, admitted_at,
                          stream, resumed.deltas)

    # --- admission ----------------------------------------------------------------------
    def _admit(self, request: pb.GenerateRequest) -> tuple[str, list[int], SamplingParams, int]:
        """Validate and tokenize; raises InvalidArgument naming the offending field."""
        checked = from_proto(request)
        self._check_model(checked.model)
        prompt_ids = self._tokenize(checked)
        self._check_token_range("sampling_params.stop_token_ids", checked.params.stop_token_ids)
        params = self._fit_context(checked, len(prompt_ids))
        self._gate.limits.check_params(params)
        self._gate.limits.check_prompt_tokens(len(prompt_ids), checked.input_field)
        return checked.request_id or f"req-{uuid.uuid4().hex}", prompt_ids, params, checked.priority

    def _check_model(self, model: str) -> None:
        served = self._backend.model_names()
        if model and model not in served:
            raise InvalidArgument("model", f"unknown model {model!r}; served: {', '.join(served)}")

    def _tokenize(self, checked: GenerateInput) -> list[int]:
        # Tokenizing runs on the event loop: fast tokenizers take well under a millisecond per
        # kilobyte, less than a thread hop would cost.
        if checked.token_ids is not None:
            self._check_token_range("token_ids.ids", checked.token_ids)
            return list(checked.token_ids)
        field = checked.input_field
        if checked.prompt is not None:
            ids = self._tokenizer.encode(checked.prompt)
        else:
            try:
                ids = self._tokenizer.apply_chat_template(
                    checked.chat_messages(), add_generation_prompt=True
                )
            except Exception as exc:  # a template rejects bad role orders with its own errors
                raise InvalidArgument(field, f"chat template failed: {exc}") from exc
        if isinstance(ids, Mapping):  # HF tokenizers may return an encoding dict
            ids = ids["input_ids"]
        if not ids:
            raise InvalidArgument(field, "tokenizes to no tokens")
        return [int(t) for t in ids]

    def _check_token_range(self, field: str, ids: tuple[int, ...]) -> None:
        vocab_size = self._tokenizer.vocab_size
        for i, token_id in enumerate(ids):
            if not 0 <= token_id < vocab_size:
                raise InvalidArgument(
                    f"{field}[{i}]", f"token id {token_id} is outside [0, {vocab_size})"
                )

    def _fit_context(self, checked: GenerateInput, prompt_len: int) -> SamplingParams:
        """Check prompt + max_tokens against the context; lower a defaulted max_tokens to fit."""
        max_len = self._backend.max_model_len
        if prompt_len >= max_len:
            raise InvalidArgument(
                checked.input_field, f"prompt has {prompt_len} tokens; the model's context is {max_len} tokens"
            )
        params, room = checked.params, max_len - prompt_len
        if params.max_tokens <= room:
            return params
        if checked.max_tokens_explicit:
            raise InvalidArgument(
                "sampling_params.max_tokens",
                f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"model's context of {max_len} tokens",
            )
        return replace(params, max_tokens=room)

    # --- streaming ----------------------------------------------------------------------
    async def _stream(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        priority: int,
        context: Any,
        admitted_at: float,
        stream: TextStream,
        deltas: Any = None,
    ) -> Failure | None:
        """Relay backend deltas to the client; returns the failure to report, if any.

        Invariant: when this returns or raises, the backend holds nothing for the request —
        either it finished on its own, refused it, or abort() was called.
        """
        held_by_backend = True
        first_token_at: float | None = None
        try:
            if deltas is None:
                deltas = self._backend.generate(request_id, prompt_ids, params, priority)
            async for delta in deltas:
                if first_token_at is None and delta.new_token_ids:
                    first_token_at = time.monotonic()
                chunk = stream.process(delta)
                if not stream.finished:
                    if chunk.token_ids or chunk.text:
                        await context.write(to_proto(request_id, chunk))
                    continue
                if stream.needs_backend_abort:  # a stop string matched; workers still run it
                    await self._abort_backend(request_id)
                held_by_backend = False
                final = _final_stats(len(prompt_ids), stream, admitted_at, first_token_at)
                await context.write(to_proto(request_id, chunk, final))
                return None
            return grpc.StatusCode.INTERNAL, "the backend ended the stream without a finish reason"
        except QueueFullError as exc:
            held_by_backend = False
            return grpc.StatusCode.RESOURCE_EXHAUSTED, f"server is busy, retry later: {exc}"
        except RequestTooLargeError as exc:
            held_by_backend = False
            return grpc.StatusCode.INVALID_ARGUMENT, f"sampling_params.max_tokens: {exc}"
        except BackendError as exc:
            return grpc.StatusCode.UNAVAILABLE, f"backend unavailable: {exc}"
        except Exception as exc:  # anything else ends this stream, never the server
            logger.exception("request %s failed", request_id)
            return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
        finally:
            await _close_quietly(deltas)
            if held_by_backend:
                await self._abort_backend(request_id)

    async def _abort_backend(self, request_id: str) -> None:
        # Shielded: on a client cancel or deadline this runs while the handler task is being
        # cancelled, and the workers must still free the request's KV blocks.
        try:
            await asyncio.shield(self._backend.abort(request_id))
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("aborting request %s on the backend failed", request_id)


_RESUME_CODES = {"not_found": grpc.StatusCode.NOT_FOUND, "out_of_range": grpc.StatusCode.OUT_OF_RANGE,
                 "still_running": grpc.StatusCode.UNAVAILABLE}


def _final_stats(
    prompt_tokens: int, stream: TextStream, admitted_at: float, first_token_at: float | None
) -> FinalStats:
    done_at = time.monotonic()
    return FinalStats(
        prompt_tokens=prompt_tokens,
        completion_tokens=stream.num_output_tokens,
        cached_prompt_tokens=stream.num_cached_tokens,
        time_to_first_token_s=(first_token_at or done_at) - admitted_at,
        total_time_s=done_at - admitted_at,
    )


async def _close_quietly(deltas: Any) -> None:
    aclose = getattr(deltas, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:
        logger.exception("closing a backend stream failed")


class GrpcServer:
    """A grpc.aio server with the Generation service, standard health and reflection.

    Health reports NOT_SERVING until set_serving(True); the caller flips it once the backend's
    workers are ready.
    """

    def __init__(
        self, backend: GenerationBackend, tokenizer: Any, host: str = "0.0.0.0", port: int = 50051,
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
        pb_grpc.add_GenerationServicer_to_server(GenerationServicer(backend, tokenizer, self._gate),
                                                 self._server)
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
    gatekeeper: Gatekeeper | None = None,
) -> None:
    """Serve until cancelled, then stop gracefully. The backend must already be ready.

    on_started, when given, is called with the bound port once the server reports SERVING.
    Health follows the backend's can_serve() when it has one.
    """
    from router.health import follow_health

    server = GrpcServer(backend, tokenizer, host, port, gatekeeper)
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
