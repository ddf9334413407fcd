"""The decode workers' token streams into this router: one long-poll per decode worker, fanned out
to the requests' queues.

A pump that finds its worker dead or restarting, or a worker that comes back as a new generation,
ends the attempts placed on it with WorkerLost; the request then resumes on another worker (see
ClusterBackend), so the client never sees the loss.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from cluster_state.aio import stop_tasks
from router.backend import TokenDelta
from router.pools import ClusterView, WorkerHandle, root_cause
from router.worker_lost import WorkerLost

logger = logging.getLogger(__name__)


class TokenPumps:
    """`route(worker_request_id)` gives the queue of the attempt that request id belongs to, with
    the worker it was placed on (None while its admit reply has not come back), or None."""

    def __init__(self, view: ClusterView, router_id: str,
                 route: Callable[[str], tuple[asyncio.Queue, WorkerHandle | None, str] | None],
                 attempts_on: Callable[[WorkerHandle, int | None], list[asyncio.Queue]],
                 on_batch: Callable[[], None],
                 journal: Callable[[list[tuple[str, tuple[int, ...], str | None]]], Awaitable[None]] | None = None
                 ) -> None:
        self.view = view
        self.router_id = router_id
        self.route = route  # worker request id -> (queue, placed worker or None, client request id)
        self.attempts_on = attempts_on  # the queues of attempts placed on a worker (a generation)
        self.on_batch = on_batch
        self.journal = journal  # records a batch's tokens before any of them is delivered
        self._tasks: dict[str, asyncio.Task] = {}

    def start(self, worker: WorkerHandle) -> None:
        if worker.role in ("decode", "mixed") and worker.worker_id not in self._tasks:
            self._tasks[worker.worker_id] = asyncio.get_running_loop().create_task(self._pump(worker))

    async def close(self) -> None:
        await stop_tasks(self._tasks.values())

    def worker_restarted(self, worker: WorkerHandle, old_generation: int) -> None:
        self._end_attempts(worker, old_generation, WorkerLost(
            worker, f"{worker.name} restarted (generation {old_generation} -> {worker.generation})"))

    async def _pump(self, worker: WorkerHandle) -> None:
        delay = 0.1
        while True:
            try:
                batch = await worker.actor.next_outputs.remote(self.router_id, 1.0)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                self.view.note_failure(worker, err)
                self._end_attempts(worker, None, WorkerLost(worker, f"{worker.name} failed: {root_cause(err)}"))
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)
                continue
            delay = 0.1
            worker.update_load(batch.load)
            self.view.note_alive(worker, batch.generation)
            deliveries = []
            for delta in batch.deltas:
                target = self.route(delta.request_id)
                # A request's first tokens can arrive before the reply to its admit (Ray does not
                # order replies of different calls): only the worker that admitted it sends any.
                if target is not None and target[1] in (None, worker):
                    deliveries.append((target, delta))
            if deliveries and self.journal is not None:
                await self.journal([(target[2], d.new_token_ids, d.finish_reason) for target, d in deliveries
                                    if d.lost is None])
            for (queue, _, client_id), delta in deliveries:
                if delta.lost is not None:  # the worker gave this placement up; another may do
                    queue.put_nowait(WorkerLost(worker, f"{worker.name}: {delta.lost}"))
                    continue
                queue.put_nowait(TokenDelta(client_id, delta.new_token_ids, delta.finish_reason,
                                            delta.logprobs, delta.num_cached_tokens))
            if batch.deltas:
                self.on_batch()

    def _end_attempts(self, worker: WorkerHandle, generation: int | None, error: WorkerLost) -> None:
        for queue in self.attempts_on(worker, generation):
            queue.put_nowait(error)
