"""The router's GenerationBackend over Ray worker pools: one request's two legs, and its stream.

Disaggregated: the decode worker reserves blocks and returns a ticket; the prefill worker
computes the prompt, pushes the KV into the ticket's blocks and returns the first token, which
is streamed at once; the decode worker then joins the request to its batch once the KV landed.
Colocated: a mixed worker does both. Either way decode steps come back through one long-poll
per decode worker, which fans the batch out to the requests' queues.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.sampling_params import SamplingParams
from router.backend import BackendError, QueueFullError, TokenDelta
from router.pools import WorkerHandle, WorkerPools, _root_cause

logger = logging.getLogger(__name__)

ABORT_TIMEOUT_S = 30.0  # past this a worker is presumed stuck; leases free what it holds


@dataclass
class _Stream:
    queue: asyncio.Queue
    decode: WorkerHandle
    prefill: WorkerHandle | None = None
    settled: bool = False  # finished on its own, or aborted on every worker it touched


class ClusterBackend:
    def __init__(self, pools: WorkerPools, max_in_flight: int = 256) -> None:
        self.pools = pools
        self.max_in_flight = max_in_flight  # beyond this, RESOURCE_EXHAUSTED instead of a queue
        self.streams: dict[str, _Stream] = {}
        self._pumps: list[asyncio.Task] = []

    async def start(self) -> None:
        self._pumps = [asyncio.create_task(self._pump(w)) for w in self.pools.decode]

    async def close(self) -> None:
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    @property
    def max_model_len(self) -> int:
        return self.pools.max_model_len

    def model_names(self) -> list[str]:
        return [self.pools.model_name]

    # --- one request ------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[TokenDelta]:
        if len(self.streams) >= self.max_in_flight:
            raise QueueFullError(f"{len(self.streams)} requests in flight; retry later")
        decode = self.pools.choose(self.pools.decode, prompt_token_ids)
        if decode is None:
            raise BackendError("no decode worker is alive")
        stream = _Stream(asyncio.Queue(), decode)
        self.streams[request_id] = stream
        decode.in_flight += 1
        try:
            if self.pools.config.mode == "colocated":
                await self._call(decode, decode.actor.generate.remote(request_id, prompt_token_ids, params))
            else:
                async for delta in self._prefill_leg(request_id, prompt_token_ids, params, stream):
                    stream.settled = delta.finish_reason is not None
                    yield delta
                    if stream.settled:
                        return
            while True:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    raise item
                stream.settled = item.finish_reason is not None
                yield item
                if stream.settled:
                    return
        finally:
            # Closed early (client cancel, deadline, an error): free the request everywhere.
            # Shielded, because this runs while the caller is being cancelled.
            try:
                if not stream.settled:
                    await asyncio.shield(self.abort(request_id))
            finally:
                decode.in_flight -= 1
                self.streams.pop(request_id, None)

    async def _prefill_leg(self, request_id: str, prompt_token_ids: list[int],
                           params: SamplingParams, stream: _Stream) -> AsyncIterator[TokenDelta]:
        decode = stream.decode
        reservation = await self._call(
            decode, decode.actor.reserve.remote(request_id, prompt_token_ids, params))
        if reservation is None:
            raise QueueFullError(f"{decode.name} has no free KV blocks for this prompt; retry later")
        prefill = self.pools.choose(self.pools.prefill, prompt_token_ids)
        if prefill is None:
            await self.abort(request_id)
            raise BackendError("no prefill worker is alive")
        stream.prefill = prefill
        prefill.in_flight += 1
        try:
            result = await self._call(prefill, prefill.actor.prefill.remote(
                request_id, prompt_token_ids, params, reservation.ticket, decode.actor))
        except BaseException:
            await self.abort(request_id)
            raise
        finally:
            prefill.in_flight -= 1
        logprobs = (result.logprobs,) if result.logprobs is not None else None
        yield TokenDelta(request_id, (result.first_token,), None, logprobs, reservation.num_cached_tokens)
        try:
            final = await self._call(decode, decode.actor.start_decode.remote(
                request_id, result.first_token, result.logprobs))
        except BaseException:
            await self.abort(request_id)
            raise
        if final is not None:  # the first token already ended it (EOS, max_tokens 1)
            yield TokenDelta(request_id, (), final.finish_reason, None, reservation.num_cached_tokens)

    async def abort(self, request_id: str) -> None:
        """Free the request on every worker it touched; a no-op for unknown ids."""
        stream = self.streams.get(request_id)
        if stream is None or stream.settled:
            return
        stream.settled = True
        workers = [stream.decode] + ([stream.prefill] if stream.prefill is not None else [])
        calls = asyncio.gather(*(w.actor.abort.remote(request_id) for w in workers),
                               return_exceptions=True)
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
        try:
            return await ref
        except (QueueFullError, asyncio.CancelledError):
            raise
        except Exception as err:
            self._note_failure(worker, err)
            raise BackendError(f"{worker.name}: {_root_cause(err)}") from err

    @staticmethod
    def _note_failure(worker: WorkerHandle, err: BaseException) -> None:
        from ray.exceptions import RayActorError

        if isinstance(err, RayActorError) and worker.healthy:
            logger.error("%s died; no new requests go to it: %s", worker.name, err)
            worker.healthy = False

    # --- the decode workers' token streams -----------------------------------------------
    async def _pump(self, worker: WorkerHandle) -> None:
        while True:
            try:
                batch = await worker.actor.next_outputs.remote(1.0)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                self._note_failure(worker, err)
                self._fail_streams_on(worker, BackendError(f"{worker.name} failed: {_root_cause(err)}"))
                if not worker.healthy:
                    return
                await asyncio.sleep(1.0)
                continue
            for delta in batch:
                stream = self.streams.get(delta.request_id)
                if stream is not None:
                    stream.queue.put_nowait(TokenDelta(
                        delta.request_id, delta.new_token_ids, delta.finish_reason, delta.logprobs,
                        delta.num_cached_tokens))

    def _fail_streams_on(self, worker: WorkerHandle, error: Exception) -> None:
        for stream in self.streams.values():
            if stream.decode is worker:
                stream.queue.put_nowait(error)
