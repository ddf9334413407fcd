"""OpenAI response bodies: whole completions, streamed chunks, usage and logprobs.

One Answer per request accumulates the text, tokens and logprobs of the chunks the relay hands
it, and builds either the whole response (stream false) or the next chunk (stream true).
"""
from __future__ import annotations

import time
from typing import Any

from router.http.protocol import ApiRequest
from router.relay import FinalStats
from router.streaming import StreamChunk


class Answer:
    def __init__(self, api: ApiRequest, request_id: str, model: str, tokenizer: Any) -> None:
        self.api = api
        self.request_id = request_id
        self.model = model
        self.tokenizer = tokenizer
        self.created = int(time.time())
        self.text: list[str] = []
        self.logprobs: list[Any] = []  # one entry per token, in the endpoint's own shape
        self._text_offset = 0  # completions logprobs: where each token's text starts
        self._sent_role = False

    @property
    def object_name(self) -> str:
        if self.api.chat:
            return "chat.completion.chunk" if self.api.stream else "chat.completion"
        return "text_completion"

    # --- accumulating ------------------------------------------------------------------
    def add(self, chunk: StreamChunk) -> None:
        self.text.append(chunk.text)
        if self.api.logprobs is not None and chunk.logprobs is not None:
            self.logprobs.extend(self._token_logprobs(t, top) for t, top in zip(chunk.token_ids, chunk.logprobs))

    def _token_logprobs(self, token_id: int, top: dict[int, float]) -> Any:
        ranked = sorted(top.items(), key=lambda item: (-item[1], item[0]))[: self.api.logprobs]
        chosen = top.get(token_id)
        token = self._token_text(token_id)
        if self.api.chat:
            return {"token": token, "logprob": chosen, "bytes": self._token_bytes(token_id, token),
                    "top_logprobs": [{"token": (t := self._token_text(i)), "logprob": lp,
                                      "bytes": self._token_bytes(i, t)} for i, lp in ranked]}
        offset, self._text_offset = self._text_offset, self._text_offset + len(token)
        return token, chosen, {self._token_text(i): lp for i, lp in ranked or [(token_id, chosen)]}, offset

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _token_bytes(self, token_id: int, text: str) -> list[int]:
        table = getattr(self.tokenizer, "byte_level_token_bytes", None)
        if table is not None and 0 <= token_id < len(table):
            return list(table[token_id])
        return list(text.encode())

    def _logprobs_body(self, entries: list[Any]) -> dict | None:
        if self.api.logprobs is None:
            return None
        if self.api.chat:
            return {"content": entries}
        return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [e[2] for e in entries], "text_offset": [e[3] for e in entries]}

    # --- bodies ------------------------------------------------------------------------
    def whole(self, finish_reason: str | None, final: FinalStats) -> dict:
        """The non-streamed response."""
        text = "".join(self.text)
        choice: dict[str, Any] = {"index": 0, "logprobs": self._logprobs_body(self.logprobs),
                                  "finish_reason": finish_reason}
        if self.api.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return self._envelope([choice], usage(final))

    def worth_sending(self, chunk: StreamChunk, final: FinalStats | None) -> bool:
        """Whether a streamed chunk would tell the client anything (text held back does not)."""
        return bool(final is not None or chunk.text or self.logprobs or (self.api.chat and not self._sent_role))

    def chunk(self, chunk: StreamChunk, final: FinalStats | None) -> dict:
        """The streamed chunk for one relay chunk (its logprobs are taken from what add() kept)."""
        entries, self.logprobs = self.logprobs, []
        choice: dict[str, Any] = {"index": 0, "logprobs": self._logprobs_body(entries),
                                  "finish_reason": chunk.finish_reason if final is not None else None}
        if self.api.chat:
            delta: dict[str, Any] = {"content": chunk.text} if chunk.text or not final else {}
            if not self._sent_role:
                delta = {"role": "assistant", **delta}
                self._sent_role = True
            choice["delta"] = delta
        else:
            choice["text"] = chunk.text
        return self._envelope([choice], None, stream=True)

    def usage_chunk(self, final: FinalStats) -> dict:
        """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
        return self._envelope([], usage(final), stream=True)

    def _envelope(self, choices: list[dict], usage_body: dict | None, stream: bool = False) -> dict:
        body = {"id": self.request_id, "object": self.object_name, "created": self.created,
                "model": self.model, "choices": choices}
        if not stream or self.api.include_usage:
            body["usage"] = usage_body  # streamed chunks carry "usage": null until the last
        return body


def usage(final: FinalStats) -> dict:
    body = {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens,
            "total_tokens": final.prompt_tokens + final.completion_tokens}
    if final.cached_prompt_tokens:
        body["prompt_tokens_details"] = {"cached_tokens": final.cached_prompt_tokens}
    return body
