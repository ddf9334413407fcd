"""Sending a workload: open-loop arrivals at a request rate (Poisson, or gamma with burstiness),
optionally capped at a number of requests in flight, with a progress line on stderr."""
from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from dataclasses import dataclass

import aiohttp

from serving_bench.client import RequestOutcome, RequestSettings, send_request
from serving_bench.workloads import BenchRequest


@dataclass(frozen=True)
class LoadShape:
    request_rate: float = math.inf  # requests / s; inf sends every request at once
    max_concurrency: int | None = None  # requests in flight at most; None is no cap
    burstiness: float = 1.0  # gamma shape of the gaps: 1 is Poisson, < 1 burstier, > 1 steadier

    def label(self) -> str:
        rate = "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g}"
        return f"rate {rate}" + (f", concurrency {self.max_concurrency}" if self.max_concurrency else "")


def arrival_times(n: int, rate: float, seed: int, burstiness: float = 1.0) -> list[float]:
    """Send times in seconds from the start: the first at 0, then gaps drawn from a gamma
    distribution of mean 1/rate and shape `burstiness` (exponential, i.e. Poisson arrivals, at 1)."""
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0 or burstiness <= 0:
        raise ValueError("the request rate and burstiness must be positive")
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return times


class Progress:
    """`[bench] rate 2: 37/100 done, 1 failed, 12 in flight, 15.2 s` on stderr, redrawn in place
    on a terminal, else a line every few seconds."""

    def __init__(self, total: int, label: str, stream=sys.stderr) -> None:
        self.total, self.label, self.stream = total, label, stream
        self.tty = getattr(stream, "isatty", lambda: False)()
        self.started = self.done = self.failed = 0
        self.began = time.perf_counter()

    def line(self) -> str:
        return (f"[bench] {self.label}: {self.done}/{self.total} done, {self.failed} failed, "
                f"{self.started - self.done} in flight, {time.perf_counter() - self.began:.1f} s")

    def draw(self, final: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    async def follow(self) -> None:
        while True:
            await asyncio.sleep(0.5 if self.tty else 5.0)
            self.draw()


async def run_load(settings: RequestSettings, requests: list[BenchRequest], shape: LoadShape, seed: int,
                   request_timeout_s: float = 600.0, show_progress: bool = True) -> tuple[list[RequestOutcome], float]:
    """Every request's outcome (in workload order) and the run's wall time in seconds."""
    times = arrival_times(len(requests), shape.request_rate, seed, shape.burstiness)
    limit = asyncio.Semaphore(shape.max_concurrency) if shape.max_concurrency else None
    progress = Progress(len(requests), shape.label())
    # No connection cap of aiohttp's own (100 by default): the load shape is the only limit.
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=request_timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()

        async def one(request: BenchRequest) -> RequestOutcome:
            if limit is None:
                return await tracked(request)
            async with limit:
                return await tracked(request)

        async def tracked(request: BenchRequest) -> RequestOutcome:
            progress.started += 1
            outcome = await send_request(session, settings, request, start)
            progress.done += 1
            progress.failed += not outcome.ok
            return outcome

        ticker = asyncio.ensure_future(progress.follow()) if show_progress else None
        tasks = []
        for request, at in zip(requests, times):
            delay = at - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(request)))
        outcomes = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
        if ticker is not None:
            ticker.cancel()
            progress.draw(final=True)
    return outcomes, duration
