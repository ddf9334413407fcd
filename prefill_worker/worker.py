"""PrefillWorker: an asyncio Ray actor that prefills prompts and pushes their KV."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch

from cluster_state.agent import WorkerAgent
from cluster_state.aio import stop_tasks
from cluster_state.presence import fetch_cluster_secret, registry_record, start_agent, worker_node
from cluster_state.worker_spec import WorkerSpec
from engine.background import BackgroundEngine
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.llm_engine import resolve_device
from kv_transfer import KVLayout, SenderSet, TransferTicket, choose_backend
from prefill_worker.pusher import KVPusher

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillResult:
    request_id: str
    first_token: int
    logprobs: dict[int, float] | None
    num_cached_tokens: int  # prompt tokens this worker found in its own prefix cache


class PrefillAborted(RuntimeError):
    pass


class PrefillWorker:
    """Starts itself from its spec (Ray re-runs the constructor on a restart), registers in the
    cluster registry, and keeps a KV link open to every decode worker the registry lists."""

    def __init__(self, spec: WorkerSpec) -> None:
        if spec.role != "prefill":
            raise ValueError(f"a prefill worker's role is 'prefill', got {spec.role!r}")
        self.spec = spec
        self.engine_config = spec.engine
        # Every request queued or computing here keeps its decode-side lease alive; a dead or
        # hung prefill worker stops renewing and the decode worker frees the blocks.
        self.lease_renew_s = spec.lease_ttl_s / 3
        self._lease_holders: dict[str, object] = {}  # request id -> decode worker actor
        # Ray does not order calls to an async actor: an abort can overtake its prefill.
        # Remember recent aborts so a late prefill is refused instead of run.
        self._aborted: OrderedDict[str, None] = OrderedDict()
        self.background: BackgroundEngine | None = None
        self.sender = None
        self.pusher: KVPusher | None = None
        self.agent: WorkerAgent | None = None
        self.generation = 0
        self._waiting: dict[str, asyncio.Future] = {}
        self._tasks: list[asyncio.Task] = []
        self._connected: dict[str, int] = {}  # receiver endpoint -> its generation, linked
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start_task: asyncio.Task | None = None
        try:  # Ray runs an async actor's constructor on its event loop: start right away
            self._start_task = asyncio.get_running_loop().create_task(self._start())
        except RuntimeError:
            pass

    async def start(self) -> dict:
        """Wait until the worker serves; returns the KV layout for the handshake, and more."""
        if self._start_task is None:
            self._start_task = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(self._start_task)
        engine = self.background.engine
        return {"layout": engine.kv_layout_fields(), "max_model_len": engine.max_model_len,
                "push_granularity": self.pusher.granularity, "generation": self.generation, "node": self.node,
                "worker_id": self.spec.worker_id, "pid": os.getpid()}

    async def _start(self) -> None:
        spec = self.spec
        self._loop = asyncio.get_running_loop()
        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        secret = await fetch_cluster_secret(spec)  # receivers admit only senders that know it
        engine = await asyncio.to_thread(LLMEngine, self.engine_config, None, False)
        if spec.calibrate:
            await asyncio.to_thread(engine.calibrate)
        layout = KVLayout(**engine.kv_layout_fields())
        options = {"authkey": secret} if secret else {}
        device = resolve_device(spec.engine.device)
        self.node = worker_node(spec)
        self.sender = SenderSet(layout, sender_id=spec.worker_id, device=device, host=self.node, **options)
        self.pusher = KVPusher(self.sender, engine.runner.kv_cache, layout.block_size,
                               engine.kv_manager.get_block_ids, spec.kv_push)
        engine.after_forward = self.pusher.after_forward
        if self.pusher.granularity == "layer":
            engine.after_layer = self.pusher.after_layer
        self.background = BackgroundEngine(engine, self._on_outputs)
        self.background.start()
        if spec.redis_url:
            self.agent = await start_agent(spec, self.background, registry_record(spec, engine, None), secret,
                                           self._transfer_load)
            self.generation = self.sender.generation = self.agent.generation
            self._tasks.append(self._loop.create_task(self.agent.run()))
            self._tasks.append(self._loop.create_task(self._connect_peers_forever()))
        self._tasks.append(self._loop.create_task(self._renew_leases_forever()))

    async def _ready(self) -> None:
        if self.background is None:
            await self.start()

    def _transfer_load(self) -> dict:
        counters = self.sender.snapshot()
        rate = counters.bytes / counters.seconds if counters.seconds > 0 else 0.0
        return {"transfer_bytes_per_s": rate,
                "kv_transfer": {b: c.as_load() for b, c in self.sender.snapshots().items()}}

    async def connect(self, peers: list[dict]) -> None:
        """Handshake with these decode workers' receivers now, not on a request's critical path:
        each peer is {"endpoints": {backend: endpoint}, "node": address}, and the link uses the
        backend this pair will (see kv_transfer.auto).

        Raises KVLayoutMismatch naming the differing fields when a decode worker's cache
        layout is not this worker's.
        """
        await self._ready()
        for peer in peers:
            await asyncio.to_thread(self._link, peer["endpoints"], peer["node"])

    def _link(self, endpoints: dict[str, str], node: str) -> str:
        backend = choose_backend(self.spec.transfer_backend, self.node, node, self.sender_device_type)
        self.sender.connect(endpoints[backend], backend)
        return endpoints[backend]

    @property
    def sender_device_type(self) -> str:
        return resolve_device(self.spec.engine.device).type

    async def _connect_peers_forever(self, period_s: float = 1.0) -> None:
        """Link to every decode worker in the registry, a restarted one included, ahead of its
        first request."""
        while True:
            for peer in list(self.agent.peers.values()):
                record = peer.record
                if record.role != "decode" or not record.endpoints:
                    continue
                if self._connected.get(record.worker_id) == record.generation:
                    continue
                try:
                    await asyncio.to_thread(self._link, record.endpoints, record.node_ip)
                    self._connected[record.worker_id] = record.generation
                except Exception as err:  # logged once; the request path reconnects on demand
                    if self._connected.get(record.worker_id) != -record.generation:
                        logger.warning("cannot link to %s at %s: %s", record.worker_id, record.endpoints, err)
                    self._connected[record.worker_id] = -record.generation
            await asyncio.sleep(period_s)

    async def pid(self) -> int:
        return os.getpid()

    async def prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                      ticket: TransferTicket, decode_worker=None,
                      output_token_ids: list[int] = ()) -> PrefillResult:
        """Compute the prompt's KV, push the part the decode worker lacks, sample the first token.

        decode_worker, the actor that issued the ticket, has its lease on the reserved blocks
        renewed while the request is here. output_token_ids: what a resumed request already
        generated; its KV is computed with the prompt's and the next token is sampled after it.
        """
        await self._ready()
        if request_id in self._aborted:
            await asyncio.to_thread(self.sender.send_failed, ticket, "aborted before prefill")
            raise PrefillAborted(f"request {request_id} was aborted before its prefill started")
        first_only = dataclasses.replace(params, max_tokens=len(output_token_ids) + 1, stop=(),
                                         include_stop_str_in_output=False)
        future = self._loop.create_future()
        self._waiting[request_id] = future
        if decode_worker is not None:
            self._lease_holders[request_id] = decode_worker
            future.add_done_callback(lambda _: self._lease_holders.pop(request_id, None))

        def admit(engine: LLMEngine) -> None:
            self.pusher.track(ticket)
            engine.add_request(prompt_token_ids, first_only, request_id, output_token_ids)
        try:
            await asyncio.wrap_future(self.background.call(admit))
        except Exception as err:
            self._waiting.pop(request_id, None)
            self._lease_holders.pop(request_id, None)
            reason = f"refused: {err}"
            await asyncio.wrap_future(self.background.call(
                lambda engine: self.pusher.abandon(request_id, reason)))
            raise
        return await future

    async def _renew_leases_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_renew_s)
            by_worker: dict[object, tuple[object, list[str]]] = {}
            for request_id, actor in list(self._lease_holders.items()):
                by_worker.setdefault(actor._actor_id, (actor, []))[1].append(request_id)
            await asyncio.gather(*(self._renew(actor, ids) for actor, ids in by_worker.values()))

    async def _renew(self, actor, request_ids: list[str]) -> None:
        from ray.exceptions import RayActorError

        try:
            lapsed = await asyncio.wait_for(actor.renew_leases.remote(request_ids), self.lease_renew_s)
        except RayActorError as err:
            # That decode worker is dead or restarting: what it reserved is gone with it, so stop
            # computing for it and free the blocks held here (the router resumes the requests).
            logger.warning("decode worker of %d requests is gone (%s); aborting them here", len(request_ids), err)
            lapsed = request_ids
        except Exception as err:  # slow to answer: try again next period, its lease still runs
            logger.warning("lease renewal failed: %s", err)
            return
        for request_id in lapsed:  # the decode worker freed these blocks: stop pushing into them
            await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        await self._ready()
        self._aborted[request_id] = None
        while len(self._aborted) > 10_000:
            self._aborted.popitem(last=False)

        def drop(engine: LLMEngine) -> None:
            engine.abort_request(request_id)
            self.pusher.abandon(request_id, "prefill aborted")
        await asyncio.wrap_future(self.background.call(drop))
        future = self._waiting.pop(request_id, None)
        if future is not None and not future.done():
            future.set_exception(PrefillAborted(f"request {request_id} was aborted during prefill"))

    async def cached_block_hashes(self) -> set[int]:
        """What this worker's prefix cache holds now: the KV block index should say the same."""
        await self._ready()
        return await asyncio.wrap_future(self.background.call(
            lambda engine: engine.kv_manager.cached_block_hashes()))

    async def stats(self) -> dict:
        await self._ready()

        def collect(engine: LLMEngine) -> dict:
            counters = self.sender.snapshot()
            return {"num_blocks": engine.kv_manager.num_blocks,
                    "num_free_blocks": engine.kv_manager.num_free_blocks,
                    "num_requests": engine.scheduler.num_unfinished,
                    "prefix_cache_hits": engine.kv_manager.stats().hits,
                    "prefix_cache_queries": engine.kv_manager.stats().queries,
                    "generation": self.generation,
                    "transfer_bytes": counters.bytes, "transfers": counters.transfers,
                    "transfer_failures": counters.failures}
        return await asyncio.wrap_future(self.background.call(collect))

    async def shutdown(self) -> None:
        await stop_tasks(self._tasks, timeout_s=3.0)
        if self.agent is not None:
            await self.agent.close()
        if self.background is not None:
            self.background.stop()
        if self.pusher is not None:
            self.pusher.close()
        if self.sender is not None:
            self.sender.close()

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        """Engine thread: a prefill request finishes with its first token (or with none when
        the engine aborted it after a failed step)."""
        for out in outputs:
            if not out.finished:
                continue
            if out.new_token_ids:  # the one token sampled here (after any resumed outputs)
                result = PrefillResult(out.request_id, out.new_token_ids[-1],
                                       out.logprobs[-1] if out.logprobs else None, out.num_cached_tokens)
            else:
                self.pusher.abandon(out.request_id, "prefill failed")
                result = PrefillAborted(f"prefill of {out.request_id} failed on this worker")
            self._loop.call_soon_threadsafe(self._resolve, out.request_id, result)

    def _resolve(self, request_id: str, result: PrefillResult | Exception) -> None:
        future = self._waiting.pop(request_id, None)
        if future is None or future.done():
            return
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)
