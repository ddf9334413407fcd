"""DecodeWorker: an asyncio Ray actor around a BackgroundEngine and a KV receiver."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

import torch

from engine.background import BackgroundEngine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from kv_transfer import KVLayout, LeaseTable, TransferTicket, create_receiver

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reservation:
    """Blocks held for a prompt whose KV comes from a prefill worker."""

    ticket: TransferTicket  # the blocks past the cached prefix, where the KV must land
    num_cached_tokens: int  # prompt tokens this worker already had in its prefix cache


@dataclass(frozen=True)
class StepDelta:
    """New tokens of one request from one or more engine steps."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finish_reason: str | None
    logprobs: tuple[dict[int, float], ...] | None
    num_cached_tokens: int


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


def _to_delta(out: RequestOutput) -> StepDelta:
    logprobs = None
    if out.logprobs is not None:
        logprobs = tuple(out.logprobs[len(out.token_ids) - len(out.new_token_ids):])
    return StepDelta(out.request_id, tuple(out.new_token_ids), out.finish_reason, logprobs,
                     out.num_cached_tokens)


class DecodeWorker:
    """role "decode": receives KV and decodes; role "mixed": prefills and decodes (colocated)."""

    def __init__(self, engine_config: EngineConfig, role: str = "decode",
                 transfer_backend: str = "shm", lease_ttl_s: float = 30.0,
                 torch_threads: int | None = None) -> None:
        if role not in ("decode", "mixed"):
            raise ValueError(f"decode worker role must be 'decode' or 'mixed', got {role!r}")
        self.engine_config = engine_config
        self.role = role
        self.transfer_backend = transfer_backend
        self.lease_ttl_s = lease_ttl_s
        self.torch_threads = torch_threads
        self.receiver = None
        self.background: BackgroundEngine | None = None
        self.leases = LeaseTable(on_expire=self._on_lease_expired)
        # Tickets whose transfer has not settled: the sender may still write into their blocks
        # (shm and CUDA IPC write before they announce a chunk), so those blocks are never
        # freed before the sender says done or failed, its link drops, or its lease lapses.
        self._in_transfer: set[str] = set()
        self._pending: dict[str, StepDelta] = {}
        self._pending_lock = threading.Lock()
        self._ready = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle ------------------------------------------------------------------
    async def start(self) -> dict:
        """Load the model, open the KV receiver, start the engine loop; returns layout and endpoint."""
        self._loop = asyncio.get_running_loop()
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        engine = await asyncio.to_thread(self._build_engine)
        self.background = BackgroundEngine(engine, self._on_outputs)
        self.background.start()
        self._loop.create_task(self._expire_leases_forever())
        return {"layout": engine.kv_layout_fields(), "max_model_len": engine.max_model_len,
                "endpoint": self.receiver.endpoint if self.receiver else None}

    def _build_engine(self) -> LLMEngine:
        if self.role == "mixed":
            return LLMEngine(self.engine_config, detokenize=False)
        return LLMEngine(self.engine_config, kv_cache_factory=self._open_receiver, detokenize=False)

    def _open_receiver(self, shape, model_name: str) -> torch.Tensor:
        """The receiver allocates the KV cache, where prefill workers write directly."""
        layout = KVLayout(model=model_name, dtype=str(shape.dtype).removeprefix("torch."),
                          block_size=shape.block_size, num_layers=shape.num_layers,
                          num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim)
        self.receiver = create_receiver(self.transfer_backend, layout, shape.num_blocks)
        return self.receiver.kv_cache

    async def shutdown(self) -> None:
        if self.background is not None:
            self.background.stop()
        if self.receiver is not None:
            self.receiver.close()

    # --- disaggregated path -----------------------------------------------------------
    async def reserve(self, request_id: str, prompt_token_ids: list[int],
                      params: SamplingParams) -> Reservation | None:
        """Hold blocks for the prompt; None when this worker has no room right now."""
        reservation = await self._call(
            lambda engine: engine.reserve_for_transfer(request_id, prompt_token_ids, params))
        if reservation is None:
            return None
        num_cached, block_table = reservation
        first_block = num_cached // self.receiver_block_size
        try:
            ticket = self.receiver.issue_ticket(
                request_id, block_table[first_block:], len(prompt_token_ids) - num_cached,
                lease_id=request_id, first_token=num_cached)
        except Exception:
            await self._call(lambda engine: engine.abort_request(request_id))
            raise
        self._in_transfer.add(request_id)
        self.leases.grant(request_id, self.lease_ttl_s)
        return Reservation(ticket, num_cached)

    async def renew_leases(self, request_ids: list[str]) -> list[str]:
        """The prefill worker holding these tickets is alive; returns ids whose lease is gone."""
        return [rid for rid in request_ids if not self.leases.renew(rid)]

    @property
    def receiver_block_size(self) -> int:
        return self.receiver.layout.block_size

    async def start_decode(self, request_id: str, first_token: int,
                           logprobs: dict[int, float] | None = None,
                           timeout_s: float | None = None) -> StepDelta | None:
        """Wait for the request's KV to land, then join the running batch with its first token.

        Returns the request's delta when it finished right away (EOS or max_tokens 1),
        None when it runs on; raises TransferError / TransferTimeout when the KV never came.
        """
        try:
            await self._await_transfer(request_id, timeout_s)
        except Exception:
            # Failed (the sender said so or vanished) or stalled past the timeout: give up.
            self._in_transfer.discard(request_id)
            await self.abort(request_id)
            raise
        self._in_transfer.discard(request_id)
        self.leases.release(request_id)
        self.receiver.release(request_id)
        out = await self._call(lambda engine: engine.start_after_transfer(request_id, first_token, logprobs))
        return _to_delta(out) if out is not None and out.finished else None

    async def _await_transfer(self, request_id: str, timeout_s: float | None) -> None:
        """Poll without holding a thread; DONE returns, FAILED / a stall raise."""
        deadline = time.monotonic() + (self.receiver.timeout_s if timeout_s is None else timeout_s)
        delay = 0.0005
        while not self.receiver.poll(request_id).finished and time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.01)
        self.receiver.wait(request_id, 0)

    # --- colocated path -----------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Mixed role: prefill and decode here; tokens arrive through next_outputs."""
        await self._call(lambda engine: engine.add_request(prompt_token_ids, params, request_id))

    # --- both ---------------------------------------------------------------------------
    async def abort(self, request_id: str) -> None:
        """Free everything the request holds here; unknown ids are ignored.

        While its KV is still in flight the blocks stay held until the transfer settles
        (in the background), so no late write lands in a block another request now owns.
        """
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
        if self.receiver is not None:
            self.receiver.cancel(request_id, "aborted")
            self.receiver.release(request_id)
        await self._call(lambda engine: engine.abort_request(request_id))
        with self._pending_lock:
            self._pending.pop(request_id, None)

    async def next_outputs(self, timeout_s: float = 1.0) -> list[StepDelta]:
        """Long-poll: every request's new tokens since the last call, as one batch."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        except asyncio.TimeoutError:
            return []
        with self._pending_lock:
            batch, self._pending = list(self._pending.values()), {}
            self._ready.clear()
        return batch

    async def stats(self) -> WorkerStats:
        def collect(engine: LLMEngine) -> WorkerStats:
            counters = self.receiver.snapshot() if self.receiver is not None else None
            return WorkerStats(
                role=self.role, num_blocks=engine.kv_manager.num_blocks,
                num_free_blocks=engine.kv_manager.num_free_blocks,
                num_requests=engine.scheduler.num_unfinished, steps=self.background.steps,
                transfer_bytes=counters.bytes if counters else 0,
                transfers=counters.transfers if counters else 0,
                transfer_chunks=counters.chunks if counters else 0,
                transfer_failures=counters.failures if counters else 0)
        return await self._call(collect)

    # --- internals ------------------------------------------------------------------------
    async def _call(self, fn):
        return await asyncio.wrap_future(self.background.call(fn))

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        """Engine thread: merge this step's outputs into the batch the router will fetch."""
        with self._pending_lock:
            for out in outputs:
                delta = _to_delta(out)
                earlier = self._pending.get(out.request_id)
                if earlier is not None:
                    delta = StepDelta(
                        out.request_id, earlier.new_token_ids + delta.new_token_ids,
                        delta.finish_reason,
                        None if delta.logprobs is None else (earlier.logprobs or ()) + delta.logprobs,
                        delta.num_cached_tokens)
                self._pending[out.request_id] = delta
        self._loop.call_soon_threadsafe(self._ready.set)

    def _on_lease_expired(self, lease_id: str) -> None:
        # The prefill peer stopped renewing: its KV will never arrive, free the blocks.
        logger.warning("lease for request %s expired; freeing its blocks", lease_id)
        self._loop.create_task(self._abort_expired(lease_id))

    async def _abort_expired(self, request_id: str) -> None:
        # The peer stopped renewing: it is dead or hung, so stop waiting for its transfer.
        self._in_transfer.discard(request_id)
        await self._abort_now(request_id)
        with self._pending_lock:
            self._pending[request_id] = StepDelta(request_id, (), "abort", None, 0)
        self._ready.set()

    async def _expire_leases_forever(self, period_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(period_s)
            self.leases.expire_stale(time.monotonic())
