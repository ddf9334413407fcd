"""Streaming a request's tokens back to a client, shared by the router's front doors (steps 6-7).

The relay runs an admitted request on the backend, turns its token deltas into text chunks
(router.streaming.TextStream: detokenization, stop strings), hands each chunk to the front door's
emit callback, and frees the request on every worker when the client stops listening. Failures
come back as a RelayFailure whose kind each door maps to its own status (gRPC code, HTTP status).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from router.backend import BackendError, GenerationBackend, QueueFullError, RequestTooLargeError, TokenDelta
from router.intake import AdmittedRequest
from router.streaming import StreamChunk, TextStream

logger = logging.getLogger(__name__)

# What a relay can fail with, for the front doors to map to their statuses.
BUSY = "busy"  # the admission queue is full: retry later
TOO_LARGE = "too_large"  # the request can never fit a worker's KV cache
UNAVAILABLE = "unavailable"  # no worker can serve it now
INTERNAL = "internal"  # a bug, or a backend stream that ended without a finish reason
DISCONNECTED = "disconnected"  # the client went away (emit found its connection closed)


@dataclass(frozen=True)
class FinalStats:
    """Usage and timing of a finished stream, reported on its last message."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    time_to_first_token_s: float  # admission to first token; 0 when no token was generated
    total_time_s: float


@dataclass(frozen=True)
class RelayFailure:
    kind: str  # BUSY | TOO_LARGE | UNAVAILABLE | INTERNAL | DISCONNECTED
    message: str


@dataclass(frozen=True)
class RequestObservation:
    """What one finished (or failed) request tells the serving metrics."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None  # None: it failed (failure names why)
    time_to_first_token_s: float | None  # None: no token was generated
    e2e_s: float
    inter_token_s: tuple[float, ...]  # gaps between successive output tokens
    failure: str | None = None


Emit = Callable[[StreamChunk, "FinalStats | None"], Awaitable[None]]


class Relay:
    """Runs admitted requests on the backend; `observe`, when given, receives a
    RequestObservation per request that reached the backend."""

    def __init__(self, backend: GenerationBackend, tokenizer: Any,
                 observe: Callable[[RequestObservation], None] | None = None) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.observe = observe

    async def run(self, request: AdmittedRequest, emit: Emit, stream: TextStream | None = None,
                  deltas: AsyncIterator[TokenDelta] | None = None) -> RelayFailure | None:
        """Relay backend deltas through emit; returns the failure to report, if any.

        emit(chunk, None) for each chunk with tokens or text, then emit(last_chunk, stats) once.
        `stream`, when given, is the TextStream to use (the caller reads its token count after);
        `deltas`, when given, replaces backend.generate() (a stream taken over from another router,
        already held by the backend under request.request_id).
        Invariant: when this returns or raises, the backend holds nothing for the request —
        either it finished on its own, refused it, or abort() was called.
        """
        timing = _Timing(request.admitted_at)
        stream = stream or self.text_stream(request)
        held_by_backend, failure = True, None
        try:
            if deltas is None:
                deltas = self.backend.generate(request.request_id, request.prompt_token_ids, request.params,
                                               request.priority, owner=request.owner)
            async for delta in deltas:
                timing.tokens(len(delta.new_token_ids))
                chunk = stream.process(delta)
                if not stream.finished:
                    if chunk.token_ids or chunk.text:
                        await emit(chunk, None)
                    continue
                if stream.needs_backend_abort:  # a stop string matched; workers still run it
                    await self.abort(request.request_id)
                held_by_backend = False
                final = timing.final_stats(len(request.prompt_token_ids), stream)
                await emit(chunk, final)
                # Counted once it is out: a client gone at the last chunk counts as that alone.
                self._observe(request, stream, timing, chunk.finish_reason, None)
                return None
            failure = RelayFailure(INTERNAL, "the backend ended the stream without a finish reason")
        except QueueFullError as exc:
            held_by_backend = False
            failure = RelayFailure(BUSY, f"server is busy, retry later: {exc}")
        except RequestTooLargeError as exc:
            held_by_backend = False
            failure = RelayFailure(TOO_LARGE, str(exc))
        except BackendError as exc:
            failure = RelayFailure(UNAVAILABLE, f"backend unavailable: {exc}")
        except asyncio.CancelledError:
            self._observe(request, stream, timing, None, "cancelled")
            raise
        except ConnectionError as exc:
            failure = RelayFailure(DISCONNECTED, f"the client went away: {exc}")
        except Exception as exc:  # anything else ends this stream, never the server
            logger.exception("request %s failed", request.request_id)
            failure = RelayFailure(INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            await _close_quietly(deltas)
            if held_by_backend:
                await self.abort(request.request_id)
        self._observe(request, stream, timing, None, failure.kind)
        return failure

    def text_stream(self, request: AdmittedRequest) -> TextStream:
        return TextStream(self.tokenizer, request.prompt_token_ids, request.params)

    async def abort(self, request_id: str) -> None:
        # Shielded: on a client cancel or deadline this runs while the handler task is being
        # cancelled, and the workers must still free the request's KV blocks.
        try:
            await asyncio.shield(self.backend.abort(request_id))
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("aborting request %s on the backend failed", request_id)

    def _observe(self, request: AdmittedRequest, stream: TextStream, timing: "_Timing",
                 finish_reason: str | None, failure: str | None) -> None:
        if self.observe is None:
            return
        try:
            self.observe(timing.observation(len(request.prompt_token_ids), stream.num_output_tokens,
                                            finish_reason, failure))
        except Exception:  # metrics never fail a request
            logger.exception("recording metrics of request %s failed", request.request_id)


class _Timing:
    """When a request's tokens arrived: time to first token and the gaps between tokens."""

    def __init__(self, admitted_at: float) -> None:
        self.admitted_at = admitted_at
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.gaps: list[float] = []

    def tokens(self, count: int) -> None:
        if not count:
            return
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
        else:
            # A delta of several tokens (a batch the pump carried at once): spread its gap.
            self.gaps.extend([(now - self.last_token_at) / count] * count)
        self.last_token_at = now

    def final_stats(self, prompt_tokens: int, stream: TextStream) -> FinalStats:
        done_at = time.monotonic()
        return FinalStats(
            prompt_tokens=prompt_tokens,
            completion_tokens=stream.num_output_tokens,
            cached_prompt_tokens=stream.num_cached_tokens,
            time_to_first_token_s=(self.first_token_at or done_at) - self.admitted_at,
            total_time_s=done_at - self.admitted_at,
        )

    def observation(self, prompt_tokens: int, completion_tokens: int, finish_reason: str | None,
                    failure: str | None) -> RequestObservation:
        ttft = None if self.first_token_at is None else self.first_token_at - self.admitted_at
        return RequestObservation(prompt_tokens, completion_tokens, finish_reason, ttft,
                                  time.monotonic() - self.admitted_at, tuple(self.gaps), failure)


async def _close_quietly(deltas: Any) -> None:
    aclose = getattr(deltas, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:
        logger.exception("closing a backend stream failed")
