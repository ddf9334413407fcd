"""Conditional disaggregation: `--disaggregation auto` against `always` and `never`, in one run.

The workload mixes short and long prompts, all uncached (random tokens), at a low and a high
request rate (Poisson arrivals). `always` prefills every prompt on the prefill worker and moves
its KV; `never` prefills every prompt on the decode worker itself, between its decode steps;
`auto` decides per request from predicted times to first token (the workers' measured step
costs, the transfer rate, the queues, and what a local prefill would cost the requests decoding
there).

All three modes run on one cluster of 1 prefill + 1 decode worker, switched between runs, in
`--rounds` rounds; each round runs every (load, mode) once, the modes in a rotated order, so
that a slow minute of this shared machine falls on every mode alike. Within a round the modes
get prompts of the same lengths with different tokens (so none finds another's prefix in the
cache) and the same arrival times. Each mode keeps its own learned path corrections. Reported
per mode and load over all rounds: TTFT p50 / p99 and time per output token (mean and p99 over
requests), as the client measures them, the decisions made, and auto's ratios per round; and
per request its arrival, path, the predictions behind the path and its times (in the JSON; the
three slowest first tokens of each mode and load are printed).

Writes bench/results/conditional_disagg.json. Run with --help for the flags.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc  # noqa: E402

from bench.grpc_load import device_description, write_report, greedy, percentile, poisson_load, summary_ms, timed_stream  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.loader import resolve_model_path  # noqa: E402
from protos.pdserve.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402
from router.cluster_backend import RoutingConfig  # noqa: E402
from router.embedded import EmbeddedCluster  # noqa: E402
from router.pools import PoolConfig  # noqa: E402
from router.routing.disaggregation import DEFAULT_STALL_WEIGHT, PathBias  # noqa: E402
from router.serve import ServeConfig, load_tokenizer  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def make_requests(args, vocab: int, count: int, length_seed: int, token_seed: int) -> list[tuple[list[int], str]]:
    """`count` prompts whose lengths follow `length_seed` and whose tokens follow `token_seed`."""
    lengths, tokens = random.Random(length_seed), random.Random(token_seed)
    requests = []
    for _ in range(count):
        tag = "long" if lengths.random() < args.long_fraction else "short"
        low, high = args.long_tokens if tag == "long" else args.short_tokens
        requests.append(([tokens.randrange(100, vocab - 100) for _ in range(lengths.randint(low, high))], tag))
    return requests


def run_rounds(args, vocab: int, modes: list[str]) -> tuple[dict, list[dict]]:
    """Every (round, load, mode) on one cluster: pooled timings per mode and load, and per round."""
    options = dict(dtype="float32", device="cpu", kv_cache_memory_gb=args.kv_cache_gb,
                   max_num_batched_tokens=args.max_num_batched_tokens)
    config = ServeConfig(engine=EngineConfig.from_options(args.model, **options),
                         pools=PoolConfig(torch_threads=args.torch_threads),
                         routing=RoutingConfig(disaggregation="auto", decode_stall_weight=args.decode_stall_weight),
                         cluster_name="bench-conditional-disagg")
    loads = [(name, rate, count) for name, rate, count in
             (("low", args.low_rate, args.low_requests), ("high", args.high_rate, args.high_requests))
             if name in args.loads]
    pooled = {mode: {name: {"timings": [], "decisions": Counter(), "requests": []} for name, _, _ in loads}
              for mode in modes}
    rounds = []
    log("starting 1 prefill + 1 decode worker")
    with EmbeddedCluster(config) as server:
        policy = server.backend.disaggregation
        biases = {mode: PathBias() for mode in modes}  # each mode's learned corrections, its own
        plans = []  # (prompt length, plan, what the policy saw) of each placement, in order
        plan = policy.plan

        def recording_plan(request, decode, prefill):
            chosen = plan(request, decode, prefill)
            seen = {"decode_running": decode.load.num_running, "decode_queued_tokens": decode.queued_prefill_tokens,
                    "prefill_queued_tokens": prefill.queued_prefill_tokens if prefill is not None else None}
            plans.append((request.prompt_len, chosen, seen))
            return chosen

        policy.plan = recording_plan

        def switch(mode: str) -> None:
            policy.mode, policy.bias = mode, biases[mode]

        async def drive(requests, rate, seed):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = pb_grpc.GenerationStub(channel)
                if rate is None:  # warm-up, one at a time
                    return [await timed_stream(stub, greedy(p, args.output_tokens), tag) for p, tag in requests]
                return await poisson_load(stub, [(greedy(p, args.output_tokens), tag) for p, tag in requests],
                                          rate, seed=seed)

        for index, mode in enumerate(modes):  # each mode's corrections see a few requests first
            switch(mode)
            asyncio.run(drive(make_requests(args, vocab, 6, args.seed + 100, args.seed + 100 + index), None, 0))
        for r in range(args.rounds):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            this_round = {}
            for load_index, (name, rate, count) in enumerate(loads):
                length_seed = args.seed + 1000 * (r + 1) + load_index
                for mode in order:
                    switch(mode)
                    requests = make_requests(args, vocab, count, length_seed, length_seed + 7919 * (modes.index(mode) + 1))
                    before = Counter(policy.decisions)
                    log(f"round {r + 1}/{args.rounds}: {mode}, {name} load, {count} requests at {rate} req/s")
                    plans.clear()
                    timings = asyncio.run(drive(requests, rate, length_seed))
                    pooled[mode][name]["requests"] += per_request(requests, timings, plans, r)
                    errors = [t.error for t in timings if t.error]
                    if errors:
                        raise RuntimeError(f"{mode}/{name}: {len(errors)} requests failed, e.g. {errors[0]}")
                    decisions = Counter(policy.decisions) - before
                    pooled[mode][name]["timings"] += timings
                    pooled[mode][name]["decisions"] += decisions
                    this_round.setdefault(mode, {})[name] = summarize(timings, dict(decisions))
                    time.sleep(args.pause_s)  # the last requests' blocks and steps settle
            rounds.append(this_round)
            if {"auto", "always", "never"} <= set(modes):
                log(f"round {r + 1}: auto / best of the others {verdicts(this_round, [n for n, _, _ in loads])}")
    results = {mode: {name: summarize(v["timings"], dict(v["decisions"])) for name, v in by_load.items()}
               for mode, by_load in pooled.items()}
    for mode, by_load in pooled.items():
        for name, v in by_load.items():
            results[mode][name]["requests"] = v["requests"]
    return results, rounds


def per_request(requests, timings, plans, round_index: int) -> list[dict]:
    """One row per request: its prompt, when it was sent, its path and predictions, its times."""
    start = min(t.started_at for t in timings)
    unmatched = list(plans)
    rows = []
    for (prompt, tag), timing in sorted(zip(requests, timings), key=lambda pair: pair[1].started_at):
        row = {"round": round_index + 1, "tag": tag, "prompt_tokens": len(prompt),
               "sent_s": round(timing.started_at - start, 3), "ttft_ms": round(1000 * timing.ttft_s, 1),
               "tpot_ms": round(1000 * timing.tpot_s, 1), "output_tokens": timing.tokens}
        match = next((p for p in unmatched if p[0] == len(prompt)), None)  # placements come in arrival order
        if match is not None:
            unmatched.remove(match)
            _, chosen, seen = match
            row.update(path="remote" if chosen.remote else "local",
                       predicted_local_ms=round(1000 * chosen.local_ttft_s, 1),
                       predicted_remote_ms=round(1000 * chosen.remote_ttft_s, 1) if chosen.remote_ttft_s != float("inf") else None,
                       correction_ms=round(1000 * chosen.bias_s, 1), stall_ms=round(1000 * chosen.stall_s, 1),
                       arrivals_stall_ms=round(1000 * chosen.arrivals_stall_s, 1), **seen)
        rows.append(row)
    return rows


def summarize(timings, decisions: dict) -> dict:
    tpots = [t.tpot_s for t in timings if t.tokens > 1]
    return {"ttft_ms": summary_ms([t.ttft_s for t in timings]),
            "tpot_ms": {"mean": round(1000 * sum(tpots) / len(tpots), 1),
                        "p99": round(1000 * percentile(tpots, 99), 1)},
            "ttft_long_p50_ms": round(1000 * percentile([t.ttft_s for t in timings if t.tag == "long"], 50), 1),
            "ttft_short_p50_ms": round(1000 * percentile([t.ttft_s for t in timings if t.tag == "short"], 50), 1),
            "decisions": decisions}


def verdicts(results: dict, loads: list[str]) -> dict:
    """auto / best of the other two, per load and metric (<= 1.0: auto is at least as good)."""
    out = {}
    for load in loads:
        row = {}
        for metric, pick in (("ttft_p50", lambda r: r["ttft_ms"]["p50"]), ("ttft_p99", lambda r: r["ttft_ms"]["p99"]),
                             ("tpot_mean", lambda r: r["tpot_ms"]["mean"])):
            best = min(pick(results[m][load]) for m in ("always", "never") if m in results)
            row[metric] = round(pick(results["auto"][load]) / best, 3) if best else None
        out[load] = row
    return out


METRICS = ("ttft_p50", "ttft_p99", "tpot_mean")


def ratios_of(rows_by_mode: dict[str, list[dict]]) -> list[float]:
    """auto / the better of always and never, per metric, over these request rows."""
    def metrics(rows):
        tpots = [r["tpot_ms"] for r in rows if r.get("output_tokens", 2) > 1]
        ttfts = [r["ttft_ms"] for r in rows]
        return percentile(ttfts, 50), percentile(ttfts, 99), sum(tpots) / len(tpots)
    by_mode = {mode: metrics(rows) for mode, rows in rows_by_mode.items()}
    return [by_mode["auto"][k] / min(by_mode["always"][k], by_mode["never"][k]) for k in range(len(METRICS))]


def paired_intervals(results: dict, loads: list[str], samples: int = 2000, seed: int = 0) -> dict:
    """How far auto's ratios could move by chance: a paired bootstrap over requests.

    Within a round the three modes get prompts of the same lengths at the same arrival times, so
    the k-th request of a round is one workload unit seen three ways. Resampling units (with
    replacement, the three modes' requests together) keeps what they share, the prompt length and
    what arrived around it, and varies what the machine did to each. Reported per load and metric:
    the ratio, its 5th-95th percentile over the resamples, and the share of resamples in which
    auto is at least as good (ratio <= 1).
    """
    rng = random.Random(seed)
    out = {}
    for load in loads:
        by_round = {mode: {} for mode in ("auto", "always", "never")}
        for mode, rounds in by_round.items():
            for row in results[mode][load]["requests"]:  # in arrival order within each round
                rounds.setdefault(row["round"], []).append(row)
        units = []
        for rnd, auto_rows in by_round["auto"].items():
            counts = {m: len(by_round[m].get(rnd, ())) for m in by_round}
            if len(set(counts.values())) > 1:
                raise RuntimeError(f"round {rnd}: the modes have different numbers of requests {counts}, cannot pair them")
            for k, row in enumerate(auto_rows):
                others = [by_round[m][rnd][k] for m in ("always", "never")]
                if any(other["prompt_tokens"] != row["prompt_tokens"] for other in others):
                    raise RuntimeError(f"round {rnd}, request {k + 1}: the modes' prompts differ, cannot pair them")
                units.append({"auto": row, "always": others[0], "never": others[1]})

        def ratios(sample):
            return ratios_of({mode: [unit[mode] for unit in sample] for mode in ("auto", "always", "never")})
        point = ratios(units)
        resampled = [ratios([rng.choice(units) for _ in units]) for _ in range(samples)]
        row = {}
        for k, metric in enumerate(METRICS):
            values = sorted(r[k] for r in resampled)
            row[metric] = {"ratio": round(point[k], 3),
                           "p5": round(percentile(values, 5), 3), "p95": round(percentile(values, 95), 3),
                           "share_at_most_1": round(sum(v <= 1.0 for v in values) / samples, 3)}
        out[load] = {"pairs": len(units), **row}
    return out


def parse_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(",")
    return int(low), int(high or low)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo, an HF model directory or a .gguf file")
    parser.add_argument("--short-tokens", type=parse_range, default=(8, 48), help="short prompt lengths, LOW,HIGH (default 8,48)")
    parser.add_argument("--long-tokens", type=parse_range, default=(384, 768), help="long prompt lengths (default 384,768)")
    parser.add_argument("--long-fraction", type=float, default=0.3, help="share of long prompts (default 0.3)")
    parser.add_argument("--output-tokens", type=int, default=32, help="new tokens per request (default 32)")
    parser.add_argument("--low-rate", type=float, default=0.3, help="requests/s of the low load (default 0.3)")
    parser.add_argument("--high-rate", type=float, default=1.0, help="requests/s of the high load (default 1.0)")
    parser.add_argument("--low-requests", type=int, default=12, help="requests at low load (default 12)")
    parser.add_argument("--high-requests", type=int, default=30, help="requests at high load (default 30)")
    parser.add_argument("--modes", default="auto,always,never", help="modes to run (default auto,always,never)")
    parser.add_argument("--loads", default="low,high", help="loads to run, of low and high (default low,high)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds; each runs every load in every mode once (default 3)")
    parser.add_argument("--pause-s", type=float, default=2.0, help="seconds of rest between runs (default 2)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--kv-cache-gb", type=float, default=0.5, help="KV cache per worker in GiB (default 0.5)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512,
                        help="tokens per engine step, prefill chunks included (default 512)")
    parser.add_argument("--decode-stall-weight", type=float, default=DEFAULT_STALL_WEIGHT,
                        help="auto's weight of a decode stall against time to first token, as `pdserve "
                             f"serve --decode-stall-weight` (default {DEFAULT_STALL_WEIGHT:g})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the workload and the arrivals")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "conditional_disagg.json"),
                        help="where to write the JSON results")
    parser.add_argument("--reanalyze", metavar="JSON",
                        help="run nothing: read an earlier report, add the paired bootstrap, print it")
    args = parser.parse_args(argv)
    if args.reanalyze:
        with open(args.reanalyze) as f:
            report = json.load(f)
        report["auto_vs_best_of_others_paired_bootstrap"] = paired_intervals(
            report["results"], report["workload"]["loads"], seed=report["workload"]["seed"])
        print_table(report)
        return 0
    args.loads = args.loads.split(",")
    if not args.loads or not set(args.loads) <= {"low", "high"}:
        parser.error(f"--loads takes low, high or both, got {','.join(args.loads)}")

    args.model = resolve_model_path(args.model)
    vocab = load_tokenizer(args.model).vocab_size
    modes = args.modes.split(",")
    results, rounds = run_rounds(args, vocab, modes)
    report = {"workload": {k: getattr(args, k) for k in ("short_tokens", "long_tokens", "long_fraction", "output_tokens",
                                                         "low_rate", "high_rate", "low_requests", "high_requests", "loads",
                                                         "rounds", "torch_threads", "decode_stall_weight", "seed")},
              "model": os.path.basename(args.model),
              "device": device_description(),
              "results": results,
              "rounds": rounds}
    if {"auto", "always", "never"} <= set(modes):
        report["auto_vs_best_of_others"] = verdicts(results, args.loads)
        report["auto_vs_best_of_others_per_round"] = [verdicts(r, args.loads) for r in rounds]
        report["auto_vs_best_of_others_paired_bootstrap"] = paired_intervals(results, args.loads, seed=args.seed)
    print_table(report)
    write_report(args.out, report, log)
    return 0


def print_table(report: dict) -> None:
    w = report["workload"]
    print(f"\nprompts {w['short_tokens']} / {w['long_tokens']} tokens ({w['long_fraction']:.0%} long), "
          f"{w['output_tokens']} new tokens, 1 prefill + 1 decode worker, {w['torch_threads']} thread(s) each, "
          f"auto's stall weight {w['decode_stall_weight']:g}, "
          f"{w['rounds']} round(s) pooled")
    print(f"{'load':<6}{'mode':<8}{'TTFT p50':>10}{'p99':>9}{'short p50':>11}{'long p50':>10}"
          f"{'TPOT mean':>11}{'p99':>8}  decisions")
    loads = [load for load in ("low", "high") if load in w["loads"]]
    for load in loads:
        for mode, result in report["results"].items():
            r = result[load]
            print(f"{load:<6}{mode:<8}{r['ttft_ms']['p50']:>8.0f}ms{r['ttft_ms']['p99']:>7.0f}ms"
                  f"{r['ttft_short_p50_ms']:>9.0f}ms{r['ttft_long_p50_ms']:>8.0f}ms{r['tpot_ms']['mean']:>9.1f}ms"
                  f"{r['tpot_ms']['p99']:>6.1f}ms  {r['decisions']}")
    if "auto_vs_best_of_others" in report:
        print("auto / best of always and never (<= 1.00 means auto is at least as good):")
        for load, row in report["auto_vs_best_of_others"].items():
            print(f"  {load:<5} " + "  ".join(f"{k} {v:.2f}" for k, v in row.items()))
        for index, per_round in enumerate(report["auto_vs_best_of_others_per_round"]):
            print(f"  round {index + 1}: " + "; ".join(
                f"{load} " + " ".join(f"{v:.2f}" for v in row.values()) for load, row in per_round.items()))
        print("  paired bootstrap over requests (ratio [5th-95th percentile], share of resamples <= 1):")
        for load, row in report["auto_vs_best_of_others_paired_bootstrap"].items():
            print(f"  {load:<5} " + "  ".join(
                f"{m} {row[m]['ratio']:.3f} [{row[m]['p5']:.3f}-{row[m]['p95']:.3f}] {row[m]['share_at_most_1']:.0%}"
                for m in METRICS) + f"  ({row['pairs']} pairs)")
    print("slowest first tokens per mode and load (round, prompt, path, predicted local / remote, "
          "stall of the running / arriving requests, what the decode worker ran then):")
    for load in loads:
        for mode, result in report["results"].items():
            for row in sorted(result[load]["requests"], key=lambda row: -row["ttft_ms"])[:3]:
                print(f"  {load:<5}{mode:<7} r{row['round']} {row['tag']:<5} {row['prompt_tokens']:>4} tok "
                      f"at {row['sent_s']:>6.1f}s  TTFT {row['ttft_ms']:>6.0f}ms  {row.get('path', '?'):<6} "
                      f"{row.get('predicted_local_ms', 0):>6.0f} / {row.get('predicted_remote_ms') or 0:>6.0f}ms  "
                      f"stall {row.get('stall_ms', 0):>5.0f} + {row.get('arrivals_stall_ms', 0):>4.0f}ms  running {row.get('decode_running', '?')}, "
                      f"queued {row.get('decode_queued_tokens', '?')} / {row.get('prefill_queued_tokens', '?')} tok")


if __name__ == "__main__":
    sys.exit(main())
