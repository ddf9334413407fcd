"""Per-stream text: turns one request's token deltas into text deltas for the client.

Workers send token ids only; the router detokenizes incrementally (never splitting a UTF-8
character) and applies stop strings, because a stop string can span tokens from several
steps and only the router sees the whole stream. A stop-string match ends the stream here while
the workers still run the request, so the caller must abort it on the backend
(`TextStream.needs_backend_abort`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from engine.sampling_params import SamplingParams
from router.backend import TokenDelta


@dataclass(frozen=True)
class StreamChunk:
    """What one response message carries.

    text may be shorter than token_ids decode to: bytes of an unfinished character and a
    possible start of a stop string are held back until a later chunk (or the last) resolves them.
    """

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[dict[int, float], ...] | None
    finish_reason: str | None  # set on the last chunk only
    stop_string: str | None = None  # the stop string that ended the stream


class TextStream:
    """Detokenization and stop-string state of one streamed request.

    Invariant: once `finished` is True, process() must not be called again.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids)
        self._matcher = (
            StopStringMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None
        )
        self.finished = False
        self.needs_backend_abort = False  # True when a stop string ended a still-running request
        self.num_output_tokens = 0
        self.num_cached_tokens = 0

    def process(self, delta: TokenDelta) -> StreamChunk:
        if self.finished:
            raise RuntimeError(f"request {delta.request_id}: stream already finished")
        self.num_output_tokens += len(delta.new_token_ids)
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        ending = delta.finish_reason is not None
        text = self._detokenizer.add_tokens(list(delta.new_token_ids))
        if ending:
            text += self._detokenizer.flush()
        finish_reason, stop_string = delta.finish_reason, None
        if self._matcher is not None:
            match = self._matcher.feed(text)
            text = match.text
            if match.stopped:
                finish_reason, stop_string = "stop", match.stop_str
                self.needs_backend_abort = not ending
            elif ending:
                text += self._matcher.flush()
        self.finished = finish_reason is not None
        return StreamChunk(
            token_ids=tuple(delta.new_token_ids),
            text=text,
            logprobs=delta.logprobs,
            finish_reason=finish_reason,
            stop_string=stop_string,
        )
