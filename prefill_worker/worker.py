"""PrefillWorker: an asyncio Ray actor that prefills prompts and pushes their KV."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from engine.background import BackgroundEngine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from kv_transfer import KVLayout, TransferTicket, create_sender
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
    def __init__(self, engine_config: EngineConfig, transfer_backend: str = "shm",
                 torch_threads: int | None = None, lease_renew_s: float = 5.0,
                 push_granularity: str = "auto") -> None:
        self.engine_config = engine_config
        self.transfer_backend = transfer_backend
        self.push_granularity = push_granularity  # auto | chunk | layer (see prefill_worker.pusher)
        self.torch_threads = torch_threads
        # Every request queued or computing here keeps its decode-side lease alive; a dead or
        # hung prefill worker stops renewing and the decode worker frees the blocks.
        self.lease_renew_s = lease_renew_s
        self._lease_holders: dict[str, object] = {}  # request id -> decode worker actor
        # Ray does not order calls to an async actor: an abort can overtake its prefill.
        # Remember recent aborts so a late prefill is refused instead of run.
        self._aborted: OrderedDict[str, None] = OrderedDict()
        self.background: BackgroundEngine | None = None
        self.sender = None
        self.pusher: KVPusher | None = None
        self._waiting: dict[str, asyncio.Future] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> dict:
        """Load the model and start the engine loop; returns the KV layout for the handshake."""
        self._loop = asyncio.get_running_loop()
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        engine = await asyncio.to_thread(LLMEngine, self.engine_config, None, False)
        layout = KVLayout(**engine.kv_layout_fields())
        self.sender = create_sender(self.transfer_backend, layout)
        self.pusher = KVPusher(self.sender, engine.runner.kv_cache, layout.block_size,
                               engine.kv_manager.get_block_ids, self.push_granularity)
        engine.after_forward = self.pusher.after_forward
        if self.pusher.granularity == "layer":
            engine.after_layer = self.pusher.after_layer
        self.background = BackgroundEngine(engine, self._on_outputs)
        self.background.start()
        self._loop.create_task(self._renew_leases_forever())
        return {"layout": engine.kv_layout_fields(), "max_model_len": engine.max_model_len,
                "push_granularity": self.pusher.granularity}

    async def connect(self, endpoints: list[str]) -> None:
        """Handshake with every decode worker's receiver now, not on a request's critical path.

        Raises KVLayoutMismatch naming the differing fields when a decode worker's cache
        layout is not this worker's.
        """
        for endpoint in endpoints:
            await asyncio.to_thread(self.sender.connect, endpoint)

    async def prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                      ticket: TransferTicket, decode_worker=None) -> PrefillResult:
        """Compute the prompt's KV, push the part the decode worker lacks, sample the first token.

        decode_worker, the actor that issued the ticket, has its lease on the reserved blocks
        renewed while the request is here.
        """
        if request_id in self._aborted:
            await asyncio.to_thread(self.sender.send_failed, ticket, "aborted before prefill")
            raise PrefillAborted(f"request {request_id} was aborted before its prefill started")
        first_only = dataclasses.replace(params, max_tokens=1, stop=(), include_stop_str_in_output=False)
        future = self._loop.create_future()
        self._waiting[request_id] = future
        if decode_worker is not None:
            self._lease_holders[request_id] = decode_worker
            future.add_done_callback(lambda _: self._lease_holders.pop(request_id, None))

        def admit(engine: LLMEngine) -> None:
            self.pusher.track(ticket)
            engine.add_request(prompt_token_ids, first_only, request_id)
        try:
            await asyncio.wrap_future(self.background.call(admit))
        except Exception as err:
            self._waiting.pop(request_id, None)
            self._lease_holders.pop(request_id, None)
            await asyncio.wrap_future(self.background.call(
                lambda engine: self.pusher.abandon(request_id, f"refused: {err}")))
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
        try:
            lapsed = await asyncio.wait_for(actor.renew_leases.remote(request_ids), self.lease_renew_s)
        except Exception as err:  # that decode worker is gone or stuck; its requests fail there
            logger.warning("lease renewal failed: %s", err)
            return
        for request_id in lapsed:  # the decode worker freed these blocks: stop pushing into them
            await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
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

    async def stats(self) -> dict:
        def collect(engine: LLMEngine) -> dict:
            counters = self.sender.snapshot()
            return {"num_blocks": engine.kv_manager.num_blocks,
                    "num_free_blocks": engine.kv_manager.num_free_blocks,
                    "num_requests": engine.scheduler.num_unfinished,
                    "prefix_cache_hits": engine.kv_manager.stats().hits,
                    "transfer_bytes": counters.bytes, "transfers": counters.transfers,
                    "transfer_failures": counters.failures}
        return await asyncio.wrap_future(self.background.call(collect))

    async def shutdown(self) -> None:
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
            if out.token_ids:
                result = PrefillResult(out.request_id, out.token_ids[0],
                                       out.logprobs[0] if out.logprobs else None, out.num_cached_tokens)
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
