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
from router.backend import BackendError, GenerationBackend, QueueFullError, RequestTooLargeError
from router.convert import FinalStats, GenerateInput, InvalidArgument, from_proto, to_proto
from router.streaming import TextStream

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
Failure = tuple[grpc.StatusCode, str]


class GenerationServicer(pb_grpc.GenerationServicer):
    """Serves Generate / ListModels on top of a GenerationBackend.

    tokenizer is duck-typed: encode(text) -> ids, apply_chat_template(messages,
    add_generation_prompt=True) -> ids, vocab_size, and whatever engine.detokenizer needs.
    """

    def __init__(self, backend: GenerationBackend, tokenizer: Any) -> None:
        self._backend = backend
        self._tokenizer = tokenizer
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
        try:
            request_id, prompt_ids, params, priority = self._admit(request)
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))  # raises
            return
        except Exception as exc:  # a tokenizer bug must fail this request only
            logger.exception("admitting a request failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"tokenization failed: {exc}")
            return
        if request_id in self._active_ids:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"request_id: {request_id!r} is already streaming"
            )
        self._active_ids.add(request_id)
        try:
            failure = await self._stream(request_id, prompt_ids, params, priority, context, admitted_at)
        finally:
            self._active_ids.discard(request_id)
        if failure is not None:
            await context.abort(*failure)

    # --- admission ----------------------------------------------------------------------
    def _admit(self, request: pb.GenerateRequest) -> tuple[str, list[int], SamplingParams, int]:
        """Validate and tokenize; raises InvalidArgument naming the offending field."""
        checked = from_proto(request)
        self._check_model(checked.model)
        prompt_ids = self._tokenize(checked)
        self._check_token_range("sampling_params.stop_token_ids", checked.params.stop_token_ids)
        params = self._fit_context(checked, len(prompt_ids))
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
    ) -> Failure | None:
        """Relay backend deltas to the client; returns the failure to report, if any.

        Invariant: when this returns or raises, the backend holds nothing for the request —
        either it finished on its own, refused it, or abort() was called.
        """
        stream = TextStream(self._tokenizer, prompt_ids, params)
        held_by_backend = True
        first_token_at: float | None = None
        deltas = None
        try:
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
        self, backend: GenerationBackend, tokenizer: Any, host: str = "0.0.0.0", port: int = 50051
    ) -> None:
        self._address = f"{host}:{port}"
        # SO_REUSEPORT off: a second router on the same port must fail to bind, not silently
        # share the port with the first one.
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self._health = health.aio.HealthServicer()
        self._tokenizer = tokenizer
        self.port: int | None = None  # the bound port, known after start()
        pb_grpc.add_GenerationServicer_to_server(GenerationServicer(backend, tokenizer), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )

    async def start(self) -> int:
        """Bind and start; returns the port (useful with port 0, which picks a free one)."""
        try:
            self.port = self._server.add_insecure_port(self._address)
        except RuntimeError as exc:
            raise RuntimeError(f"cannot listen on {self._address}: {exc}") from exc
        await self.set_serving(False)
        # The first detokenizer built for a tokenizer may fill per-vocabulary tables (lazily
        # cached); build one now so that cost is not billed to the first request's TTFT.
        TextStream(self._tokenizer, [], SamplingParams())
        await self._server.start()
        logger.info("gRPC server listening on %s (port %d)", self._address, self.port)
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


async def serve_grpc(
    backend: GenerationBackend,
    tokenizer: Any,
    host: str = "0.0.0.0",
    port: int = 50051,
    grace: float = 5.0,
    on_started: Callable[[int], None] | None = None,
) -> None:
    """Serve until cancelled, then stop gracefully. The backend must already be ready.

    on_started, when given, is called with the bound port once the server reports SERVING.
    """
    server = GrpcServer(backend, tokenizer, host, port)
    await server.start()
    await server.set_serving(True)
    if on_started is not None:
        on_started(server.port)
    try:
        await server.wait_for_termination()
    finally:
        await asyncio.shield(server.stop(grace))
