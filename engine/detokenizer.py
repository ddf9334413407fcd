"""Streaming text from generated token ids, and stop strings over that stream.

Both run once per generated token of every request, so each step costs O(new tokens + a small
window), never O(output so far).
"""
from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass

from engine.tokenizer import Tokenizer

# Prompt tokens decoded as context in front of the first output token, so that tokenizers whose
# decoders strip or merge leading spaces (sentencepiece) see the first output token mid-text.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's output ids into text deltas that never split a UTF-8 character.

    Invariant: the concatenation of all add_tokens() results and flush() equals
    tokenizer.decode(output ids) whenever that decode is valid UTF-8.

    Byte-level vocabularies (GPT-2 style) are handled on bytes: each id maps to its bytes, and an
    incremental UTF-8 decoder holds back the bytes of an unfinished character. Other tokenizers
    use the prefix/read offset technique: decode a short window of ids twice (with and without the
    new ones) and emit the difference once it no longer ends in an unfinished character.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._chunks: list[str] = []
        self._token_bytes = tokenizer.byte_level_token_bytes
        self._skipped_ids = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Window state for the generic path: ids[prefix_offset:read_offset] is text already
        # emitted and kept only as context; ids[read_offset:] is not emitted yet.
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    @property
    def text(self) -> str:
        return "".join(self._chunks)

    def add_tokens(self, token_ids: Sequence[int]) -> str:
        if self._token_bytes is not None:
            delta = self._add_bytes(token_ids)
        else:
            delta = self._add_window(token_ids)
        if delta:
            self._chunks.append(delta)
        return delta

    def flush(self) -> str:
        if self._token_bytes is not None:
            delta = self._utf8.decode(b"", final=True)
        else:
            delta = self._flush_window()
        if delta:
            self._chunks.append(delta)
        return delta

    # --- byte-level path --------------------------------------------------------------
    def _add_bytes(self, token_ids: Sequence[int]) -> str:
        table, skipped = self._token_bytes, self._skipped_ids
        # Ids past the tokenizer's vocabulary (a model may pad its embedding) decode to nothing,
        # as in tokenizer.decode.
        raw = b"".join(table[t] for t in token_ids if t not in skipped and t < len(table))
        return self._utf8.decode(raw)

    # --- generic window path ------------------------------------------------------------
    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special_tokens)

    def _add_window(self, token_ids: Sequence[int]) -> str:
        self._ids.extend(int(t) for t in token_ids)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        full_text = self._decode(self._prefix_offset, len(self._ids))
        # An unfinished character decodes to U+FFFD at the end; wait for the bytes that finish it.
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full_text[len(prefix_text):]

    def _flush_window(self) -> str:
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        full_text = self._decode(self._prefix_offset, len(self._ids))
        self._prefix_offset = self._read_offset = len(self._ids)
        return full_text[len(prefix_text):]


@dataclass(frozen=True)
class StopMatch:
    text: str  # text safe to emit now
    stopped: bool  # a stop string was found; nothing after it will be emitted
    stop_str: str | None  # the stop string that matched, when stopped


class StopStringMatcher:
    """Cuts a text stream at the first stop string, holding back only what could start one.

    "First" means the occurrence that is complete earliest in the stream (ties: the one that
    starts first), so the result does not depend on how the text was split into deltas.
    Invariant: everything emitted so far is a prefix of the final output, and the held-back tail
    is shorter than the longest stop string.
    """

    def __init__(self, stops: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self._stops = tuple(dict.fromkeys(stops))
        self._include_stop = include_stop_str_in_output
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""
        self._stop_str: str | None = None

    @property
    def stopped(self) -> bool:
        return self._stop_str is not None

    def feed(self, delta: str) -> StopMatch:
        if self.stopped:
            return StopMatch("", True, self._stop_str)
        if not self._stops:
            return StopMatch(delta, False, None)
        text = self._pending + delta
        match = self._first_match(text)
        if match is not None:
            start, stop = match
            self._stop_str, self._pending = stop, ""
            end = start + len(stop) if self._include_stop else start
            return StopMatch(text[:end], True, stop)
        hold = self._partial_stop_length(text)
        self._pending = text[len(text) - hold:] if hold else ""
        return StopMatch(text[: len(text) - hold], False, None)

    def flush(self) -> str:
        released, self._pending = self._pending, ""
        return "" if self.stopped else released

    def _first_match(self, text: str) -> tuple[int, str] | None:
        # The first occurrence of a given stop is both its earliest start and its earliest end.
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            start = text.find(stop)
            if start < 0:
                continue
            key = (start + len(stop), start, stop)
            if best is None or key[:2] < best[:2]:
                best = key
        return None if best is None else (best[1], best[2])

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        for length in range(min(self._max_hold, len(text)), 0, -1):
            suffix = text[-length:]
            if any(stop.startswith(suffix) for stop in self._stops):
                return length
        return 0
