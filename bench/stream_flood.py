"""1000 concurrent streams through one router: every one completes or gets a clear
RESOURCE_EXHAUSTED, none is lost, and the router's memory, file descriptors and threads come
back to where they were.

Starts `pdserve serve` (the router, with its private Ray and Redis) as a process of its own,
so its resident memory and descriptors can be read from outside, and opens the streams from
this process over as many gRPC channels as asked. A stream is "lost" when it ends without a
finish reason and without an error, or does not end within the deadline.

Writes bench/results/stream_flood.json. Run with --help for the flags.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc  # noqa: E402
import psutil  # noqa: E402

from bench.grpc_load import greedy, write_report  # noqa: E402
from cluster_state.server import free_port  # noqa: E402
from protos.pdserve.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402
from tests.cluster_helpers import router_process_command, wait_for_serving  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def router_figures(pid: int) -> dict:
    process = psutil.Process(pid)
    return {"rss_mb": round(process.memory_info().rss / 2**20, 1), "fds": process.num_fds(),
            "threads": process.num_threads()}


async def one_stream(stub, request, deadline_s: float) -> str:
    """'completed', 'refused' (RESOURCE_EXHAUSTED), 'lost', or 'error: ...'."""
    finished = False
    try:
        async for response in stub.Generate(request, timeout=deadline_s):
            finished = finished or response.finish_reason != 0
        return "completed" if finished else "lost"
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return "refused"
        if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "lost"
        return f"error: {err.code().name}: {err.details()}"


async def flood(port: int, count: int, channels: int, output_tokens: int, vocab: int, deadline_s: float) -> dict:
    rng = random.Random(0)
    opened = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(channels)]
    stubs = [pb_grpc.GenerationStub(c) for c in opened]
    try:
        requests = [greedy([rng.randrange(100, vocab - 100) for _ in range(rng.randint(4, 24))], output_tokens)
                    for _ in range(count)]
        began = time.perf_counter()
        outcomes = await asyncio.gather(*(one_stream(stubs[i % channels], r, deadline_s)
                                          for i, r in enumerate(requests)))
        elapsed = time.perf_counter() - began
    finally:
        await asyncio.gather(*(c.close() for c in opened))
    tally: dict[str, int] = {}
    for outcome in outcomes:
        key = outcome if not outcome.startswith("error") else "error"
        tally[key] = tally.get(key, 0) + 1
    errors = sorted({o for o in outcomes if o.startswith("error")})[:5]
    return {"elapsed_s": round(elapsed, 1), "outcomes": tally, "error_examples": errors}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo, an HF model directory or a .gguf file")
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streams (default 1000)")
    parser.add_argument("--channels", type=int, default=20, help="gRPC channels they share (default 20)")
    parser.add_argument("--output-tokens", type=int, default=8, help="new tokens per stream (default 8)")
    parser.add_argument("--rounds", type=int, default=2, help="floods, one after another (default 2)")
    parser.add_argument("--deadline", type=float, default=600.0, help="per-stream deadline in s (default 600)")
    parser.add_argument("--max-queued-requests", type=int, default=1024, help="the router's queue bound")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "stream_flood.json"),
                        help="where to write the JSON results")
    args = parser.parse_args(argv)

    from engine.loader import resolve_model_path
    from router.serve import load_tokenizer

    model = resolve_model_path(args.model)
    vocab = load_tokenizer(model).vocab_size
    port = free_port()
    log_path = os.path.join(os.path.dirname(args.out), "stream_flood.router.log")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(log_path, "w") as router_log:
        router = subprocess.Popen(router_process_command() + [
            "serve", "--model", model, "--grpc-port", str(port), "--http-port", "0", "--host", "127.0.0.1",
            "--max-queued-requests", str(args.max_queued_requests)], stdout=router_log, stderr=subprocess.STDOUT)
        try:
            log("starting pdserve serve")
            wait_for_serving(f"127.0.0.1:{port}", router, 600, log_path)
            asyncio.run(flood(port, 16, 1, args.output_tokens, vocab, args.deadline))  # warm-up
            time.sleep(2)
            before = router_figures(router.pid)
            rounds = []
            for i in range(args.rounds):
                log(f"round {i + 1}: {args.streams} concurrent streams")
                rounds.append(asyncio.run(flood(port, args.streams, args.channels, args.output_tokens, vocab,
                                                args.deadline)))
                time.sleep(3)  # let the router settle
                rounds[-1]["router_after"] = router_figures(router.pid)
                log(f"round {i + 1}: {rounds[-1]['outcomes']} in {rounds[-1]['elapsed_s']} s, router "
                    f"{rounds[-1]['router_after']}")
        finally:
            router.send_signal(signal.SIGINT)
            try:
                router.wait(120)
            except subprocess.TimeoutExpired:
                router.kill()
    report = {"streams": args.streams, "output_tokens": args.output_tokens, "model": os.path.basename(model),
              "router_before": before, "rounds": rounds}
    print(json.dumps(report, indent=2))
    write_report(args.out, report, log)
    lost = sum(r["outcomes"].get("lost", 0) + r["outcomes"].get("error", 0) for r in rounds)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
