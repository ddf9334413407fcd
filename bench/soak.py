"""A soak run: minutes of random load with random cancels and deadlines while random workers are
killed (kill -9 of the actor's process). At the end every pool must be back to its baseline (all
KV blocks free, no request left on any worker, nothing queued or held in the router) and no
request may have hung.

Each client loops: a random prompt and output length; with some probability it cancels the
stream after a few tokens, or gives it a deadline too short to finish. Every other stream must
finish with all its tokens (ignore_eos), whatever was killed meanwhile.

Writes bench/results/soak.json. Run with --help for the flags.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc  # noqa: E402

from bench.grpc_load import greedy, write_report  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.loader import resolve_model_path  # noqa: E402
from protos.pdserve.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402
from router.embedded import EmbeddedCluster, workers_idle  # noqa: E402
from router.pools import PoolConfig  # noqa: E402
from router.serve import ServeConfig, load_tokenizer  # noqa: E402


def log(msg: str) -> None:
    print(f"[soak] {msg}", file=sys.stderr, flush=True)


class Tally:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.examples: dict[str, str] = {}
        self.longest_s = 0.0
        self.lock = threading.Lock()

    def add(self, outcome: str, seconds: float, detail: str = "") -> None:
        with self.lock:
            self.counts[outcome] = self.counts.get(outcome, 0) + 1
            self.longest_s = max(self.longest_s, seconds)
            if detail and outcome not in self.examples:
                self.examples[outcome] = detail


async def client(stub, rng: random.Random, vocab: int, stop: threading.Event, tally: Tally, args) -> None:
    while not stop.is_set():
        prompt = [rng.randrange(100, vocab - 100) for _ in range(rng.randint(4, args.max_prompt))]
        max_tokens = rng.randint(4, args.max_output)
        roll = rng.random()
        kind = "cancel" if roll < args.cancel_share else "deadline" if roll < args.cancel_share + args.deadline_share else "full"
        deadline = rng.uniform(0.2, 1.0) if kind == "deadline" else args.request_deadline
        began = time.monotonic()
        call = stub.Generate(greedy(prompt, max_tokens), timeout=deadline)
        tokens = 0
        try:
            async for response in call:
                tokens += len(response.token_ids)
                if kind == "cancel" and tokens >= 2:
                    call.cancel()
                    break
            if kind == "cancel" and tokens >= 2:
                tally.add("cancelled", time.monotonic() - began)
            elif tokens == max_tokens:
                tally.add("completed", time.monotonic() - began)
            else:
                tally.add("short", time.monotonic() - began, f"{tokens} of {max_tokens} tokens")
        except grpc.aio.AioRpcError as err:
            code = err.code()
            if code == grpc.StatusCode.CANCELLED and kind == "cancel":
                tally.add("cancelled", time.monotonic() - began)
            elif code == grpc.StatusCode.DEADLINE_EXCEEDED and kind == "deadline":
                tally.add("deadline", time.monotonic() - began)
            elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                tally.add("hung", time.monotonic() - began, err.details())
            else:
                tally.add(f"error {code.name}", time.monotonic() - began, err.details())


async def load(port: int, vocab: int, stop: threading.Event, tally: Tally, args) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GenerationStub(channel)
        await asyncio.gather(*(client(stub, random.Random(args.seed + i), vocab, stop, tally, args)
                               for i in range(args.clients)))


def killer(server: EmbeddedCluster, stop: threading.Event, args, kills: list) -> None:
    rng = random.Random(args.seed)
    while not stop.wait(args.kill_every):
        workers = [w for w in server.backend.view.workers.values() if server.backend.view.routable(w)]
        if len(workers) < len(server.backend.view.workers):
            continue  # one is still coming back: kill one at a time
        victim = rng.choice(workers)
        try:
            pid = server.run(victim.actor.pid.remote(), timeout=10)
            os.kill(pid, signal.SIGKILL)
            kills.append({"worker": victim.worker_id, "at_s": round(time.monotonic() - args.started, 1)})
            log(f"killed {victim.worker_id} (pid {pid})")
        except Exception as err:  # it died on its own meanwhile
            log(f"could not kill {victim.worker_id}: {err}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo, an HF model directory or a .gguf file")
    parser.add_argument("--minutes", type=float, default=3.0, help="how long the load runs (default 3)")
    parser.add_argument("--clients", type=int, default=12, help="concurrent clients (default 12)")
    parser.add_argument("--kill-every", type=float, default=25.0, help="seconds between kills (default 25)")
    parser.add_argument("--cancel-share", type=float, default=0.15, help="streams cancelled mid-way (default 0.15)")
    parser.add_argument("--deadline-share", type=float, default=0.1, help="streams with a short deadline (default 0.1)")
    parser.add_argument("--max-prompt", type=int, default=96, help="longest prompt in tokens (default 96)")
    parser.add_argument("--max-output", type=int, default=48, help="longest output in tokens (default 48)")
    parser.add_argument("--request-deadline", type=float, default=180.0,
                        help="deadline of the other streams: past it a stream counts as hung (default 180)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "soak.json"),
                        help="where to write the JSON results")
    args = parser.parse_args(argv)

    model = resolve_model_path(args.model)
    vocab = load_tokenizer(model).vocab_size
    config = ServeConfig(engine=EngineConfig.from_options(model, dtype="float32", device="cpu",
                                                          kv_cache_memory_gb=0.25, max_num_batched_tokens=256),
                         pools=PoolConfig(num_prefill_workers=2, num_decode_workers=2, torch_threads=1),
                         cluster_name="soak")
    tally, kills = Tally(), []
    with EmbeddedCluster(config) as server:
        stop = threading.Event()
        args.started = time.monotonic()
        murderer = threading.Thread(target=killer, args=(server, stop, args, kills), daemon=True)
        murderer.start()
        loader = threading.Thread(target=lambda: asyncio.run(load(server.port, vocab, stop, tally, args)))
        loader.start()
        time.sleep(args.minutes * 60)
        stop.set()
        loader.join(args.request_deadline + 60)
        hung_clients = loader.is_alive()
        murderer.join(5)
        began = time.monotonic()
        deadline = began + 120
        while True:  # every killed worker back, every pool at its baseline
            back = all(server.backend.view.routable(w) for w in server.backend.view.workers.values())
            stats = server.backend.stats()
            if back and workers_idle(server.run(server.backend.pools.stats())) and stats["streams"] == 0 \
                    and stats["queued"] == 0:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        final = server.run(server.backend.pools.stats())
        report = {"minutes": args.minutes, "clients": args.clients, "model": os.path.basename(model),
                  "outcomes": tally.counts, "examples": tally.examples, "longest_stream_s": round(tally.longest_s, 1),
                  "kills": kills, "resumed": server.backend.stats()["resumed"],
                  "baseline_after_s": round(time.monotonic() - began, 1), "at_baseline": workers_idle(final)
                  and server.backend.stats()["streams"] == 0, "clients_hung": hung_clients}
    print(json.dumps(report, indent=2))
    write_report(args.out, report, log)
    bad = {k: v for k, v in tally.counts.items() if k not in ("completed", "cancelled", "deadline")}
    return 0 if report["at_baseline"] and not bad and not hung_clients else 1


if __name__ == "__main__":
    sys.exit(main())
