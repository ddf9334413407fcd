"""Per-request state inside the engine: tokens, progress, status.

A request's token list grows only through `append_output_token`, so `num_tokens`,
`output_token_ids` and the prefix-cache block hashes never disagree.
"""
from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Ordered: everything at or above FINISHED_STOPPED is finished."""

    WAITING = 0
    WAITING_FOR_KV = 1  # decode side: blocks reserved, KV arriving from a prefill worker
    RUNNING = 2
    PREEMPTED = 3
    FINISHED_STOPPED = 4  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = 5  # max_tokens or max_model_len reached
    FINISHED_ABORTED = 6  # cancelled by the client, a deadline or a failure

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """One generation request as the scheduler sees it.

    num_computed_tokens counts tokens whose KV is in the cache (prefix-cache hits,
    transferred KV and computed chunks alike). A request is prefilling while
    num_computed_tokens < num_prompt_tokens.

    A request may start with output tokens it generated elsewhere (`output_token_ids`: it is
    resumed on this engine after the one that ran it died). They are prefilled again with the
    prompt, count against max_tokens and for penalties as outputs, advance a seeded generator,
    and are not emitted again.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        arrival_time: float | None = None,
        output_token_ids: Sequence[int] = (),
    ) -> None:
        if not prompt_token_ids:
            raise ValueError(f"request {request_id}: the prompt has no tokens")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = tuple(eos_token_ids)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None  # the stop token id or string that ended it
        self.all_token_ids: list[int] = list(prompt_token_ids) + list(output_token_ids)
        self.num_resumed_tokens = len(output_token_ids)  # outputs generated before it came here
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hit at the last admission, for metrics
        # What the prefix cache held of it when it was queued: the part of its prompt that will
        # most likely not be computed (the load a worker reports counts the rest as queued work).
        self.expected_cached_tokens = 0
        self.num_preemptions = 0
        # Sampled logprobs, one entry per output token when sampling_params.logprobs is set
        # (an empty dict for each resumed token: their logprobs went out from the other engine).
        self.output_logprobs: list[dict[int, float]] = (
            [{} for _ in output_token_ids] if sampling_params.logprobs is not None else [])
        # Per-request torch.Generator for seeded sampling, created by the sampler on first use.
        self.generator = None

    # --- token list -----------------------------------------------------------------
    def append_output_token(self, token_id: int, logprobs: dict[int, float] | None = None) -> None:
        self.all_token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]

    @property
    def is_prefilling(self) -> bool:
        # After a preemption, the prompt *and* the output so far are recomputed.
        return self.num_computed_tokens < self.num_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.name}, prompt={self.num_prompt_tokens}, "
            f"out={self.num_output_tokens}, computed={self.num_computed_tokens})"
        )
