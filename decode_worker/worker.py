"""DecodeWorker: an asyncio Ray actor around a BackgroundEngine, a KV receiver and its presence in
the cluster's registry.

The constructor starts the worker by itself (model, receiver, registration), so when Ray restarts
a killed worker with the same arguments, the new incarnation registers under a new generation
without anyone asking; every method waits for the start to finish.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass

import torch

from cluster_state.agent import WorkerAgent
from cluster_state.aio import stop_tasks
from cluster_state.load import LoadReport
from cluster_state.presence import fetch_cluster_secret, load_report, registry_record, start_agent, worker_node
from cluster_state.worker_spec import WorkerSpec
from decode_worker.outbox import RouterOutboxes, StepDelta
from engine.background import BackgroundEngine
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import AdmissionRefusal
from engine.step_stats import EngineLoad
from engine.llm_engine import resolve_device
from kv_transfer import KVLayout, LeaseTable, ReceiverSet, TransferTicket

logger = logging.getLogger(__name__)


class StaleGenerationError(RuntimeError):
    """A call carried a ticket of another incarnation of this worker (it restarted since)."""


@dataclass(frozen=True)
class Reservation:
    """Blocks held for a prompt whose KV comes from a prefill worker."""

    ticket: TransferTicket  # the blocks past the cached prefix, where the KV must land
    num_cached_tokens: int  # prompt tokens this worker already had in its prefix cache


@dataclass(frozen=True)
class AdmitReply:
    """A decode worker's answer to admit(): admitted (with a reservation when the prompt is
    prefilled elsewhere) or refused naming the limit; either way its load right after."""

    admitted: bool
    generation: int
    load: LoadReport
    reservation: Reservation | None = None
    limit: str | None = None  # refused: "sequence slots" | "KV blocks"
    detail: str = ""


@dataclass(frozen=True)
class OutputBatch:
    deltas: list[StepDelta]
    load: LoadReport
    generation: int


@dataclass(frozen=True)
class WorkerStats:
    role: str
    num_blocks: int
    num_free_blocks: int
    num_requests: int
    steps: int
    transfer_bytes: int
    transfers: int
    transfer_chunks: int
    transfer_failures: int
    generation: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


def _to_delta(out: RequestOutput) -> StepDelta:
    logprobs = None
    if out.logprobs is not None:
        logprobs = tuple(out.logprobs[len(out.token_ids) - len(out.new_token_ids):])
    return StepDelta(out.request_id, tuple(out.new_token_ids), out.finish_reason, logprobs,
                     out.num_cached_tokens)


class DecodeWorker:
    """role "decode": receives KV (or prefills a request itself when the router decides so) and
    decodes; role "mixed": prefills and decodes everything, with no receiver (colocated)."""

    def __init__(self, spec: WorkerSpec) -> None:
        if spec.role not in ("decode", "mixed"):
            raise ValueError(f"decode worker role must be 'decode' or 'mixed', got {spec.role!r}")
        self.spec = spec
        self.role = spec.role
        self.receivers = None
        self.background: BackgroundEngine | None = None
        self.agent: WorkerAgent | None = None
        self.generation = 0
        self.leases = LeaseTable(on_expire=self._on_lease_expired)
        # Tickets whose transfer has not settled: the sender may still write into their blocks
        # (shm and CUDA IPC write before they announce a chunk), so those blocks are never
        # freed before the sender says done or failed, its link drops, or its lease lapses.
        self._in_transfer: set[str] = set()
        self.outboxes: RouterOutboxes | None = None
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start_task: asyncio.Task | None = None
        self._secret: bytes | None = None
        try:  # Ray runs an async actor's constructor on its event loop: start right away
            self._start_task = asyncio.get_running_loop().create_task(self._start())
        except RuntimeError:
            pass

    # --- lifecycle ------------------------------------------------------------------
    async def start(self) -> dict:
        """Wait until the worker serves; returns its layout, endpoint and generation."""
        if self._start_task is None:
            self._start_task = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(self._start_task)
        return self.info()

    def info(self) -> dict:
        engine = self.background.engine
        return {"layout": engine.kv_layout_fields(), "max_model_len": engine.max_model_len,
                "endpoint": self.receivers.primary.endpoint if self.receivers else None,
                "endpoints": self.receivers.endpoints if self.receivers else {},
                "node": worker_node(self.spec),
                "generation": self.generation, "worker_id": self.spec.worker_id, "pid": os.getpid()}

    async def _start(self) -> None:
        spec = self.spec
        self._loop = asyncio.get_running_loop()
        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        self._secret = await fetch_cluster_secret(spec)  # the receiver admits only peers that know it
        engine = await asyncio.to_thread(self._build_engine)
        if spec.calibrate:
            await asyncio.to_thread(engine.calibrate)
        self.background = BackgroundEngine(engine, self._on_outputs)
        self.outboxes = RouterOutboxes(self._loop, spec.router_lease_s)
        self.background.start()
        if spec.redis_url:
            self.agent = await start_agent(spec, self.background, registry_record(spec, engine, self.receivers),
                                           self._secret, self._extra_load)
            self.generation = self.agent.generation
            self._tasks.append(self._loop.create_task(self.agent.run()))
        if self.receivers is not None:
            self.receivers.configure(self.generation, self._check_peer)
        self._tasks.append(self._loop.create_task(self._expire_forever()))

    async def _ready(self) -> None:
        if self.background is None:
            await self.start()

    def _build_engine(self) -> LLMEngine:
        if self.role == "mixed":
            return LLMEngine(self.spec.engine, detokenize=False)
        return LLMEngine(self.spec.engine, kv_cache_factory=self._open_receiver, detokenize=False)

    def _open_receiver(self, shape, model_name: str) -> torch.Tensor:
        """The receivers (one per backend the pairs may use) allocate the KV cache, where prefill
        workers write directly."""
        layout = KVLayout(model=model_name, dtype=str(shape.dtype).removeprefix("torch."),
                          block_size=shape.block_size, num_layers=shape.num_layers,
                          num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim)
        options = {"authkey": self._secret} if self._secret else {}
        self.receivers = ReceiverSet(self.spec.transfer_backend, layout, shape.num_blocks,
                                     node=worker_node(self.spec), device=resolve_device(self.spec.engine.device),
                                     **options)
        return self.receivers.kv_cache

    def _check_peer(self, sender_id: str, generation: int) -> str | None:
        """Refuse a sender the registry knows a newer incarnation of."""
        peer = self.agent.peers.get(sender_id) if self.agent is not None else None
        if peer is not None and peer.record.generation > generation:
            return (f"stale sender: {sender_id} generation {generation} connected, generation "
                    f"{peer.record.generation} is registered")
        return None

    async def shutdown(self) -> None:
        await stop_tasks(self._tasks, timeout_s=3.0)
        if self.agent is not None:
            await self.agent.close()
        if self.background is not None:
            self.background.stop()
        if self.receivers is not None:
            self.receivers.close()

    async def pid(self) -> int:
        return os.getpid()

    # --- admission --------------------------------------------------------------------
    async def admit(self, router_id: str, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, remote_prefill: bool,
                    output_token_ids: list[int] = (), prefill: tuple[str, str] | None = None) -> AdmitReply:
        """Take the request if a sequence slot and the KV blocks are free now.

        remote_prefill: the prompt's KV comes from a prefill worker, so hold its blocks and
        return a ticket; otherwise this worker prefills it itself and its tokens (the first
        one too) arrive through next_outputs. output_token_ids: what the request already
        generated on a decode worker that died; it continues from there. prefill: (worker id,
        node) of the prefill worker that will push the KV, which picks the backend for the pair.
        """
        await self._ready()
        if remote_prefill and self.receivers is None:
            raise ValueError(f"{self.spec.worker_id} has no KV receiver (role {self.role})")
        self.outboxes.assign(request_id, router_id)  # before the engine can emit a token
        try:
            if remote_prefill:
                result, load = await self._call(lambda engine: (
                    engine.reserve_for_transfer(request_id, prompt_token_ids, params, output_token_ids),
                    engine.load_snapshot()))
            else:
                result, load = await self._call(lambda engine: (
                    engine.admit_request(prompt_token_ids, params, request_id, output_token_ids),
                    engine.load_snapshot()))
        except BaseException:
            self.outboxes.forget(request_id)
            raise
        if isinstance(result, AdmissionRefusal):
            self.outboxes.forget(request_id)
            return AdmitReply(False, self.generation, self._report(load), limit=result.limit,
                              detail=result.detail)
        num_tokens = len(prompt_token_ids) + len(output_token_ids)
        reservation = self._issue_ticket(request_id, num_tokens, *result, prefill) if remote_prefill else None
        return AdmitReply(True, self.generation, self._report(load), reservation)

    def _issue_ticket(self, request_id: str, num_tokens: int, num_cached: int, block_table: list[int],
                      prefill: tuple[str, str] | None) -> Reservation:
        first_block = num_cached // self.receivers.layout.block_size
        sender_id, sender_node = prefill or (None, None)
        try:
            ticket = self.receivers.issue_ticket(
                request_id, block_table[first_block:], num_tokens - num_cached,
                lease_id=request_id, first_token=num_cached, sender_id=sender_id, sender_node=sender_node)
        except Exception:
            self.background.call(lambda engine: engine.abort_request(request_id))
            self.outboxes.forget(request_id)
            raise
        self._in_transfer.add(request_id)
        self.leases.grant(request_id, self.spec.lease_ttl_s)
        return Reservation(ticket, num_cached)

    def _report(self, load: EngineLoad | None = None) -> LoadReport:
        return load_report(load or self.background.load, **self._extra_load())

    def _extra_load(self) -> dict:
        if self.receivers is None:
            return {}
        return {"transfer_choices": dict(self.receivers.choices),
                "kv_transfer": {b: c.as_load() for b, c in self.receivers.snapshots().items()}}

    async def renew_leases(self, request_ids: list[str]) -> list[str]:
        """The prefill worker holding these tickets is alive; returns ids whose lease is gone."""
        return [rid for rid in request_ids if not self.leases.renew(rid)]

    async def start_decode(self, request_id: str, generation: int, first_token: int,
                           logprobs: dict[int, float] | None = None,
                           timeout_s: float | None = None) -> StepDelta | None:
        """Wait for the request's KV to land, then join the running batch with its first token.

        Returns the request's delta when it finished right away (EOS or max_tokens 1), None
        when it runs on; raises TransferError / TransferTimeout when the KV never came, and
        StaleGenerationError when the ticket came from an earlier incarnation of this worker.
        """
        await self._ready()
        if generation != self.generation:
            raise StaleGenerationError(
                f"request {request_id}: its ticket was issued by generation {generation} of "
                f"{self.spec.worker_id}, which is now generation {self.generation}")
        try:
            await self._await_transfer(request_id, timeout_s)
        except Exception:
            # Failed (the sender said so or vanished) or stalled past the timeout: give up.
            self._in_transfer.discard(request_id)
            await self.abort(request_id)
            raise
        self._in_transfer.discard(request_id)
        self.leases.release(request_id)
        self.receivers.release(request_id)
        out = await self._call(lambda engine: engine.start_after_transfer(request_id, first_token, logprobs))
        return _to_delta(out) if out is not None and out.finished else None

    async def _await_transfer(self, request_id: str, timeout_s: float | None) -> None:
        """Poll without holding a thread; DONE returns, FAILED / a stall raise."""
        deadline = time.monotonic() + (self.receivers.timeout_s if timeout_s is None else timeout_s)
        delay = 0.0005
        while not self.receivers.poll(request_id).finished and time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.01)
        self.receivers.wait(request_id, 0)

    # --- ending requests -----------------------------------------------------------------
    async def abort(self, request_id: str) -> None:
        """Free everything the request holds here; unknown ids are ignored.

        While its KV is still in flight the blocks stay held until the transfer settles
        (in the background), so no late write lands in a block another request now owns.
        """
        await self._ready()
        self.outboxes.forget(request_id)
        if request_id in self._in_transfer:
            self._in_transfer.discard(request_id)
            self._loop.create_task(self._abort_after_transfer(request_id))
            return
        await self._abort_now(request_id)

    async def _abort_after_transfer(self, request_id: str) -> None:
        try:
            await self._await_transfer(request_id, None)
        except Exception:  # failed or stalled: either way the sender is done with the blocks
            pass
        await self._abort_now(request_id)

    async def _abort_now(self, request_id: str) -> None:
        self.leases.release(request_id)
        if self.receivers is not None:
            self.receivers.cancel(request_id, "aborted")
            self.receivers.release(request_id)
        await self._call(lambda engine: engine.abort_request(request_id))

    def _on_lease_expired(self, lease_id: str) -> None:
        # The prefill peer stopped renewing: its KV will never arrive, free the blocks.
        logger.warning("lease for request %s expired; freeing its blocks", lease_id)
        self._loop.create_task(self._abort_expired(lease_id))

    async def _abort_expired(self, request_id: str) -> None:
        # The peer stopped renewing: it is dead or hung, so stop waiting for its transfer.
        self._in_transfer.discard(request_id)
        # Ends this placement at the router, which places the request again.
        self.outboxes.put(StepDelta(request_id, (), "abort", None, 0, lost=(
            f"the KV of {request_id} stopped arriving: its prefill worker has not renewed the lease "
            f"for {self.spec.lease_ttl_s:g} s")))
        await self._abort_now(request_id)

    async def _expire_forever(self, period_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(period_s)
            self.leases.expire_stale(time.monotonic())
            for router_id, request_ids in self.outboxes.expire_routers().items():
                logger.warning("router %s stopped polling; aborting its %d requests", router_id, len(request_ids))
                for request_id in request_ids:
                    await self.abort(request_id)

    # --- tokens out ---------------------------------------------------------------------
    async def next_outputs(self, router_id: str, timeout_s: float = 1.0) -> OutputBatch:
        """Long-poll: every new token of this router's requests since its last call."""
        await self._ready()
        deltas = await self.outboxes.next_batch(router_id, timeout_s)
        return OutputBatch(deltas, self._report(), self.generation)

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        """Engine thread: this step's outputs go to their routers' outboxes."""
        for out in outputs:
            self.outboxes.put(_to_delta(out))

    # --- inspection -----------------------------------------------------------------------
    async def stats(self) -> WorkerStats:
        await self._ready()

        def collect(engine: LLMEngine) -> WorkerStats:
            counters = self.receivers.snapshot() if self.receivers is not None else None
            prefix = engine.kv_manager.stats()
            return WorkerStats(
                role=self.role, num_blocks=engine.kv_manager.num_blocks,
                num_free_blocks=engine.kv_manager.num_free_blocks,
                num_requests=engine.scheduler.num_unfinished, steps=self.background.steps,
                transfer_bytes=counters.bytes if counters else 0,
                transfers=counters.transfers if counters else 0,
                transfer_chunks=counters.chunks if counters else 0,
                transfer_failures=counters.failures if counters else 0,
                generation=self.generation, prefix_cache_queries=prefix.queries,
                prefix_cache_hits=prefix.hits)
        return await self._call(collect)

    async def cached_block_hashes(self) -> set[int]:
        """What this worker's prefix cache holds now: the KV block index should say the same."""
        await self._ready()
        return await self._call(lambda engine: engine.kv_manager.cached_block_hashes())

    async def _call(self, fn):
        return await asyncio.wrap_future(self.background.call(fn))
