"""Limits on what one request may ask of the front doors, checked at admission.

The model's context bounds prompt + max_tokens; these bound the rest of what a hostile or
careless client could send: the size of a message, the prompt, the stop lists (every stop string
is matched against every streamed chunk, and the longest one is how much text is held back),
the top-n logprobs, and the streams one connection may hold open. A request past a limit is
refused before it reaches the cluster, with an error that names the field and the flag.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.sampling_params import SamplingParams
from router.intake import GRPC_FIELDS, FieldNames, InvalidArgument

MIB = 2**20


@dataclass(frozen=True)
class RequestLimits:
    # gRPC's own default; a 4 MiB prompt is about a million tokens, past any context served here.
    max_message_bytes: int = 4 * MIB
    max_prompt_tokens: int | None = None  # None: the model's context is the only bound
    max_stop_strings: int = 16  # OpenAI allows 4; tool-calling clients send a handful more
    max_stop_string_chars: int = 256  # the longest stop string is how much text is held back
    max_stop_token_ids: int = 256
    max_logprobs: int = 20  # top-n per token; the engine computes at most 20
    # Generate streams one connection (gRPC) or one client address (HTTP) may hold open.
    max_streams_per_connection: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_stop_strings", "max_stop_string_chars",
                     "max_stop_token_ids", "max_streams_per_connection"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be at least 1, got {self.max_prompt_tokens}")
        if not 0 <= self.max_logprobs <= 20:
            raise ValueError(f"max_logprobs must be in [0, 20], got {self.max_logprobs}")

    def check_params(self, params: SamplingParams, names: FieldNames = GRPC_FIELDS) -> None:
        """Raise InvalidArgument naming the field (in the front door's words) past its limit."""
        if len(params.stop) > self.max_stop_strings:
            raise InvalidArgument(names.stop, f"{len(params.stop)} stop strings; at most "
                                              f"{self.max_stop_strings} (--max-stop-strings)")
        for i, stop in enumerate(params.stop):
            if len(stop) > self.max_stop_string_chars:
                raise InvalidArgument(f"{names.stop}[{i}]", f"{len(stop)} characters; at most "
                                      f"{self.max_stop_string_chars} (--max-stop-string-chars)")
        if len(params.stop_token_ids) > self.max_stop_token_ids:
            raise InvalidArgument(names.stop_token_ids, f"{len(params.stop_token_ids)} ids; at "
                                  f"most {self.max_stop_token_ids} (--max-stop-token-ids)")
        if params.logprobs is not None and params.logprobs > self.max_logprobs:
            raise InvalidArgument(names.logprobs, f"{params.logprobs} top logprobs asked; at "
                                  f"most {self.max_logprobs} (--max-logprobs)")

    def check_prompt_tokens(self, num_tokens: int, field: str) -> None:
        if self.max_prompt_tokens is not None and num_tokens > self.max_prompt_tokens:
            raise InvalidArgument(field, f"prompt has {num_tokens} tokens; at most "
                                         f"{self.max_prompt_tokens} (--max-prompt-tokens)")


class StreamCounter:
    """Open streams per connection (or client address), to refuse one past the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def try_open(self, peer: str) -> bool:
        count = self._open.get(peer, 0)
        if count >= self.limit:
            return False
        self._open[peer] = count + 1
        return True

    def close(self, peer: str) -> None:
        count = self._open.get(peer, 0) - 1
        if count > 0:
            self._open[peer] = count
        else:
            self._open.pop(peer, None)

    def refusal(self, peer: str) -> str:
        return (f"{self.limit} streams already open on this connection ({peer}); at most "
                f"{self.limit} (--max-streams-per-connection)")
