"""The single-process engine loop: schedule, run the model, sample, detokenize, finish."""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable

import torch

from engine.config import EngineConfig
from engine.kv_cache import KVCacheManager, KVEventLog
from engine.loader import LoadedModel, load_model
from engine.model_runner import KVCacheShape, ModelRunner
from engine.outputs import OutputState, RequestOutput
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import AdmissionRefusal, ScheduledRequest, Scheduler
from engine.step_stats import EngineLoad, StepCostModel

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but CUDA is not available")
    return device


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        # CPUs here lack fast half-precision matmuls; GPUs want bf16 for bandwidth and range.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        kv_cache_factory: Callable[[KVCacheShape, str], torch.Tensor] | None = None,
        detokenize: bool = True,
    ) -> None:
        """kv_cache_factory(shape, model_name), when given, provides the KV tensor (a decode
        worker lets its KV receiver allocate it, in memory that peers can write)."""
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        torch.manual_seed(config.seed)
        self.loaded: LoadedModel = load_model(config.model, self.dtype, self.device, config.dequantize)
        self.tokenizer = self.loaded.tokenizer
        arch = self.loaded.config
        self.max_model_len = config.scheduler.max_model_len or arch.max_position_embeddings
        self.kv_shape = self._kv_cache_shape()
        kv_cache = None
        if kv_cache_factory is not None:
            kv_cache = kv_cache_factory(self.kv_shape, self.loaded.name)
        self.runner = ModelRunner(self.loaded.model, self.kv_shape, self.device,
                                  config.attention_backend, kv_cache, config.decode_kernel)
        self.kv_manager = KVCacheManager(
            self.kv_shape.num_blocks, self.kv_shape.block_size, config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(config.scheduler, self.kv_manager, self.max_model_len)
        self.step_cost = StepCostModel()
        self.detokenize = detokenize
        self.stalled = False  # the last step could schedule nothing (KV in flight holds blocks)
        self.output_states: dict[str, OutputState] = {}
        self._ids = itertools.count()
        # Called after each forward pass with the step's scheduled requests, before their
        # num_computed_tokens advance: the prefill worker pushes the fresh KV from here.
        self.after_forward: Callable[[tuple[ScheduledRequest, ...]], None] | None = None
        # Called as after_layer(layer, scheduled) once each layer has written this step's K/V:
        # a prefill worker pushing layer by layer (GPU) starts sending while later layers compute.
        self.after_layer: Callable[[int, tuple[ScheduledRequest, ...]], None] | None = None

    def _kv_cache_shape(self) -> KVCacheShape:
        cache = self.config.cache
        arch = self.loaded.config
        if cache.num_blocks is not None:
            return KVCacheShape(arch.num_layers, cache.num_blocks, cache.block_size,
                                arch.num_kv_heads, arch.head_dim, self.dtype)
        return KVCacheShape.for_budget(arch, cache.block_size, self.dtype,
                                       cache.kv_cache_memory_gb * 2**30)

    def enable_kv_events(self) -> KVEventLog:
        """Record every prefix-cache change from now on (for the cluster's KV block index)."""
        if self.kv_manager.pool.events is None:
            self.kv_manager.pool.events = KVEventLog()
        return self.kv_manager.pool.events

    def load_snapshot(self) -> EngineLoad:
        """Queues, pool and fitted step cost, now. Call on the engine's own thread."""
        scheduler = self.scheduler
        queued = 0
        for request in scheduler.requests.values():
            if request.status is not RequestStatus.WAITING_FOR_KV and request.is_prefilling:
                computed = max(request.num_computed_tokens, request.expected_cached_tokens)
                queued += max(0, request.num_tokens - computed)
        fit = self.step_cost.fit()
        return EngineLoad(
            num_running=len(scheduler.running) - scheduler.num_waiting_for_kv,
            num_waiting=len(scheduler.waiting), num_waiting_for_kv=scheduler.num_waiting_for_kv,
            num_unfinished=scheduler.num_unfinished, max_num_seqs=self.config.scheduler.max_num_seqs,
            num_free_blocks=self.kv_manager.num_free_blocks, num_blocks=self.kv_manager.num_blocks,
            queued_prefill_tokens=queued, max_num_batched_tokens=self.config.scheduler.max_num_batched_tokens,
            step_base_s=fit.base_s, mixed_step_s=fit.mixed_step_s, prefill_s_per_token=fit.prefill_s_per_token,
            decode_s_per_seq=fit.decode_s_per_seq, step_samples=fit.samples,
            prefix_cache_queries=self.kv_manager.prefix_cache_queries,
            prefix_cache_hits=self.kv_manager.prefix_cache_hits, requests_taken=scheduler.stats.num_requests,
            taken_at=time.time())

    def calibrate(self, num_prompt_tokens: int = 128, num_decode_steps: int = 4) -> None:
        """Seed the step-cost fit with real prefills of two lengths and a few decode steps of
        this machine (and warm the kernels), then forget the requests: the prefix cache and its
        stats are reset, so a fresh engine stays fresh. Call before any request arrives."""
        vocab = self.loaded.config.vocab_size
        length = max(8, min(num_prompt_tokens, self.max_model_len - num_decode_steps - 1,
                            self.config.scheduler.max_num_batched_tokens))
        params = SamplingParams(max_tokens=num_decode_steps, temperature=0.0, ignore_eos=True)
        # The first round warms up; the other two are observed. Two prompt lengths tell a
        # step's fixed cost of holding prefill tokens from their per-token cost.
        for round_, tokens in enumerate((length, length, length // 4)):
            prompt = [(7919 * i + round_) % vocab for i in range(tokens)]
            self.add_request(prompt, params, f"calibration-{round_}")
            while self.has_unfinished_requests():
                self.step()
            if round_ == 0:
                self.step_cost = StepCostModel()
        self.kv_manager.reset_prefix_cache()
        self.kv_manager.prefix_cache_queries = self.kv_manager.prefix_cache_hits = 0

    def kv_layout_fields(self) -> dict:
        """What a KV transfer handshake compares: the same on both sides or no transfer."""
        shape = self.kv_shape
        return dict(model=self.loaded.name, dtype=str(shape.dtype).removeprefix("torch."),
                    block_size=shape.block_size, num_layers=shape.num_layers,
                    num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim)

    # --- requests -------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.loaded.config.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.loaded.config.vocab_size}): {bad[:5]}")
        return ids

    def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
        output_token_ids: list[int] = (),
    ) -> Request:
        """output_token_ids: tokens the request already generated elsewhere (see Request)."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        request = Request(request_id, self.tokenize(prompt), params,
                          eos_token_ids=self.tokenizer.eos_token_ids,
                          output_token_ids=self.tokenize(list(output_token_ids)))
        self.scheduler.add_request(request)
        self.output_states[request_id] = OutputState(request, self.tokenizer, self.detokenize)
        return request

    def admit_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str,
        output_token_ids: list[int] = (),
    ) -> AdmissionRefusal | None:
        """Like add_request, but refused (None returned otherwise) when the engine has no free
        sequence slot or not enough free KV blocks for the prompt right now."""
        request = Request(request_id, self.tokenize(prompt), params,
                          eos_token_ids=self.tokenizer.eos_token_ids,
                          output_token_ids=self.tokenize(list(output_token_ids)))
        if request_id in self.scheduler.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.scheduler.check_fits(request.num_prompt_tokens, params.max_tokens)
        refusal = self.scheduler.admit(request)
        if refusal is None:
            self.output_states[request_id] = OutputState(request, self.tokenizer, self.detokenize)
        return refusal

    def reserve_for_transfer(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        output_token_ids: list[int] = (),
    ) -> tuple[int, list[int]] | AdmissionRefusal:
        """Decode side: hold blocks for a prompt (and resumed outputs) whose KV comes from a
        prefill worker.

        Returns (cached tokens, the request's block table), or the limit that keeps the request
        out right now.
        """
        request = Request(request_id, self.tokenize(prompt_token_ids), params,
                          eos_token_ids=self.tokenizer.eos_token_ids,
                          output_token_ids=self.tokenize(list(output_token_ids)))
        num_cached = self.scheduler.reserve_for_transfer(request)
        if isinstance(num_cached, AdmissionRefusal):
            return num_cached
        self.output_states[request_id] = OutputState(request, self.tokenizer, self.detokenize)
        return num_cached, self.kv_manager.get_block_ids(request_id)

    def start_after_transfer(
        self, request_id: str, first_token: int, logprobs: dict[int, float] | None = None
    ) -> RequestOutput | None:
        """Decode side: the KV has landed; join the running batch with the prefill's first token."""
        request = self.scheduler.start_after_transfer(request_id, first_token, logprobs)
        return None if request is None else self._make_output(request)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End a request and free its blocks; returns its final output (None if unknown)."""
        request = self.scheduler.abort_request(request_id)
        state = self.output_states.pop(request_id, None)
        if request is None or state is None:
            return None
        return state.to_output([], "")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def has_work(self) -> bool:
        """Whether step() would compute something now."""
        return self.scheduler.has_work()

    # --- the loop -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        self.stalled = scheduled.is_empty
        if scheduled.is_empty:
            # Blocks held for KV in flight free up once it lands: wait for that. Without any,
            # nothing will ever change, and waiting would hang the caller.
            if (self.scheduler.has_work() and not scheduled.preempted_ids
                    and self.scheduler.num_waiting_for_kv == 0):
                raise RuntimeError("no request could be scheduled; the KV cache is too small")
            return []
        tables = [self.kv_manager.get_block_ids(s.request.request_id) for s in scheduled.scheduled]
        after_layer = None
        if self.after_layer is not None:
            hook, items = self.after_layer, scheduled.scheduled
            after_layer = lambda layer: hook(layer, items)  # noqa: E731
        began = time.perf_counter()
        result = self.runner.execute(scheduled.scheduled, tables, after_layer)
        self._observe_step(scheduled.scheduled, time.perf_counter() - began)
        if self.after_forward is not None:
            self.after_forward(scheduled.scheduled)
        progressed = self.scheduler.update_from_output(scheduled, result.sampled)
        return [self._make_output(request) for request in progressed]

    def _observe_step(self, scheduled: tuple[ScheduledRequest, ...], seconds: float) -> None:
        prefill_tokens = decode_rows = 0
        for item in scheduled:
            if item.request.is_prefilling:
                prefill_tokens += item.num_new_tokens
            else:
                decode_rows += 1
        self.step_cost.observe(prefill_tokens, decode_rows, seconds)

    def _make_output(self, request: Request) -> RequestOutput:
        state = self.output_states[request.request_id]
        new_ids, new_text, stop_str = state.advance()
        if stop_str is not None and not request.is_finished:
            request.stop_reason = stop_str
            self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)
        elif stop_str is not None:
            # The stop string arrived on the step that also hit EOS / length: the string wins.
            request.status, request.stop_reason = RequestStatus.FINISHED_STOPPED, stop_str
        if request.is_finished:
            self.output_states.pop(request.request_id, None)
        return state.to_output(new_ids, new_text)
