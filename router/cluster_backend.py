"""The router's GenerationBackend over Ray worker pools: a request's queue, legs and stream.

A request waits in the admission queue until the dispatcher places it (a decode worker with a
free slot and blocks, a prefill worker, local or remote prefill). Remote: the decode worker has
reserved blocks and returned a ticket; the prefill worker computes the prompt, pushes the KV into
the ticket's blocks and returns the first token, which is streamed at once; the decode worker
then joins the request to its batch once the KV landed. Local (or colocated): the decode worker
prefills it itself. Either way decode steps come back through the pumps (router.pumps).

A request survives the loss of a worker: when its decode worker dies (or its prefill worker,
or their KV transfer fails), the request is placed again, ahead of new arrivals, with the tokens
it already streamed as outputs; the new worker prefills prompt + those tokens (a seeded request's
generator skips as many draws) and decoding goes on. The client sees no error, gap or duplicate.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from cluster_state.aio import stop_tasks
from cluster_state.block_index import BlockIndexFollower
from cluster_state.connection import is_redis_error
from cluster_state.journal import RequestJournal
from cluster_state.routers import RouterRegistry
from engine.sampling_params import SamplingParams
from router.admission import AdmissionQueue, QueuedRequest
from router.admission.dispatcher import Dispatcher, Placement
from router.backend import BackendError, QueueFullError, RequestTooLargeError, TokenDelta
from router.pools import ClusterView, WorkerHandle, WorkerPools, root_cause
from router.pumps import TokenPumps
from router.routing import DisaggregationPolicy, make_policy
from router.routing.disaggregation import DEFAULT_STALL_WEIGHT
from router.worker_lost import WorkerLost

logger = logging.getLogger(__name__)

ABORT_TIMEOUT_S = 30.0  # past this a worker is presumed stuck; leases free what it holds
RESUMED_PRIORITY = -(2**31)  # a request resumed after a worker's loss goes before new arrivals
# Errors of a worker call that mean "the request's KV or worker is gone", not "the request is bad".
_LOST_CAUSES = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "StaleGenerationError",
                "TransferError", "TransferTimeout", "PrefillAborted")


@dataclass(frozen=True)
class RoutingConfig:
    policy: str = "kv_aware"  # round_robin | least_loaded | kv_aware
    disaggregation: str = "auto"  # auto | always | never (disaggregated mode only)
    # auto: what a second of stall in a decoding stream weighs against a second of time to first token
    decode_stall_weight: float = DEFAULT_STALL_WEIGHT
    max_queued_requests: int = 1024  # beyond this, RESOURCE_EXHAUSTED naming the limit
    # Queued requests wait this long for a decode worker to come back before they fail.
    no_worker_timeout_s: float = 30.0
    max_attempts: int = 4  # placements of one request: the first and up to 3 resumptions

    def __post_init__(self) -> None:
        make_policy(self.policy)
        DisaggregationPolicy(self.disaggregation, self.decode_stall_weight)
        if self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be at least 0, got {self.max_queued_requests}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")


@dataclass(eq=False)
class _Stream:
    request_id: str  # the client's
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    output_token_ids: list[int] = field(default_factory=list)  # streamed to the client so far
    attempt: int = 0
    entry: QueuedRequest | None = None  # the current attempt's
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    placement: Placement | None = None
    settled: bool = False  # finished on its own, or aborted on every worker it touched
    first_token_seen: bool = False
    journal_gap: bool = False  # some tokens went out without being journaled (Redis was away)
    tag: str = ""  # set when this router took the stream over from another: its worker ids differ

    @property
    def worker_request_id(self) -> str:
        """The id on the workers: a fresh one per attempt, so a resumed attempt can never collide
        with what an earlier one (of this router or of one that died) left on a worker."""
        if self.attempt == 0 and not self.tag:
            return self.request_id
        return f"{self.request_id}#{self.tag}{self.attempt}"


class ClusterBackend:
    def __init__(self, pools: WorkerPools, view: ClusterView, index_follower: BlockIndexFollower | None,
                 routing: RoutingConfig, router_id: str, journal: RequestJournal | None = None,
                 routers: RouterRegistry | None = None) -> None:
        self.pools = pools
        self.view = view
        self.index_follower = index_follower  # keeps the KV block index current (None: no index)
        index = index_follower.index if index_follower is not None else None
        self.router_id = router_id
        self.routing = routing
        self.queue = AdmissionQueue(routing.max_queued_requests)
        self.disaggregation = DisaggregationPolicy(
            routing.disaggregation if pools.mode == "disaggregated" else "never", routing.decode_stall_weight)
        self.decode_role = "decode" if pools.mode == "disaggregated" else "mixed"
        self.dispatcher = Dispatcher(self.queue, view, make_policy(routing.policy), self.disaggregation,
                                     index, router_id, self.decode_role, routing.no_worker_timeout_s)
        self.streams: dict[str, _Stream] = {}  # client request id -> stream
        self._attempts: dict[str, _Stream] = {}  # worker request id -> stream
        self.resumed = 0  # requests placed again after losing a worker
        self.journal = journal  # what other routers need to take a stream over (None: no journal)
        self.routers = routers  # the cluster's routers: whose streams may be taken over
        self.pumps = TokenPumps(view, router_id, self._route, self._queues_on,
                                self.dispatcher.capacity_changed.set,
                                self._journal_tokens if journal is not None else None)
        # Called with each new request's queue time: arrival here to its decode worker's admit.
        self.queue_time_observers: list[Callable[[float], None]] = []
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self.view.on_new_worker(self.pumps.start)
        self.view.on_generation_change(self.pumps.worker_restarted)
        for worker in self.pools.decode:
            self.pumps.start(worker)
        self._tasks.append(asyncio.get_running_loop().create_task(self.dispatcher.run()))

    async def close(self) -> None:
        await self.dispatcher.close()
        await self.pumps.close()
        await stop_tasks(self._tasks)

    @property
    def max_model_len(self) -> int:
        return self.pools.max_model_len

    def model_names(self) -> list[str]:
        """The model's own name, then what its pools were created with (`--model`: "demo", a
        path), which clients may send as well."""
        names = [self.pools.model_name]
        given = self.pools.spec.model if self.pools.spec is not None else None
        return names + [given] if given and given not in names else names

    def can_serve(self) -> bool:
        """Whether a request would be served now: a decode worker is up (and a prefill worker,
        when every prompt must be prefilled remotely)."""
        if not self.view.of_role(self.decode_role):
            return False
        return self.disaggregation.mode != "always" or bool(self.view.of_role("prefill"))

    def stats(self) -> dict:
        return {"queued": len(self.queue), "streams": len(self.streams), "resumed": self.resumed,
                "disaggregation": dict(self.disaggregation.decisions),
                "refusals": dict(self.dispatcher.refusals), "policy": self.routing.policy}

    # --- one request ------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       priority: int = 0, owner: str = "") -> AsyncIterator[TokenDelta]:
        if request_id in self.streams:
            raise BackendError(f"request id {request_id!r} is already in flight on this router")
        self._check_fits(prompt_token_ids, params)
        stream = _Stream(request_id, list(prompt_token_ids), params, priority)
        self._submit(stream)  # placed now, or queued; QueueFullError when the queue is full
        self.streams[request_id] = stream
        begin = lambda: self._journal_call(stream, lambda j: j.begin(  # noqa: E731
            request_id, stream.prompt_token_ids, _params_record(params), owner=owner))
        async for delta in self.run_stream(stream, begin):
            yield delta

    async def run_stream(self, stream: _Stream, begin=None, replay: TokenDelta | None = None
                         ) -> AsyncIterator[TokenDelta]:
        """A submitted stream's deltas, through every attempt it takes, until it ends: first
        `begin()` (its journal entry) and `replay` (tokens a resumed client lacks), inside the
        same cleanup, so a client gone at any point frees the stream everywhere."""
        request_id = stream.request_id
        try:
            if begin is not None:
                await begin()
            if replay is not None:
                yield replay
            while True:
                try:
                    async for delta in self._attempt(stream):
                        stream.output_token_ids.extend(delta.new_token_ids)
                        yield delta
                        if stream.settled:
                            return
                    return
                except WorkerLost as lost:
                    self._resume(stream, lost)
        finally:
            # Closed early (client cancel, deadline, an error): free the request everywhere.
            # Shielded, because this runs while the caller is being cancelled.
            try:
                placed = stream.placement or _placement_of(stream.entry)  # taken up, or not yet
                if placed is not None and not stream.settled:
                    await asyncio.shield(self.abort(request_id))
            finally:
                self._end_attempt(stream)
                self.streams.pop(request_id, None)
                self.dispatcher.capacity_changed.set()

    def adopt(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
              output_token_ids: list[int], tag: str) -> _Stream:
        """Take over a stream another router began (router.takeover): it resumes with the tokens
        that router journaled, ahead of new arrivals; run it with run_stream()."""
        if request_id in self.streams:
            raise BackendError(f"request id {request_id!r} is already in flight on this router")
        stream = _Stream(request_id, list(prompt_token_ids), params, 0, list(output_token_ids), attempt=1, tag=tag)
        self._submit(stream)
        self.streams[request_id] = stream
        return stream

    def _submit(self, stream: _Stream) -> None:
        resumed = stream.attempt > 0
        entry = QueuedRequest(stream.worker_request_id, stream.prompt_token_ids, stream.params,
                              RESUMED_PRIORITY if resumed else stream.priority)
        entry.output_token_ids = list(stream.output_token_ids)
        stream.entry, stream.placement, stream.queue = entry, None, asyncio.Queue()
        self._attempts[entry.request_id] = stream
        try:
            self.dispatcher.submit(entry, bypass_bound=resumed)
        except BaseException:
            self._attempts.pop(entry.request_id, None)
            raise

    def _resume(self, stream: _Stream, lost: WorkerLost) -> None:
        """Place the request again after losing a worker, unless it ran out of attempts."""
        if stream.attempt + 1 >= self.routing.max_attempts:
            raise BackendError(f"{lost}; gave up after {stream.attempt + 1} placements") from lost
        logger.warning("request %s lost %s after %d tokens; resuming it elsewhere", stream.request_id,
                       lost, len(stream.output_token_ids))
        self._forget_placement(stream)
        stream.attempt += 1
        self.resumed += 1
        self._submit(stream)

    def _forget_placement(self, stream: _Stream) -> None:
        """Best effort: free what the failed attempt may still hold on workers that are alive."""
        placement, rid = stream.placement, stream.worker_request_id
        self._end_attempt(stream)
        if placement is None:
            return
        for worker in (placement.decode, placement.prefill):
            if worker is not None:
                asyncio.ensure_future(_quiet(worker.actor.abort.remote(rid)))

    def _end_attempt(self, stream: _Stream) -> None:
        if stream.entry is not None:
            self.queue.remove(stream.entry)
            self._attempts.pop(stream.entry.request_id, None)

    async def _attempt(self, stream: _Stream) -> AsyncIterator[TokenDelta]:
        """One placement's legs; WorkerLost when a worker it depends on goes away."""
        try:
            stream.placement = await stream.entry.placed
        finally:
            self.queue.remove(stream.entry)  # a cancel or deadline takes it out of the queue at once
        if stream.attempt == 0 and not stream.tag:
            queue_time_s = stream.placement.placed_at - stream.entry.enqueued_at
            for observe in self.queue_time_observers:
                observe(queue_time_s)
        decode = stream.placement.decode
        await self._journal_call(stream, lambda j: j.placed(stream.request_id, decode.worker_id,
                                                            stream.worker_request_id))
        decode.in_flight += 1
        try:
            if stream.placement.prefill is not None:
                async for delta in self._prefill_leg(stream):
                    yield delta
                    if stream.settled:
                        return
            async for delta in self._decode_leg(stream):
                yield delta
                if stream.settled:
                    return
        finally:
            decode.in_flight -= 1

    def largest_kv_tokens(self) -> int | None:
        """Tokens the largest decode worker's whole KV cache holds (None: no worker known yet)."""
        workers = [w for w in self.pools.decode if w.record is not None]
        if not workers:
            return None
        return max(w.record.num_blocks * w.block_size for w in workers)

    def _check_fits(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Refuse at once a request that no decode worker's whole KV cache could hold."""
        largest = self.largest_kv_tokens()
        if largest is None:
            return
        tokens = min(len(prompt_token_ids) + params.max_tokens, self.max_model_len)
        if tokens > largest:
            raise RequestTooLargeError(
                f"prompt + max_tokens is {tokens} tokens, but the largest decode worker's KV cache "
                f"holds {largest}; lower max_tokens or raise the KV cache size")

    async def _prefill_leg(self, stream: _Stream) -> AsyncIterator[TokenDelta]:
        entry, placement = stream.entry, stream.placement
        prefill, decode = placement.prefill, placement.decode
        reservation = placement.reservation
        tokens = placement.prefill_tokens  # what the prefill worker computes (its own cache's hits aside)
        prefill.in_flight += 1
        send_id = prefill.prefill_sent(tokens)
        try:
            result = await self._unless_given_up(stream, self._call(prefill, prefill.actor.prefill.remote(
                entry.request_id, entry.prompt_token_ids, entry.params, reservation.ticket, decode.actor,
                entry.output_token_ids)))
        finally:
            prefill.in_flight -= 1
            prefill.prefill_done(send_id)
        self._observe_first_token(stream)
        logprobs = (result.logprobs,) if result.logprobs is not None else None
        await self._journal_tokens([(stream.request_id, (result.first_token,), None)])
        yield TokenDelta(stream.request_id, (result.first_token,), None, logprobs, reservation.num_cached_tokens)
        final = await self._call(decode, decode.actor.start_decode.remote(
            entry.request_id, placement.generation, result.first_token, result.logprobs))
        if final is not None:  # the first token already ended it (EOS, max_tokens 1)
            stream.settled = True
            await self._journal_tokens([(stream.request_id, (), final.finish_reason)])
            yield TokenDelta(stream.request_id, (), final.finish_reason, None, reservation.num_cached_tokens)

    @staticmethod
    async def _unless_given_up(stream: _Stream, call: Awaitable):
        """`call`'s result, unless the decode worker gives the placement up first: a WorkerLost in
        the stream's queue, as when the prefill worker this router is waiting on hangs (its call
        would never return) and stops renewing its lease on the decode worker's blocks. Anything
        else that arrives meanwhile stays queued, in order."""
        task = asyncio.ensure_future(call)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # abandoned: no warning
        early = []
        try:
            while True:
                item = asyncio.ensure_future(stream.queue.get())
                try:
                    await asyncio.wait({task, item}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not item.done():
                        item.cancel()
                if item.done() and not item.cancelled():
                    if isinstance(item.result(), Exception):
                        task.cancel()
                        raise item.result()
                    early.append(item.result())
                if task.done():
                    return task.result()
        except BaseException:
            task.cancel()
            raise
        finally:
            if early:  # back in front of what came after them
                later = [stream.queue.get_nowait() for _ in range(stream.queue.qsize())]
                for queued in early + later:
                    stream.queue.put_nowait(queued)

    async def _decode_leg(self, stream: _Stream) -> AsyncIterator[TokenDelta]:
        while True:
            item = await stream.queue.get()
            if isinstance(item, Exception):
                raise item
            if item.new_token_ids and not stream.first_token_seen:
                self._observe_first_token(stream)
            stream.settled = item.finish_reason is not None
            yield TokenDelta(stream.request_id, item.new_token_ids, item.finish_reason, item.logprobs,
                             item.num_cached_tokens)
            if stream.settled:
                return

    def _observe_first_token(self, stream: _Stream) -> None:
        stream.first_token_seen = True
        placement = stream.placement
        if stream.attempt == 0:  # a resumed attempt prefills its outputs too: not a TTFT sample
            self.disaggregation.observe(placement.plan, time.monotonic() - placement.placed_at)

    async def abort(self, request_id: str) -> None:
        """Free the request on every worker it touched; a no-op for unknown ids."""
        stream = self.streams.get(request_id)
        if stream is None or stream.settled:
            return
        stream.placement = stream.placement or _placement_of(stream.entry)
        if stream.placement is None:  # queued: leaving the queue is all there is to do
            self.queue.remove(stream.entry)
            if not stream.entry.placed.done():
                stream.entry.placed.set_exception(BackendError(f"request {request_id} was aborted while queued"))
            return
        stream.settled = True
        rid = stream.worker_request_id
        placement = stream.placement
        workers = [placement.decode] + ([placement.prefill] if placement.prefill else [])
        calls = asyncio.gather(*(w.actor.abort.remote(rid) for w in workers), return_exceptions=True)
        try:
            results = await asyncio.wait_for(calls, ABORT_TIMEOUT_S)
        except asyncio.TimeoutError:
            logger.warning("abort of %s timed out; its leases will free what it holds", request_id)
            return
        for worker, result in zip(workers, results):
            if isinstance(result, Exception):
                logger.warning("abort of %s on %s failed: %s", request_id, worker.name, result)

    async def _call(self, worker: WorkerHandle, ref):
        """Await a worker call. A dead worker, a restarted one or a failed KV transfer become
        WorkerLost (the request resumes elsewhere); anything else a BackendError naming the worker."""
        try:
            return await ref
        except (QueueFullError, asyncio.CancelledError):
            raise
        except Exception as err:
            cause = root_cause(err)
            from ray.exceptions import RayActorError

            if isinstance(err, RayActorError):
                self.view.note_failure(worker, err)
            if isinstance(err, RayActorError) or cause.split(":", 1)[0] in _LOST_CAUSES:
                raise WorkerLost(worker, f"{worker.name}: {cause}") from err
            raise BackendError(f"{worker.name}: {cause}") from err

    # --- the journal -------------------------------------------------------------------
    async def _journal_tokens(self, records: list[tuple[str, tuple[int, ...], str | None]]) -> None:
        """Journal tokens before they go out; with Redis away they go out anyway (a stream never
        fails for the journal), and the streams remember that their journal has a gap."""
        if self.journal is None:
            return
        try:
            await self.journal.append(records)
        except Exception as err:
            if not is_redis_error(err):
                raise
            for request_id, _, _ in records:
                stream = self.streams.get(request_id)
                if stream is not None and not stream.journal_gap:
                    stream.journal_gap = True
                    logger.warning("request %s: journal not written (%s); it cannot be resumed elsewhere",
                                   request_id, err)

    async def _journal_call(self, stream: _Stream, call) -> None:
        if self.journal is None:
            return
        try:
            await call(self.journal)
        except Exception as err:
            if not is_redis_error(err):
                raise
            stream.journal_gap = True

    # --- what the pumps need ------------------------------------------------------------
    def _route(self, worker_request_id: str):
        stream = self._attempts.get(worker_request_id)
        if stream is None:
            return None
        return stream.queue, stream.placement.decode if stream.placement else None, stream.request_id

    def _queues_on(self, worker: WorkerHandle, generation: int | None) -> list[asyncio.Queue]:
        return [s.queue for s in self._attempts.values()
                if s.placement is not None and s.placement.decode is worker and not s.settled
                and (generation is None or s.placement.generation == generation)]


def _placement_of(entry: QueuedRequest | None):
    """The placement the dispatcher gave a queued entry, if it did (None while still queued)."""
    if entry is None or not entry.placed.done() or entry.placed.cancelled() or entry.placed.exception():
        return None
    return entry.placed.result()


def _params_record(params: SamplingParams) -> dict:
    """SamplingParams as JSON-safe fields, for the journal."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(params).items()}


async def _quiet(ref) -> None:
    try:
        await ref
    except Exception:  # the worker is gone: nothing is left to free there
        pass
