"""Takes requests off the admission queue and places them on workers.

For the request at the head of the queue the dispatcher picks, by the routing policy, a decode
worker that has a free sequence slot and enough free KV blocks (as its latest load shows, less
this router's admits still in flight), picks a prefill worker, and asks the disaggregation
policy where to prefill. It then sends the admit and goes on with the next request without
waiting for the answer; a worker that answers "no room" (its load had changed) counts as full
until newer load arrives, and the request goes back to its place at the head of the queue.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from cluster_state.aio import stop_tasks
from cluster_state.block_index import BlockIndex
from engine.kv_cache import hash_request_blocks
from router.admission.queue import AdmissionQueue, QueuedRequest
from router.backend import BackendError
from router.pools import ClusterView, WorkerHandle, root_cause
from router.routing import DisaggregationPolicy, PrefillPlan, RoutingPolicy, RoutingRequest
from router.routing.recent import RecentRoutes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where an admitted request runs: its decode worker (and incarnation), and how it prefills."""

    decode: WorkerHandle
    generation: int
    prefill: WorkerHandle | None  # None: the decode worker prefills it itself
    plan: PrefillPlan
    reservation: Any  # decode_worker.Reservation when prefilled remotely, else None
    placed_at: float
    prefill_tokens: int = 0  # tokens the prefill worker will compute (the index's estimate)


