"""The router's GenerationBackend over Ray worker pools: a request's queue, legs and stream.

A request waits in the admission queue until the dispatcher places it (a decode worker with a
free slot and blocks, a prefill worker, local or remote prefill). Remote: the decode worker has
reserved blocks and returned a ticket; the prefill worker computes the prompt, pushes the KV into
the ticket's blocks and returns the first token, which is streamed at once; the decode worker
then joins the request to its batch once the KV landed. Local (or colocated): the decode worker
prefills it itself. Either way decode steps come back through one long-poll per decode worker,
which fans each batch out to the requests' queues.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from cluster_state.block_index import BlockIndexFollower
from engine.sampling_params import SamplingParams
from router.admission import AdmissionQueue, QueuedRequest
from router.admission.dispatcher import Dispatcher, Placement
from router.backend import BackendError, QueueFullError, RequestTooLargeError, TokenDelta
from router.pools import ClusterView, WorkerHandle, WorkerPools, root_cause
from router.routing import DisaggregationPolicy, make_policy

logger = logging.getLogger(__name__)

ABORT_TIMEOUT_S = 30.0  # past this a worker is presumed stuck; leases free what it holds


@dataclass(frozen=True)
class RoutingConfig:
    policy: str = "kv_aware"  # round_robin | least_loaded | kv_aware
    disaggregation: str = "auto"  # auto | always | never (disaggregated mode only)
    max_queued_requests: int = 1024  # beyond this, RESOURCE_EXHAUSTED naming the limit
    # Queued requests wait this long for a decode worker to come back before they fail.
    no_worker_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        make_policy(self.policy)
        DisaggregationPolicy(self.disaggregation)
        if self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be at least 0, got {self.max_queued_requests}")


@dataclass(eq=False)
class _Stream:
    entry: QueuedRequest
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    placement: Placement | None = None
    settled: bool = False  # finished on its own, or aborted on every worker it touched
    first_token_seen: bool = False

    @property
    def decode(self) -> WorkerHandle | None:
        return self.placement.decode if self.placement else None


class ClusterBackend:
    def __init__(self, pools: WorkerPools, view: ClusterView, index_follower: BlockIndexFollower | None,
                 routing: RoutingConfig, router_id: str) -> None:
        self.pools = pools
        self.view = view
        self.index_follower = index_follower  # keeps the KV block index current (None: no index)
        index = index_follower.index if index_follower is not None else None
        self.router_id = router_id
        self.routing = routing
        self.queue = AdmissionQueue(routing.max_queued_requests)
        self.disaggregation = DisaggregationPolicy(
            routing.disaggregation if pools.mode == "disaggregated" else "never")
        decode_role = "decode" if pools.mode == "disaggregated" else "mixed"
        self.dispatcher = Dispatcher(self.queue, view, make_policy(routing.policy), self.disaggregation,
                                     index, router_id, decode_role, routing.no_worker_timeout_s)
        self.streams: dict[str, _Stream] = {}
        self._pumps: dict[str, asyncio.Task] = {}
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.view.on_new_worker(self._start_pump)
        self.view.on_generation_change(self._worker_restarted)
        for worker in self.pools.decode:
            self._start_pump(worker)
        self._tasks.append(loop.create_task(self.dispatcher.run()))

    async def close(self) -> None:
        await self.dispatcher.close()
        tasks = self._tasks + list(self._pumps.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def max_model_len(self) -> int:
        return self.pools.max_model_len

    def model_names(self) -> list[str]:
        return [self.pools.model_name]

    def stats(self) -> dict:
        return {"queued": len(self.queue), "streams": len(self.streams),
                "disaggregation": dict(self.disaggregation.decisions),
                "refusals": dict(self.dispatcher.refusals), "policy": self.routing.policy}

    # --- one request ------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       priority: int = 0) -> AsyncIterator[TokenDelta]:
        if request_id in self.streams:
            raise BackendError(f"request id {request_id!r} is already in flight on this router")
        self._check_fits(prompt_token_ids, params)
        entry = QueuedRequest(request_id, prompt_token_ids, params, priority)
        stream = self.streams[request_id] = _Stream(entry)
        try:
            self.dispatcher.submit(entry)  # placed now, or queued; QueueFullError when full
        except BaseException:
            del self.streams[request_id]
            raise
        try:
            try:
                stream.placement = await entry.placed
            finally:
                self.queue.remove(entry)  # a cancel or deadline takes it out of the queue at once
            decode = stream.placement.decode
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
        finally:
            # Closed early (client cancel, deadline, an error): free the request everywhere.
            # Shielded, because this runs while the caller is being cancelled.
            try:
                if stream.placement is not None and not stream.settled:
                    await asyncio.shield(self.abort(request_id))
            finally:
                self.streams.pop(request_id, None)
                self.dispatcher.capacity_changed.set()

    def _check_fits(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Refuse at once a request that no decode worker's whole KV cache could hold."""
        workers = [w for w in self.pools.decode if w.record is not None]
        if not workers:
            return
        largest = max(w.record.num_blocks * w.block_size for w in workers)
        tokens = min(len(prompt_token_ids) + params.max_tokens, self.max_model_len)
        if tokens > largest:
            raise RequestTooLargeError(
                f"prompt + max_tokens is {tokens} tokens, but the largest decode worker's KV cache "
                f"holds {largest}; lower max_tokens or raise the KV cache size")

    async def _prefill_leg(self, stream: _Stream) -> AsyncIterator[TokenDelta]:
        entry, placement = stream.entry, stream.placement
        prefill, decode = placement.prefill, placement.decode
        reservation = placement.reservation
        tokens = len(entry.prompt_token_ids) - reservation.num_cached_tokens
        prefill.in_flight += 1
        prefill.prefill_tokens_in_flight += tokens
        try:
            result = await self._call(prefill, prefill.actor.prefill.remote(
                entry.request_id, entry.prompt_token_ids, entry.params, reservation.ticket, decode.actor))
        finally:
            prefill.in_flight -= 1
            prefill.prefill_tokens_in_flight -= tokens
        self._observe_first_token(stream)
        logprobs = (result.logprobs,) if result.logprobs is not None else None
        yield TokenDelta(entry.request_id, (result.first_token,), None, logprobs, reservation.num_cached_tokens)
        final = await self._call(decode, decode.actor.start_decode.remote(
            entry.request_id, placement.generation, result.first_token, result.logprobs))
        if final is not None:  # the first token already ended it (EOS, max_tokens 1)
            stream.settled = True
            yield TokenDelta(entry.request_id, (), final.finish_reason, None, reservation.num_cached_tokens)

    async def _decode_leg(self, stream: _Stream) -> AsyncIterator[TokenDelta]:
        while True:
            item = await stream.queue.get()
            if isinstance(item, Exception):
                raise item
            if item.new_token_ids and not stream.first_token_seen:
                self._observe_first_token(stream)
            stream.settled = item.finish_reason is not None
            yield item
            if stream.settled:
                return

    def _observe_first_token(self, stream: _Stream) -> None:
        stream.first_token_seen = True
        placement = stream.placement
        self.disaggregation.observe(placement.plan, time.monotonic() - placement.placed_at)

    async def abort(self, request_id: str) -> None:
        """Free the request on every worker it touched; a no-op for unknown ids."""
        stream = self.streams.get(request_id)
        if stream is None or stream.settled:
            return
        if stream.placement is None:  # still queued: leaving the queue is all there is to do
            self.queue.remove(stream.entry)
            if not stream.entry.placed.done():
                stream.entry.placed.set_exception(BackendError(f"request {request_id} was aborted while queued"))
            return
        stream.settled = True
        workers = [stream.placement.decode] + ([stream.placement.prefill] if stream.placement.prefill else [])
        calls = asyncio.gather(*(w.actor.abort.remote(request_id) for w in workers), return_exceptions=True)
        try:
            results = await asyncio.wait_for(calls, ABORT_TIMEOUT_S)
        except asyncio.TimeoutError:
            logger.warning("abort of %s timed out; its leases will free what it holds", request_id)
            return
        for worker, result in zip(workers, results):
            if isinstance(result, Exception):
                logger.warning("abort of %s on %s failed: %s", request_id, worker.name, result)

    async def _call(self, worker: WorkerHandle, ref):
        """Await a worker call; a worker-side failure becomes a BackendError naming the worker."""
        from ray.exceptions import RayActorError

        try:
            return await ref
        except (QueueFullError, asyncio.CancelledError):
            raise
        except Exception as err:
            if isinstance(err, RayActorError):
                self.view.note_failure(worker, err)
            raise BackendError(f"{worker.name}: {root_cause(err)}") from err

    # --- the decode workers' token streams -----------------------------------------------
    def _start_pump(self, worker: WorkerHandle) -> None:
        if worker.role in ("decode", "mixed") and worker.worker_id not in self._pumps:
            self._pumps[worker.worker_id] = asyncio.get_running_loop().create_task(self._pump(worker))

    async def _pump(self, worker: WorkerHandle) -> None:
        delay = 0.1
        while True:
            try:
                batch = await worker.actor.next_outputs.remote(self.router_id, 1.0)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                self.view.note_failure(worker, err)
                self._fail_streams_on(worker, None, BackendError(f"{worker.name} failed: {root_cause(err)}"))
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)
                continue
            delay = 0.1
            worker.update_load(batch.load)
            self.view.note_alive(worker, batch.generation)
            for delta in batch.deltas:
                stream = self.streams.get(delta.request_id)
                # A request's first tokens can arrive before the reply to its admit (Ray does not
                # order replies of different calls): only the worker that admitted it sends any.
                if stream is not None and stream.decode in (None, worker):
                    stream.queue.put_nowait(TokenDelta(
                        delta.request_id, delta.new_token_ids, delta.finish_reason, delta.logprobs,
                        delta.num_cached_tokens))
            if batch.deltas:
                self.dispatcher.capacity_changed.set()

    def _worker_restarted(self, worker: WorkerHandle, old_generation: int) -> None:
        self._fail_streams_on(worker, old_generation, BackendError(
            f"{worker.name} restarted (generation {old_generation} -> {worker.generation}); "
            "its requests were lost"))

    def _fail_streams_on(self, worker: WorkerHandle, generation: int | None, error: Exception) -> None:
        """End the streams placed on the worker (on that generation of it, when given)."""
        for stream in self.streams.values():
            placement = stream.placement
            if placement is None or placement.decode is not worker or stream.settled:
                continue
            if generation is None or placement.generation == generation:
                stream.queue.put_nowait(error)
