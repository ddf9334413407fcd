"""Timed streams over gRPC for the serving benchmarks: one stream's TTFT, TPOT, inter-token gaps
and end-to-end time as the client sees them, and open-loop (Poisson) or closed-loop load.

TTFT is from sending the request to the first token received; TPOT is the time from the first
to the last token over the tokens after the first; ITL are the gaps between token arrivals.
"""
from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field

from protos.pdserve.v1 import generation_pb2 as pb
from protos.pdserve.v1 import generation_pb2_grpc as pb_grpc


@dataclass
class StreamTiming:
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    e2e_s: float = 0.0
    tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    cached_prompt_tokens: int = 0
    error: str | None = None
    tag: str = ""  # the workload's label for this request (e.g. "short" / "long")
    started_at: float = 0.0  # time.perf_counter() when the request was sent


def greedy(prompt: list[int], max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling_params=pb.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


async def timed_stream(stub: pb_grpc.GenerationStub, request: pb.GenerateRequest, tag: str = "") -> StreamTiming:
    timing = StreamTiming(tag=tag)
    start = timing.started_at = time.perf_counter()
    first = last = None
    try:
        async for response in stub.Generate(request):
            if response.token_ids:
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    timing.itl_s.append(now - last)
                last = now
                timing.tokens += len(response.token_ids)
            if response.HasField("usage"):
                timing.cached_prompt_tokens = response.usage.cached_prompt_tokens
    except Exception as err:  # recorded, the benchmark goes on
        timing.error = f"{type(err).__name__}: {err}"
        return timing
    timing.e2e_s = time.perf_counter() - start
    timing.ttft_s = (first or start) - start
    timing.tpot_s = (last - first) / (timing.tokens - 1) if timing.tokens > 1 and first else 0.0
    return timing


async def poisson_load(stub, requests: list[tuple[pb.GenerateRequest, str]], rate: float,
                       seed: int = 0) -> list[StreamTiming]:
    """Send the requests at exponential inter-arrival times of mean 1/rate (open loop)."""
    rng = random.Random(seed)
    tasks = []
    for request, tag in requests:
        tasks.append(asyncio.ensure_future(timed_stream(stub, request, tag)))
        await asyncio.sleep(rng.expovariate(rate))
    return list(await asyncio.gather(*tasks))


async def closed_loop(stub, requests: list[tuple[pb.GenerateRequest, str]], concurrency: int) -> list[StreamTiming]:
    """At most `concurrency` requests in flight; each finished one starts the next."""
    queue = list(enumerate(requests))
    results: list[StreamTiming | None] = [None] * len(requests)

    async def client():
        while queue:
            index, (request, tag) = queue.pop(0)
            results[index] = await timed_stream(stub, request, tag)
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def summary_ms(values: list[float]) -> dict:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    return {"mean": round(1000 * statistics.fmean(values), 1), "p50": round(1000 * percentile(values, 50), 1),
            "p90": round(1000 * percentile(values, 90), 1), "p99": round(1000 * percentile(values, 99), 1)}


def device_description() -> str:
    import os
    import platform

    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def write_report(path: str, report: dict, log) -> None:
    """The JSON of a run, next to the others in bench/results/."""
    import json
    import os

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    log(f"wrote {path}")
