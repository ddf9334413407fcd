"""What the engine hands back per request and step, and the per-request text state behind it."""
from __future__ import annotations

from dataclasses import dataclass

from engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from engine.request import Request
from engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every output token so far
    text: str  # every output character so far (stop strings cut it where they matched)
    new_token_ids: list[int]  # tokens added by the step that produced this output
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    stop_reason: int | str | None  # the stop token id or stop string that ended it
    logprobs: list[dict[int, float]] | None
    num_cached_tokens: int  # prompt tokens served from the prefix cache


class OutputState:
    """Incremental detokenization and stop-string matching for one request."""

    def __init__(self, request: Request, tokenizer: Tokenizer, detokenize: bool = True) -> None:
        # Workers of the cluster pass detokenize=False: the router turns tokens into text
        # (and matches stop strings) once, at the edge.
        self.request = request
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_token_ids) if detokenize else None
        params = request.sampling_params
        self.matcher = (
            StopStringMatcher(params.stop, params.include_stop_str_in_output)
            if params.stop and detokenize else None
        )
        self.num_emitted_tokens = request.num_resumed_tokens  # resumed outputs went out elsewhere
        self.text = ""

    def advance(self) -> tuple[list[int], str, str | None]:
        """Consume the request's new tokens; returns (new ids, new text, matched stop string)."""
        # Only the new tail is sliced: copying every output token each step would make a long
        # stream quadratic.
        request = self.request
        new_ids = request.all_token_ids[request.num_prompt_tokens + self.num_emitted_tokens:]
        self.num_emitted_tokens = request.num_output_tokens
        if self.detokenizer is None:
            return new_ids, "", None
        delta = self.detokenizer.add_tokens(new_ids)
        finished = self.request.is_finished
        if finished:
            delta += self.detokenizer.flush()
        stop_str = None
        if self.matcher is not None:
            match = self.matcher.feed(delta)
            delta, stop_str = match.text, match.stop_str if match.stopped else None
            if finished and not match.stopped:
                delta += self.matcher.flush()
        self.text += delta
        return new_ids, delta, stop_str

    def to_output(self, new_ids: list[int], new_text: str) -> RequestOutput:
        request = self.request
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=request.output_token_ids,
            text=self.text,
            new_token_ids=new_ids,
            new_text=new_text,
            finished=request.is_finished,
            finish_reason=request.status.finish_reason,
            stop_reason=request.stop_reason,
            logprobs=list(request.output_logprobs) if request.sampling_params.logprobs is not None else None,
            num_cached_tokens=request.num_cached_tokens,
        )
