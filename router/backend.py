"""What the router's front doors (gRPC, HTTP) need from the cluster behind them.

The servicers validate and tokenize; a GenerationBackend routes the tokenized request to the
workers and yields the tokens they produce. Everything here is plain Python: no protobuf, no Ray.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Protocol, runtime_checkable

from engine.sampling_params import SamplingParams

FINISH_REASONS = ("stop", "length", "abort")


@dataclass(frozen=True)
class TokenDelta:
    """The tokens one request gained in one step of its decode worker.

    Invariant: logprobs, when present, has one entry per token of new_token_ids, each mapping
    token id -> logprob (the sampled token and the requested top-n). A delta with finish_reason
    set is the request's last; the engine has already freed what it held.
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None (still running)
    logprobs: tuple[dict[int, float], ...] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first delta)

    def __post_init__(self) -> None:
        if self.finish_reason is not None and self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"unknown finish_reason {self.finish_reason!r}")
        if self.logprobs is not None and len(self.logprobs) != len(self.new_token_ids):
            raise ValueError(
                f"{len(self.logprobs)} logprob entries for {len(self.new_token_ids)} tokens"
            )


class QueueFullError(Exception):
    """The cluster will not take another request now; the client should retry later."""


class BackendError(Exception):
    """The cluster cannot serve the request (no worker, a worker refused or died)."""


class RequestTooLargeError(ValueError):
    """The request can never run here (e.g. it needs more KV than a worker's whole cache)."""


@runtime_checkable
class GenerationBackend(Protocol):
    """The cluster as the front door sees it.

    generate() may raise QueueFullError or RequestTooLargeError either when called or from the
    first iteration step. A request may wait (queued) before its first delta; `priority` orders
    the wait, lower first; `owner` (Gatekeeper.owner of the client, "" where keys are off) is
    kept with the stream where it can be resumed, so that only its client may resume it. After
    the iterator yields a delta with finish_reason set it ends.
    abort() must be safe to call for a request that already finished or was never admitted (it
    is then a no-op).
    """

    max_model_len: int

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0,
        owner: str = "",
    ) -> AsyncIterator[TokenDelta]: ...

    async def abort(self, request_id: str) -> None: ...

    def model_names(self) -> list[str]: ...