class Dispatcher:
    def __init__(self, queue: AdmissionQueue, view: ClusterView, policy: RoutingPolicy,
                 disaggregation: DisaggregationPolicy, index: BlockIndex | None, router_id: str,
                 decode_role: str, no_worker_timeout_s: float = 30.0) -> None:
        self.queue = queue
        self.view = view
        self.policy = policy
        self.disaggregation = disaggregation
        self.index = index
        self.router_id = router_id
        self.decode_role = decode_role
        self.no_worker_timeout_s = no_worker_timeout_s
        self.capacity_changed = asyncio.Event()
        self.refusals: dict[str, int] = {}  # limit named by a worker's refusal -> count
        self.recent = RecentRoutes()  # what this router just sent where, before the index shows it
        self._admits: set[asyncio.Task] = set()
        self._no_workers_since: float | None = None

    def submit(self, entry: QueuedRequest, bypass_bound: bool = False) -> None:
        """Place a new request now if nothing waits ahead of it and a worker has room, else
        queue it (QueueFullError when the queue is full): only requests that wait count. A
        resumed request (bypass_bound) was admitted long ago and is never refused."""
        if self.queue.peek() is None and self._dispatch(entry, queued=False):
            return
        if bypass_bound:
            self.queue.requeue(entry)
        else:
            self.queue.put(entry)

    async def run(self) -> None:
        while True:
            entry = self.queue.peek()
            if entry is None:
                await self.queue.wait_changed(1.0)
                continue
            if not self._dispatch(entry, queued=True):
                self._fail_all_if_no_workers()
                await self._wait_for_capacity(0.05)

    async def _wait_for_capacity(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self.capacity_changed.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        self.capacity_changed.clear()

    # --- placing one request --------------------------------------------------------------
    def routing_request(self, entry: QueuedRequest, workers: list[WorkerHandle]) -> RoutingRequest:
        prompt = entry.token_ids
        request = RoutingRequest(len(prompt))
        if self.index is not None and workers:
            hashes = self._block_hashes(entry, workers[0].block_size)
            keys = [w.key for w in workers]
            published = self.index.longest_prefixes(hashes, keys)
            recent = self.recent.longest_prefixes(hashes, keys)
            request.cached_blocks = {k: max(published[k], recent[k]) for k in keys}
            for k in keys:
                if published[k] and recent[k]:
                    self.recent.confirmed(k, hashes[:published[k]])
        return request

    @staticmethod
    def _block_hashes(entry: QueuedRequest, block_size: int) -> list[int]:
        hashes = entry.context.get("block_hashes")
        if hashes is None:
            prompt = entry.token_ids
            usable = (len(prompt) - 1) // block_size * block_size  # the last token is always computed
            hashes = entry.context["block_hashes"] = hash_request_blocks(prompt[:usable], block_size)
        return hashes

    def _dispatch(self, entry: QueuedRequest, queued: bool) -> bool:
        """Send the request (the queue's head when queued) to a worker; False when none can
        take it now."""
        decode_workers = self.view.of_role(self.decode_role)
        prefill_workers = self.view.of_role("prefill")
        self._no_workers_since = None if decode_workers else (self._no_workers_since or time.monotonic())
        request = self.routing_request(entry, decode_workers + prefill_workers)
        candidates = [w for w in decode_workers if self._has_room(w, request)]
        if not candidates:
            return False
        decode = self.policy.choose(candidates, request)
        prefill = self.policy.choose(prefill_workers, request) if prefill_workers else None
        plan = self.disaggregation.plan(request, decode, prefill)
        if prefill is None and self.disaggregation.mode == "always":
            logger.warning("no prefill worker is routable (%d known); %s is prefilled on %s itself",
                           len(self.view.of_role("prefill", routable_only=False)), entry.request_id,
                           decode.name)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s (%d tokens): decode %s, prefill %s, %s; cached blocks %s", entry.request_id,
                         request.prompt_len, decode.name, prefill.name if prefill else None,
                         "remote" if plan.remote else "local",
                         {w.name: request.cached_blocks.get(w.key, 0) for w in decode_workers + prefill_workers})
        if prefill is not None:
            entry.context["uncached_on"] = {prefill.worker_id: request.uncached_tokens(prefill)}
        blocks = self._blocks_needed(decode, request)
        if self.index is not None:  # both will cache the prompt: the decode worker receives it all
            hashes = self._block_hashes(entry, decode.block_size)
            for worker in (decode, prefill) if plan.remote else (decode,):
                self.recent.record(worker.key, hashes)
        if queued:
            self.queue.pop()
        decode.pending_admissions += 1
        decode.pending_blocks += blocks
        task = asyncio.get_running_loop().create_task(self._admit(entry, decode, prefill, plan, blocks))
        self._admits.add(task)
        task.add_done_callback(self._admits.discard)
        return True

    @staticmethod
    def _blocks_needed(worker: WorkerHandle, request: RoutingRequest) -> int:
        return -(-request.uncached_tokens(worker) // worker.block_size)

    def _has_room(self, worker: WorkerHandle, request: RoutingRequest) -> bool:
        # Blocks for the uncached prompt, plus one per running request so decodes can grow.
        needed = self._blocks_needed(worker, request) + worker.load.num_running
        return worker.free_slots >= 1 and worker.free_blocks >= needed

    async def _admit(self, entry: QueuedRequest, decode: WorkerHandle, prefill: WorkerHandle | None,
                     plan: PrefillPlan, blocks: int) -> None:
        try:
            sender = (prefill.worker_id, prefill.node) if plan.remote else None
            reply = await decode.actor.admit.remote(
                self.router_id, entry.request_id, entry.prompt_token_ids, entry.params, plan.remote,
                entry.output_token_ids, sender)
        except Exception as err:
            self._admit_failed(entry, decode, err)
            return
        finally:
            decode.pending_admissions -= 1
            decode.pending_blocks -= blocks
            self.capacity_changed.set()
        decode.update_load(reply.load)
        self.view.note_alive(decode, reply.generation)
        if not reply.admitted:
            decode.mark_refused()
            self.refusals[reply.limit] = self.refusals.get(reply.limit, 0) + 1
            logger.debug("%s has no free %s for %s (%s); it waits", decode.name, reply.limit,
                         entry.request_id, reply.detail)
            self._requeue(entry)
            return
        prefill_tokens = entry.context.get("uncached_on", {}).get(prefill.worker_id, 0) if prefill else 0
        placement = Placement(decode, reply.generation, prefill if plan.remote else None, plan,
                              reply.reservation, time.monotonic(), prefill_tokens)
        if entry.placed.done():  # the client gave up while the admit was on its way
            await asyncio.shield(decode.actor.abort.remote(entry.request_id))
            return
        entry.placed.set_result(placement)

    def _admit_failed(self, entry: QueuedRequest, decode: WorkerHandle, err: BaseException) -> None:
        from ray.exceptions import RayActorError

        if isinstance(err, RayActorError):  # dead or restarting: try another worker
            self.view.note_failure(decode, err)
            self._requeue(entry)
        elif not entry.placed.done():
            entry.placed.set_exception(BackendError(f"{decode.name}: {root_cause(err)}"))

    def _requeue(self, entry: QueuedRequest) -> None:
        if not entry.placed.done():
            self.queue.requeue(entry)

    def _fail_all_if_no_workers(self) -> None:
        """Queued requests wait for a decode worker to come (back), but not forever."""
        if self._no_workers_since is None:
            return
        if time.monotonic() - self._no_workers_since < self.no_worker_timeout_s:
            return
        error = BackendError(f"no {self.decode_role} worker is alive "
                             f"(none for {self.no_worker_timeout_s:.0f}s)")
        while len(self.queue):
            entry = self.queue.pop()
            if not entry.placed.done():
                entry.placed.set_exception(error)

    def no_worker_for(self) -> float:
        """Seconds the cluster has had no routable decode worker (0: it has one)."""
        if self._no_workers_since is None:
            return 0.0
        return time.monotonic() - self._no_workers_since

    async def close(self) -> None:
        await stop_tasks(list(self._admits))
