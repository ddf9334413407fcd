"""KV-aware routing against round robin on a prefix-heavy workload, in one run.

The workload: long system prompts shared by many users, each request one user's short question
after one of them; there are more distinct system prompts than one worker's KV cache holds, but
not more than the pool's caches hold together. So a router that sends each prefix to the workers
that already cache it (kv_aware: the longest cached prefix per worker, from the block index the
workers publish) finds most of every prompt cached, while one that spreads requests evenly
(round_robin) makes every worker cycle through every prefix and evict it before it comes back.

The same requests, in the same order, at the same concurrency, go to a fresh cluster of 2 prefill
+ 2 decode workers per policy. Reported per policy: the prefix-cache hit rate over every worker's
admissions (prompt tokens found cached / prompt tokens looked up), the hit rate the clients saw on
the decode side (usage.cached_prompt_tokens), and TTFT mean / p50 / p99 as the client measures it.

Writes bench/results/prefix_routing.json. Run with --help for the flags.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc  # noqa: E402

from bench.grpc_load import device_description, write_report, closed_loop, greedy, summary_ms  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.loader import resolve_model_path  # noqa: E402
from protos.pdserve.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402
from router.cluster_backend import RoutingConfig  # noqa: E402
from router.embedded import EmbeddedCluster  # noqa: E402
from router.pools import PoolConfig  # noqa: E402
from router.serve import ServeConfig, load_tokenizer  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def workload(args, vocab_size: int) -> list[tuple[list[int], str]]:
    """(prompt, prefix label) per request: a shared system prompt, then one user's question."""
    rng = random.Random(args.seed)
    prefixes = [[rng.randrange(100, vocab_size - 100) for _ in range(args.prefix_tokens)]
                for _ in range(args.prefixes)]
    requests = []
    for user in range(args.requests):
        prefix = rng.randrange(args.prefixes)
        question = [rng.randrange(100, vocab_size - 100) for _ in range(rng.randint(16, 32))]
        requests.append((prefixes[prefix] + question, f"prefix-{prefix}"))
    return requests


def run_policy(args, policy: str, requests) -> dict:
    options = dict(dtype="float32", device="cpu", kv_cache_memory_gb=args.kv_cache_gb,
                   max_num_batched_tokens=512)
    config = ServeConfig(
        engine=EngineConfig.from_options(args.model, **options),
        pools=PoolConfig(num_prefill_workers=2, num_decode_workers=2, torch_threads=args.torch_threads),
        routing=RoutingConfig(policy=policy, disaggregation=args.disaggregation),
        cluster_name=f"bench-{policy.replace('_', '-')}")
    log(f"{policy}: starting 2 prefill + 2 decode workers")
    with EmbeddedCluster(config) as server:
        num_blocks = server.backend.pools.decode[0].record.num_blocks
        block_size = server.backend.pools.decode[0].block_size
        log(f"{policy}: {len(requests)} requests, {args.concurrency} at a time "
            f"(KV cache: {num_blocks} blocks = {num_blocks * block_size} tokens per worker)")

        async def drive():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = pb_grpc.GenerationStub(channel)
                return await closed_loop(stub, [(greedy(p, args.output_tokens), tag) for p, tag in requests],
                                         args.concurrency)
        began = time.perf_counter()
        timings = asyncio.run(drive())
        elapsed = time.perf_counter() - began
        stats = server.run(server.backend.pools.stats())
        decisions = server.backend.stats()["disaggregation"]
    errors = [t.error for t in timings if t.error]
    if errors:
        raise RuntimeError(f"{policy}: {len(errors)} requests failed, e.g. {errors[0]}")
    workers = [s if isinstance(s, dict) else s.__dict__ for s in stats["prefill"] + stats["decode"]]
    hits = sum(w["prefix_cache_hits"] for w in workers)
    queries = sum(w["prefix_cache_queries"] for w in workers)
    prompt_tokens = sum(len(p) for p, _ in requests)
    return {
        "policy": policy, "requests": len(requests), "elapsed_s": round(elapsed, 1),
        "prefix_hit_rate": round(hits / queries, 3) if queries else 0.0,
        "decode_cached_fraction": round(sum(t.cached_prompt_tokens for t in timings) / prompt_tokens, 3),
        "ttft_ms": summary_ms([t.ttft_s for t in timings]),
        "tpot_ms": summary_ms([t.tpot_s for t in timings]),
        "disaggregation": decisions,
        "kv_blocks_per_worker": num_blocks,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo, an HF model directory or a .gguf file")
    parser.add_argument("--prefixes", type=int, default=8, help="distinct system prompts (default 8)")
    parser.add_argument("--prefix-tokens", type=int, default=1024, help="tokens per system prompt (default 1024)")
    parser.add_argument("--requests", type=int, default=384, help="requests per policy (default 384)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    parser.add_argument("--output-tokens", type=int, default=8, help="new tokens per request (default 8)")
    parser.add_argument("--kv-cache-gb", type=float, default=0.2,
                        help="KV cache per worker in GiB: sized so one worker holds fewer than all "
                             "the prefixes (default 0.2: about 4600 tokens of the demo model, 4 "
                             "of the 8 default prefixes and the requests running)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--disaggregation", default="auto", choices=["auto", "always", "never"],
                        help="the cluster's disaggregation policy for both runs (default auto)")
    parser.add_argument("--policies", default="kv_aware,round_robin",
                        help="comma-separated routing policies, each on a fresh cluster (default "
                             "kv_aware,round_robin)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the workload")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "prefix_routing.json"),
                        help="where to write the JSON results")
    args = parser.parse_args(argv)

    args.model = resolve_model_path(args.model)
    requests = workload(args, load_tokenizer(args.model).vocab_size)
    results = [run_policy(args, policy, requests) for policy in args.policies.split(",")]
    report = {"workload": {k: getattr(args, k) for k in ("prefixes", "prefix_tokens", "requests", "concurrency",
                                                         "output_tokens", "kv_cache_gb", "torch_threads",
                                                         "disaggregation", "seed")},
              "model": os.path.basename(args.model),
              "device": device_description(),
              "results": results}
    base = next((r for r in results if r["policy"] == "round_robin"), None)
    for r in results:
        if base is not None and r["ttft_ms"]["mean"]:
            r["mean_ttft_vs_round_robin"] = round(base["ttft_ms"]["mean"] / r["ttft_ms"]["mean"], 2)
    print_table(report)
    write_report(args.out, report, log)
    return 0


def print_table(report: dict) -> None:
    w = report["workload"]
    print(f"\n{w['requests']} requests over {w['prefixes']} system prompts of {w['prefix_tokens']} tokens, "
          f"{w['concurrency']} in flight, 2 prefill + 2 decode workers ({report['results'][0]['kv_blocks_per_worker']} "
          f"KV blocks each), disaggregation {w['disaggregation']}")
    print(f"{'policy':<14}{'hit rate':>10}{'decode cached':>15}{'TTFT mean':>11}{'p50':>9}{'p99':>9}"
          f"{'TPOT p50':>10}{'rr/this':>9}")
    for r in report["results"]:
        ttft = r["ttft_ms"]
        print(f"{r['policy']:<14}{r['prefix_hit_rate']:>10.1%}{r['decode_cached_fraction']:>15.1%}"
              f"{ttft['mean']:>9.0f}ms{ttft['p50']:>7.0f}ms{ttft['p99']:>7.0f}ms{r['tpot_ms']['p50']:>8.1f}ms"
              f"{r.get('mean_ttft_vs_round_robin', 1.0):>8.2f}x")


if __name__ == "__main__":
    sys.exit(main())
