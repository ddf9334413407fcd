"""Taking a stream over from a router that died (a client resumes it here with `resume_from`).

The dead router journaled every token before sending it (cluster_state.journal), so this router
sends the client exactly the tokens it lacks, then, when the request had not finished, places it
again with all its journaled tokens as outputs so far: the new worker prefills prompt + those
tokens and decoding goes on. What the dead router left running on a worker is aborted at once
(the journal names the worker), instead of waiting for the workers' router lease.
"""
from __future__ import annotations

import asyncio
import hmac
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

from cluster_state.journal import JournalEntry
from cluster_state.routers import RouterRegistry
from engine.sampling_params import SamplingParams
from router.backend import TokenDelta


class ResumeError(Exception):
    """A stream cannot be resumed here; `code` is "not_found", "still_running" or "out_of_range"."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Resumption:
    prompt_token_ids: list[int]
    params: SamplingParams
    delivered: list[int]  # the tokens the client already has
    deltas: AsyncIterator[TokenDelta]  # everything after them


def params_from_record(fields: dict) -> SamplingParams:
    return SamplingParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


async def take_over(backend, routers: RouterRegistry | None, request_id: str, resume_from: int,
                    owner: str = "") -> Resumption:
    """`owner` is the resuming client's (Gatekeeper.owner): only the client whose key began a
    stream may resume it, and a stream of another key reads as one that does not exist."""
    journal = backend.journal
    if journal is None:
        raise ResumeError("not_found", "this router keeps no request journal")
    entry = await journal.read(request_id)
    if entry is None or not hmac.compare_digest(entry.owner, owner):
        raise ResumeError("not_found", f"no journal for request {request_id!r} (never started, or expired)")
    if request_id in backend.streams:
        raise ResumeError("still_running", f"request {request_id!r} is streaming from this router")
    if entry.router_id != backend.router_id and routers is not None and entry.router_id in await routers.live_routers():
        raise ResumeError("still_running", f"request {request_id!r} is still running on router {entry.router_id}")
    if not 0 <= resume_from <= len(entry.output_token_ids):
        raise ResumeError("out_of_range", f"resume_from {resume_from}: the journal has "
                                          f"{len(entry.output_token_ids)} tokens of request {request_id!r}")
    params = params_from_record(entry.params)
    return Resumption(entry.prompt_token_ids, params, entry.output_token_ids[:resume_from],
                      _continue(backend, entry, resume_from, params))


async def _continue(backend, entry: JournalEntry, resume_from: int, params: SamplingParams) -> AsyncIterator[TokenDelta]:
    missing = tuple(entry.output_token_ids[resume_from:])
    if entry.finish_reason is not None:
        yield TokenDelta(entry.request_id, missing, entry.finish_reason)
        return
    _abort_leftover(backend, entry)
    stream = backend.adopt(entry.request_id, entry.prompt_token_ids, params, entry.output_token_ids,
                           tag=secrets.token_hex(3))
    begin = lambda: backend.journal.begin(  # noqa: E731
        entry.request_id, entry.prompt_token_ids, entry.params, entry.output_token_ids, owner=entry.owner)
    replay = TokenDelta(entry.request_id, missing, None) if missing else None
    async for delta in backend.run_stream(stream, begin, replay):
        yield delta


def _abort_leftover(backend, entry: JournalEntry) -> None:
    worker = backend.view.workers.get(entry.placement.get("worker", ""))
    if worker is not None and entry.placement.get("request"):
        asyncio.ensure_future(_quiet(worker.actor.abort.remote(entry.placement["request"])))


async def _quiet(ref) -> None:
    try:
        await ref
    except Exception:
        pass
