"""One streamed request over the OpenAI HTTP API, timed per SSE chunk.

TTFT is from sending the request to the first chunk that carries text; ITL are the gaps between
successive chunks that carry text (a chunk may carry several tokens); E2E is from sending to the
end of the stream. Token counts are the server's, from the final usage chunk
(`stream_options.include_usage`). A request fails on any HTTP error status, an error event in the
stream, a stream that ends without `data: [DONE]`, or a transport error; the error is kept.
"""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp

from serving_bench.workloads import BenchRequest

ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class RequestSettings:
    base_url: str
    model: str
    endpoint: str = "completions"  # completions | chat
    temperature: float = 0.0
    ignore_eos: bool = True  # so each request generates exactly its output_len tokens

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + ENDPOINT_PATHS[self.endpoint]


@dataclass
class RequestOutcome:
    index: int
    sent_at_s: float = 0.0  # since the run began
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    chunks: int = 0
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None for a one-token answer."""
        if self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def request_body(settings: RequestSettings, request: BenchRequest) -> dict:
    body = {"model": settings.model, "stream": True, "stream_options": {"include_usage": True},
            "temperature": settings.temperature, "ignore_eos": settings.ignore_eos}
    if settings.endpoint == "chat":
        messages = [{"role": "system", "content": request.system_prompt}] if request.system_prompt else []
        body["messages"] = messages + [{"role": "user", "content": request.prompt}]
        body["max_completion_tokens"] = request.output_len
    else:
        body["prompt"] = request.system_prompt + request.prompt
        body["max_tokens"] = request.output_len
    return body


def chunk_text(chunk: dict) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        return choice["delta"].get("content") or ""
    return choice.get("text") or ""


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The `data:` payloads of an SSE stream, one per event (multi-line data joined by newlines)."""
    data: list[str] = []
    async for raw in response.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
    if data:
        yield "\n".join(data)


def error_message(status: int, body: str) -> str:
    try:
        err = json.loads(body).get("error", {})
        message = err.get("message", body) if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        message = body
    return f"HTTP {status}: {message.strip()[:300]}"


async def send_request(session: aiohttp.ClientSession, settings: RequestSettings, request: BenchRequest,
                       run_start: float) -> RequestOutcome:
    outcome = RequestOutcome(request.index)
    start = time.perf_counter()
    outcome.sent_at_s = start - run_start
    last = None
    done = False
    try:
        async with session.post(settings.url, json=request_body(settings, request)) as response:
            if response.status != 200:
                outcome.error = error_message(response.status, await response.text())
                return outcome
            async for data in sse_events(response):
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    outcome.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    return outcome
                if chunk_text(chunk):
                    now = time.perf_counter()
                    if last is None:
                        outcome.ttft_s = now - start
                    else:
                        outcome.itl_s.append(now - last)
                    last = now
                    outcome.chunks += 1
                for choice in chunk.get("choices") or []:
                    outcome.finish_reason = choice.get("finish_reason") or outcome.finish_reason
                usage = chunk.get("usage")
                if usage:
                    outcome.prompt_tokens = usage.get("prompt_tokens", 0)
                    outcome.output_tokens = usage.get("completion_tokens", 0)
    except Exception as err:  # recorded with the request; the run goes on
        outcome.error = f"{type(err).__name__}: {err}"
        return outcome
    outcome.e2e_s = time.perf_counter() - start
    if not done:
        outcome.error = "stream ended without data: [DONE]"
    elif outcome.output_tokens == 0:
        outcome.error = "no usage in the stream (stream_options.include_usage ignored)"
    elif last is None:  # every token decoded to nothing visible (e.g. part of a character)
        outcome.ttft_s = outcome.e2e_s
    return outcome


async def first_model(session: aiohttp.ClientSession, base_url: str) -> str:
    """The first model `GET /v1/models` lists, for runs that name none."""
    async with session.get(base_url.rstrip("/") + "/v1/models") as response:
        body = await response.text()
        if response.status != 200:
            raise RuntimeError(f"GET /v1/models: {error_message(response.status, body)}")
        return json.loads(body)["data"][0]["id"]
