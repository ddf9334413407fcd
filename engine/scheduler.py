"""Continuous batching with chunked prefill under a per-step token budget.

Each step the scheduler picks, for every request it runs, how many new tokens to compute:
running requests first (decodes take 1 token, unfinished prefills the rest of their prompt
up to the budget), then waiting requests in arrival order while budget, sequence slots and
KV blocks last. When blocks run out, the most recently admitted running request is preempted
by recompute: its blocks are freed and it goes back to the front of the queue, to be
prefilled again over prompt + tokens generated so far (the prefix cache usually makes that cheap).

Invariant: a request in `running` holds KV blocks for all its computed tokens; a request in
`waiting` holds none.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.config import SchedulerConfig
from engine.kv_cache import KVCacheManager
from engine.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed for it this step, starting at num_computed_tokens

    @property
    def samples(self) -> bool:
        """Whether this step completes the request's context, so a token is sampled for it."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledRequest, ...]
    num_batched_tokens: int
    preempted_ids: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class AdmissionRefusal:
    """Why a worker cannot take a request right now (it may later): the limit that was hit."""

    limit: str  # "sequence slots" | "KV blocks"
    detail: str

    def __str__(self) -> str:
        return f"no free {self.limit}: {self.detail}"


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    num_steps: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_requests: int = 0  # requests taken in since start (queued or reserved for KV)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv_manager = kv_manager
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_waiting_for_kv = 0  # requests holding blocks while their KV is in flight
        self.stats = SchedulerStats()

    # --- admission ------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.check_fits(request.num_prompt_tokens, request.sampling_params.max_tokens)
        request.expected_cached_tokens = self.kv_manager.get_computed_blocks(request).num_computed_tokens
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.stats.num_requests += 1

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Refuse a request that could never run, instead of letting it starve or thrash."""
        if num_prompt_tokens > self.max_model_len:
            raise ValueError(
                f"prompt has {num_prompt_tokens} tokens, more than max_model_len "
                f"({self.max_model_len})"
            )
        longest = min(num_prompt_tokens + max_tokens, self.max_model_len)
        blocks_needed = -(-longest // self.kv_manager.block_size)
        if blocks_needed > self.kv_manager.num_blocks:
            raise ValueError(
                f"prompt + max_tokens needs {blocks_needed} KV blocks, but the cache has only "
                f"{self.kv_manager.num_blocks}; lower max_tokens or raise the KV cache size"
            )

    def admit(self, request: Request) -> AdmissionRefusal | None:
        """Add a request that this engine prefills itself, if it has room for it now.

        Unlike add_request (which queues without limit), this refuses when every sequence slot
        is taken (max_num_seqs counts every request held: running, queued, or waiting for KV)
        or when the free blocks, less those promised to requests queued before it, cannot hold
        its uncached prompt. Returns None when added.
        """
        refusal = self._slots_refusal()
        if refusal is None:
            computed = self.kv_manager.get_computed_blocks(request)
            need = -(-(request.num_tokens - computed.num_computed_tokens) // self.kv_manager.block_size)
            self.kv_manager.free(request)  # the lookup only: nothing is held until scheduled
            free = self.kv_manager.num_free_blocks - self._blocks_promised()
            if need > free:
                refusal = AdmissionRefusal(
                    "KV blocks", f"the prompt needs {need} blocks, {max(free, 0)} are free")
        if refusal is None:
            self.add_request(request)
        return refusal

    def _slots_refusal(self) -> AdmissionRefusal | None:
        if len(self.requests) < self.config.max_num_seqs:
            return None
        return AdmissionRefusal("sequence slots", f"{len(self.requests)} of max_num_seqs "
                                                  f"{self.config.max_num_seqs} requests are held")

    def _blocks_promised(self) -> int:
        """Blocks the queued requests will take for their prompts once scheduled."""
        size = self.kv_manager.block_size
        return sum(-(-(r.num_tokens - r.num_computed_tokens) // size) for r in self.waiting)

    def reserve_for_transfer(self, request: Request) -> int | AdmissionRefusal:
        """Decode side of disaggregation: take KV blocks for the whole prompt now.

        Blocks already in the prefix cache are reused; the rest wait for KV from a prefill
        worker. Returns the number of prompt tokens served from the cache, or, holding nothing,
        the limit (sequence slots or KV blocks) that keeps it out right now.
        """
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.check_fits(request.num_prompt_tokens, request.sampling_params.max_tokens)
        refusal = self._slots_refusal()
        if refusal is not None:
            return refusal
        computed = self.kv_manager.get_computed_blocks(request)
        num_new = request.num_tokens - computed.num_computed_tokens
        free_before = self.kv_manager.num_free_blocks
        refusal = None
        if not self.kv_manager.allocate_slots(request, num_new, computed):
            need = -(-num_new // self.kv_manager.block_size)
            refusal = AdmissionRefusal("KV blocks", f"the prompt needs {need} blocks past its cached "
                                                    f"prefix, {free_before} are free")
        elif not self._leaves_headroom():
            refusal = AdmissionRefusal(
                "KV blocks", f"holding the prompt would leave {self.kv_manager.num_free_blocks} free "
                             f"blocks for {len(self.running) - self.num_waiting_for_kv} decoding requests")
        if refusal is not None:
            self.kv_manager.free(request)  # roll back, and drop the lookup's per-request state
            return refusal
        self.kv_manager.record_admission(request, computed)
        request.num_cached_tokens = computed.num_computed_tokens
        request.status = RequestStatus.WAITING_FOR_KV
        self.num_waiting_for_kv += 1
        self.requests[request.request_id] = request
        self.running.append(request)
        self.stats.num_requests += 1
        return computed.num_computed_tokens

    def _leaves_headroom(self) -> bool:
        """After a reservation, a free block must remain per computing request, or decodes
        would be starved by blocks held for KV that has not arrived yet."""
        computing = len(self.running) - self.num_waiting_for_kv
        return self.kv_manager.num_free_blocks >= computing

    def start_after_transfer(self, request_id: str, first_token: int,
                             logprobs: dict[int, float] | None = None) -> Request | None:
        """The prompt's KV has landed and its first token was sampled by the prefill worker."""
        request = self.requests.get(request_id)
        if request is None or request.status != RequestStatus.WAITING_FOR_KV:
            return None
        self.num_waiting_for_kv -= 1
        request.num_computed_tokens = request.num_tokens  # the prompt (and resumed outputs) landed
        self.kv_manager.cache_full_blocks(request, request.num_computed_tokens)
        request.append_output_token(first_token, logprobs)
        request.status = RequestStatus.RUNNING
        status = self.check_stop(request)
        if status is not None:
            self.finish_request(request_id, status)
        return request

    def abort_request(self, request_id: str) -> Request | None:
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request from outside the step loop (abort, a stop string); frees its blocks."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.WAITING_FOR_KV:
            self.num_waiting_for_kv -= 1
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        self.kv_manager.free(request)
        return request

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def has_work(self) -> bool:
        """Whether a step could compute anything (requests waiting for KV compute nothing)."""
        return len(self.requests) > self.num_waiting_for_kv

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # --- one step -------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        budget = self._schedule_running(budget, scheduled, preempted)
        if not preempted:
            self._schedule_waiting(budget, scheduled)
        num_tokens = sum(s.num_new_tokens for s in scheduled)
        self.stats.num_steps += 1
        return SchedulerOutput(tuple(scheduled), num_tokens, tuple(preempted))

    def _schedule_running(
        self, budget: int, scheduled: list[ScheduledRequest], preempted: list[str]
    ) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if request.status == RequestStatus.WAITING_FOR_KV:
                index += 1  # holds its blocks, computes nothing until the KV arrives
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv_manager.allocate_slots(request, num_new):
                victim = self._pick_victim(index)
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    return budget
            scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
            index += 1
        return budget

    def _schedule_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            computed = self.kv_manager.get_computed_blocks(request)
            num_new = request.num_tokens - computed.num_computed_tokens
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    return
                num_new = budget
            if not self.kv_manager.allocate_slots(request, num_new, computed):
                return
            self.waiting.popleft()
            self.kv_manager.record_admission(request, computed)
            request.num_computed_tokens = computed.num_computed_tokens
            request.num_cached_tokens = computed.num_computed_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new

    def _pick_victim(self, first: int) -> Request:
        """The most recently admitted request at or after `first` that computes.

        Requests before `first` are already scheduled this step; KV in flight is never dropped.
        running[first] itself computes, so there is always a candidate.
        """
        for index in range(len(self.running) - 1, first - 1, -1):
            if self.running[index].status != RequestStatus.WAITING_FOR_KV:
                return self.running.pop(index)
        raise AssertionError("running[first] must be a computing request")

    def _preempt(self, request: Request) -> None:
        self.kv_manager.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self.stats.num_preemptions += 1

    # --- results --------------------------------------------------------------------
    def update_from_output(
        self, output: SchedulerOutput, sampled: dict[str, tuple[int, dict[int, float] | None]]
    ) -> list[Request]:
        """Advance computed tokens, append sampled tokens and finish requests that are done.

        `sampled` maps request id -> (token id, logprobs) for the requests whose step sampled.
        Returns the requests that got a new token, finished ones included.
        """
        progressed: list[Request] = []
        for item in output.scheduled:
            request = item.request
            if request.is_finished:  # aborted between schedule and update
                continue
            request.num_computed_tokens += item.num_new_tokens
            self.kv_manager.cache_full_blocks(request, request.num_computed_tokens)
            if request.num_computed_tokens - item.num_new_tokens < request.num_prompt_tokens:
                self.stats.num_prefill_tokens += item.num_new_tokens
            else:
                self.stats.num_decode_tokens += item.num_new_tokens
            if request.request_id not in sampled:
                continue
            token_id, logprobs = sampled[request.request_id]
            request.append_output_token(token_id, logprobs)
            status = self.check_stop(request)
            if status is not None:
                self.finish_request(request.request_id, status)
            progressed.append(request)
        return progressed

    def check_stop(self, request: Request) -> RequestStatus | None:
        params = request.sampling_params
        last = request.all_token_ids[-1]
        if not params.ignore_eos and last in request.eos_token_ids:
            request.stop_reason = last
            return RequestStatus.FINISHED_STOPPED
        if last in params.stop_token_ids:
            request.stop_reason = last
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= params.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
