"""The HTTP server: aiohttp routes for the OpenAI endpoints, health and metrics.

A handler parses the body (router.http.protocol), admits the request through router.intake and
runs it through router.relay, exactly as the gRPC servicer does. The server cancels a handler
when its client disconnects (aiohttp's handler_cancellation), and the relay then aborts the
request on every worker. Every error, including aiohttp's own (unknown route, body over the size
limit), leaves as OpenAI's error JSON.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from aiohttp import web

from router import relay
from router.http.auth import api_key_middleware, charge, client_address, streams_exhausted_error
from router.http.errors import ApiError, bad_request
from router.http.protocol import ApiRequest, api_error, parse_chat, parse_completion
from router.http.responses import Answer
from router.intake import AdmittedRequest, Intake, InvalidArgument
from router.limits import StreamCounter
from router.metrics import CONTENT_TYPE, ServingMetrics
from router.relay import FinalStats, Relay, RelayFailure
from router.security import Gatekeeper
from router.streaming import StreamChunk, TextStream

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 2**20  # a whole long-context prompt as text or token ids fits easily
_STATUS = {relay.BUSY: 429, relay.TOO_LARGE: 400, relay.UNAVAILABLE: 503, relay.INTERNAL: 500}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class HttpServer:
    """The OpenAI-compatible API of one router on host:port (port 0 picks a free one).

    /health answers 503 until set_serving(True), and while the backend's can_serve() is False.
    `app` is the aiohttp Application: middlewares and routes may be added before start().
    """

    def __init__(self, backend: Any, tokenizer: Any, host: str = "0.0.0.0", port: int = 8000, *,
                 metrics: ServingMetrics | None = None, default_max_tokens: int | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, gatekeeper: Gatekeeper | None = None) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be at least 1, got {max_body_bytes}")
        self.backend = backend
        self.tokenizer = tokenizer
        self.host, self.requested_port = host, port
        self.metrics = metrics if metrics is not None else ServingMetrics(backend)
        self.gate = gatekeeper or Gatekeeper()
        self.intake = Intake(backend, tokenizer, default_max_tokens, limits=self.gate.limits)
        self.relay = Relay(backend, tokenizer, self.metrics.observe)
        self.streams = StreamCounter(self.gate.limits.max_streams_per_connection)  # per client address
        self.app = web.Application(client_max_size=max_body_bytes,
                                   middlewares=[openai_errors, api_key_middleware(self.gate.keys)])
        self.app.add_routes([
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/v1/models", self.models),
            web.get("/health", self.health),
            web.get("/metrics", self.metrics_text),
        ])
        self.port: int | None = None  # the bound port, known after start()
        self._serving = False
        self._runner: web.AppRunner | None = None

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self, grace_s: float = 5.0) -> int:
        """Bind and start; returns the port."""
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=grace_s)
        await self._runner.setup()
        ssl_context = self.gate.tls.ssl_context() if self.gate.tls is not None else None
        site = web.TCPSite(self._runner, self.host, self.requested_port, reuse_port=False, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise RuntimeError(f"cannot listen on {self.host}:{self.requested_port} (HTTP): {exc}") from exc
        self.port = self._runner.addresses[0][1]
        logger.info("HTTP server listening on %s (port %d)", self.host, self.port)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        self._serving = serving

    async def stop(self) -> None:
        """Refuse new connections, let running requests finish for the grace period, then close."""
        self._serving = False
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def can_serve(self) -> bool:
        can_serve = getattr(self.backend, "can_serve", None)
        return self._serving and (can_serve is None or bool(can_serve()))

    # --- endpoints -----------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        if self.can_serve():
            return web.json_response({"status": "ok"})
        raise ApiError(503, "no worker can serve requests now", code="not_serving")

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "pdserve",
                 "max_model_len": self.backend.max_model_len} for name in self.backend.model_names()]
        return web.json_response({"object": "list", "data": data})

    async def metrics_text(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_completion, "cmpl")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_chat, "chatcmpl")

    # --- one request -----------------------------------------------------------------------
    async def _generate(self, request: web.Request, parse: Callable[[Any], ApiRequest],
                        id_prefix: str) -> web.StreamResponse:
        admitted_at = time.monotonic()
        fields = await read_json(request)
        try:
            api = parse(fields)
            checked = replace(api.checked, request_id=f"{id_prefix}-{uuid.uuid4().hex}")
            admitted = replace(await self.intake.with_names(api.names).admit_async(checked, admitted_at),
                               owner=self.gate.owner(request.headers.get("Authorization")))
            admitted = self.gate.quota.fit_defaulted_max_tokens(admitted)
        except InvalidArgument as exc:
            raise api_error(exc) from exc
        answer = Answer(api, admitted.request_id, api.model or self.backend.model_names()[0], self.tokenizer)
        client = client_address(request)
        if not self.streams.try_open(client):
            raise streams_exhausted_error(self.streams.refusal(client))
        try:
            grant = await charge(self.gate, request, len(admitted.prompt_token_ids), admitted.params.max_tokens)
            stream = None
            try:
                stream = self.relay.text_stream(admitted)
                if api.stream:
                    return await self._stream(request, admitted, answer, stream)
                return await self._whole(admitted, answer, stream)
            finally:
                await self.gate.quota.give_back(grant, stream.num_output_tokens if stream else 0)
        finally:
            self.streams.close(client)

    async def _whole(self, admitted: AdmittedRequest, answer: Answer, stream: TextStream) -> web.Response:
        body: dict = {}

        async def emit(chunk: StreamChunk, final: FinalStats | None) -> None:
            answer.add(chunk)
            if final is not None:
                body.update(answer.whole(chunk.finish_reason, final))

        failure = await self.relay.run(admitted, emit, stream)
        if failure is not None:
            raise failure_error(failure, answer.api)
        return web.json_response(body)

    async def _stream(self, request: web.Request, admitted: AdmittedRequest, answer: Answer,
                      stream: TextStream) -> web.StreamResponse:
        response: web.StreamResponse | None = None

        async def send(event: dict | str) -> None:
            nonlocal response
            if response is None:  # headers go out with the first event: errors before it keep their status
                response = web.StreamResponse(headers=_SSE_HEADERS)
                await response.prepare(request)
            data = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
            await response.write(f"data: {data}\n\n".encode())

        async def emit(chunk: StreamChunk, final: FinalStats | None) -> None:
            answer.add(chunk)
            if answer.worth_sending(chunk, final):
                await send(answer.chunk(chunk, final))
            if final is not None:
                if answer.api.include_usage:
                    await send(answer.usage_chunk(final))
                await send("[DONE]")

        failure = await self.relay.run(admitted, emit, stream)
        if failure is not None and failure.kind == relay.DISCONNECTED:
            return response or web.Response(status=499)
        if failure is not None:
            error = failure_error(failure, answer.api)
            if response is None:
                raise error
            await send(error.body())  # mid-stream: the status is already sent
            await send("[DONE]")
        await response.write_eof()
        return response


def failure_error(failure: RelayFailure, api: ApiRequest) -> ApiError:
    if failure.kind == relay.TOO_LARGE:
        return bad_request(api.names.max_tokens, failure.message)
    status = _STATUS.get(failure.kind, 500)
    code = {429: "queue_full", 503: "no_worker"}.get(status)
    return ApiError(status, failure.message, code=code)


async def read_json(request: web.Request) -> Any:
    """The body as JSON; 413 over the size limit, 400 for anything that is not JSON (or holds a
    string that is not valid Unicode)."""
    raw = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    try:
        # Decoded here, strictly: json.loads of bytes lets UTF-8-encoded surrogates through.
        fields = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not valid UTF-8: {exc}", code="invalid_json") from exc
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError as exc:  # the parser recurses once per level of nesting
        raise ApiError(400, "the request body is JSON nested too deeply", code="invalid_json") from exc
    where = _surrogate_path(fields, "")
    if where is not None:  # a \ud800-style escape: a lone surrogate, no character at all
        what = "holds a lone UTF-16 surrogate, which is not a character"
        raise bad_request(where, what) if where else ApiError(400, f"the request body {what}", code="invalid_json")
    return fields


def _surrogate_path(value: Any, path: str) -> str | None:
    """The path of the first string with a lone surrogate (for a key: its object's path); None if
    no string has one. Iterative, and each path is written out only when found: a body nested
    as deep as the parser allows costs no recursion here."""
    stack: list[tuple[Any, tuple | None]] = [(value, (None, path) if path else None)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if any("\ud800" <= c <= "\udfff" for c in value):
                return _written_path(where)
        elif isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                stack.append((item, (where, f".{key}" if where else key)))
                stack.append((key, where))  # a key's surrogate is reported at its object
        elif isinstance(value, list):
            for i in range(len(value) - 1, -1, -1):
                stack.append((value[i], (where, f"[{i}]")))
    return None


def _written_path(where: tuple | None) -> str:
    parts = []
    while where is not None:
        where, part = where
        parts.append(part)
    return "".join(reversed(parts))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


@web.middleware
async def openai_errors(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every error as OpenAI's error JSON; a bug fails its request with a 500, never the server."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:  # aiohttp's own: 404 route, 405 method, 413 body too large
        if exc.status < 400:
            raise
        return ApiError(exc.status, exc.reason if exc.status != 413 else exc.text or exc.reason).response()
    except Exception as exc:
        logger.exception("HTTP request %s %s failed", request.method, request.path)
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}").response()


@asynccontextmanager
async def running_http(backend: Any, tokenizer: Any, host: str, port: int, *, metrics: ServingMetrics,
                       default_max_tokens: int | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                       gatekeeper: Gatekeeper | None = None) -> AsyncIterator[HttpServer]:
    """An HttpServer started and serving for the block's life, then stopped gracefully."""
    server = HttpServer(backend, tokenizer, host, port, metrics=metrics, default_max_tokens=default_max_tokens,
                        max_body_bytes=max_body_bytes, gatekeeper=gatekeeper)
    await server.start()
    await server.set_serving(True)
    try:
        yield server
    finally:
        await asyncio.shield(server.stop())
