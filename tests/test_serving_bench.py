"""The serving benchmark: its statistics, workloads, arrivals and SSE client, then `pdserve bench`
against a real cluster over HTTP."""
from __future__ import annotations

import asyncio
import json
import math
import os
import random
import statistics
import subprocess

import pytest
from aiohttp import web

from serving_bench.client import RequestOutcome, RequestSettings, send_request
from serving_bench.load import LoadShape, arrival_times, run_load
from serving_bench.metrics import SLO, LatencyStats, percentile, summarize
from serving_bench.prompts import TokenPrompts, WordPrompts
from serving_bench.workloads import BenchRequest, RandomLengths, SharedPrefix, ShareGPTLike, build_workload, sweep_workloads


def outcome(ttft: float, e2e: float, tokens: int, itl=(), error=None) -> RequestOutcome:
    return RequestOutcome(0, ttft_s=ttft, e2e_s=e2e, itl_s=list(itl), prompt_tokens=10,
                          output_tokens=tokens, error=error)


# --- statistics ---------------------------------------------------------------------------------

def test_percentiles_interpolate_between_ranks():
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) == 0.0
    stats = LatencyStats.of([0.1, 0.2, 0.3, 0.4])
    assert stats.mean == pytest.approx(250.0) and stats.p50 == pytest.approx(250.0) and stats.count == 4


def test_tpot_excludes_the_first_token_and_itl_pools_every_gap():
    a = outcome(ttft=0.5, e2e=1.4, tokens=10, itl=[0.1] * 9)
    b = outcome(ttft=0.2, e2e=0.6, tokens=3, itl=[0.3, 0.1])
    assert a.tpot_s == pytest.approx(0.1)
    assert b.tpot_s == pytest.approx(0.2)
    assert outcome(0.2, 0.2, 1).tpot_s is None
    s = summarize([a, b], duration_s=2.0)
    assert s.itl_ms.count == 11
    assert s.itl_ms.mean == pytest.approx(1000 * 1.3 / 11)
    assert s.tpot_ms.mean == pytest.approx(150.0)
    assert s.ttft_ms.p50 == pytest.approx(350.0)
    assert s.output_token_throughput == pytest.approx(6.5)
    assert s.total_input_tokens == 20 and s.request_throughput == pytest.approx(1.0)


def test_goodput_counts_completed_requests_meeting_every_slo():
    slo = SLO.parse("ttft=0.5,tpot=0.05")
    assert slo == SLO(ttft_s=0.5, tpot_s=0.05)
    outcomes = [
        outcome(0.4, 0.4 + 9 * 0.04, 10),             # meets both
        outcome(0.6, 0.6 + 9 * 0.01, 10),             # TTFT too slow
        outcome(0.1, 0.1 + 9 * 0.06, 10),             # TPOT too slow
        outcome(0.5, 0.5, 1),                          # one token: no TPOT, TTFT on the bound
        outcome(0.1, 0.2, 2, error="HTTP 503: no worker"),  # failed: never good
    ]
    s = summarize(outcomes, duration_s=4.0, slo=slo)
    assert s.good_requests == 2
    assert s.goodput == pytest.approx(0.5)
    assert s.completed == 4 and s.failed == 1
    assert s.errors == {"HTTP 503: no worker": 1}
    assert summarize(outcomes, 4.0).goodput is None


@pytest.mark.parametrize("text", ["ttft", "ttft=0", "foo=1", "ttft=-1"])
def test_bad_slo_is_refused(text):
    with pytest.raises(ValueError):
        SLO.parse(text)


# --- workloads ----------------------------------------------------------------------------------

def test_random_workload_lengths_stay_in_bounds_and_follow_the_seed():
    spec = RandomLengths(input_len=40, output_len=10, range_ratio=0.5)
    requests = build_workload(spec, 200, WordPrompts(), seed=3)
    assert all(20 <= r.prompt_len <= 60 and 5 <= r.output_len <= 15 for r in requests)
    assert all(len(r.prompt.split()) == r.prompt_len for r in requests)
    assert len({r.prompt_len for r in requests}) > 10  # a spread, not one length
    assert build_workload(spec, 200, WordPrompts(), seed=3) == requests
    assert build_workload(spec, 200, WordPrompts(), seed=4) != requests
    fixed = build_workload(RandomLengths(16, 4, 0.0), 20, WordPrompts(), seed=0)
    assert {(r.prompt_len, r.output_len) for r in fixed} == {(16, 4)}


def test_shared_prefix_requests_share_a_few_system_prompts():
    spec = SharedPrefix(groups=3, prefix_len=50, question_len=(5, 8), output_len=4)
    requests = build_workload(spec, 60, WordPrompts(), seed=1)
    prefixes = {r.prefix_group: r.system_prompt for r in requests}
    assert sorted(prefixes) == [0, 1, 2]
    assert len(set(prefixes.values())) == 3
    assert all(r.system_prompt == prefixes[r.prefix_group] for r in requests)
    assert all(len(r.system_prompt.split()) == 50 for r in requests)
    assert len({r.prompt for r in requests}) > 50  # each user asks their own question
    assert all(r.prompt_len == 50 + len(r.prompt.split()) and 5 <= len(r.prompt.split()) <= 8 for r in requests)
    assert build_workload(spec, 60, WordPrompts(), seed=1) == requests


def test_each_run_of_a_sweep_gets_fresh_prompts_of_the_same_distribution():
    spec = RandomLengths(input_len=30, output_len=5, range_ratio=0.2)
    first, second = sweep_workloads(spec, 50, WordPrompts(), seed=9, runs=2)
    assert first == build_workload(spec, 50, WordPrompts(), seed=9)
    assert not {r.prompt for r in first} & {r.prompt for r in second}
    assert all(24 <= r.prompt_len <= 36 for r in first + second)


def test_sharegpt_like_lengths_are_lognormal_and_clipped():
    spec = ShareGPTLike(input_median=100, output_median=200, sigma=1.0, max_input=1024, max_output=512)
    requests = build_workload(spec, 2000, LengthOnly(), seed=0)
    inputs = [r.prompt_len for r in requests]
    outputs = [r.output_len for r in requests]
    assert 4 <= min(inputs) and max(inputs) <= 1024 and 1 <= min(outputs) and max(outputs) <= 512
    assert 85 <= statistics.median(inputs) <= 115
    assert 170 <= statistics.median(outputs) <= 230
    assert max(outputs) == 512  # the long tail reaches the clip
    assert 0.85 <= statistics.stdev(math.log(v) for v in inputs) <= 1.1


class LengthOnly:
    """A prompt maker that skips building text, for length statistics over many requests."""
    unit = "tokens"

    def text(self, rng: random.Random, length: int) -> str:
        return ""

    def length(self, text: str) -> int:
        return 0


def test_token_prompts_have_exact_lengths_in_the_models_tokens(tiny_checkpoints):
    from router.serve import load_tokenizer

    tokenizer = load_tokenizer(tiny_checkpoints["llama3"])
    maker = TokenPrompts(tokenizer)
    requests = build_workload(SharedPrefix(2, 40, (3, 9), 4), 20, maker, seed=0)
    for r in requests:
        assert maker.length(r.prompt) == r.prompt_len - 40
        assert maker.length(r.system_prompt) == 40
        assert maker.length(r.system_prompt + r.prompt) == r.prompt_len


# --- arrivals -----------------------------------------------------------------------------------

def test_poisson_arrivals_have_exponential_gaps_of_mean_one_over_rate():
    times = arrival_times(20000, rate=4.0, seed=7)
    assert times[0] == 0.0 and times == sorted(times)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.05)  # exponential: sd == mean
    # P(gap > mean) = 1/e for an exponential distribution.
    assert sum(g > 0.25 for g in gaps) / len(gaps) == pytest.approx(math.exp(-1), abs=0.02)
    # Counts per second are Poisson: variance equals the mean.
    counts = [0] * int(times[-1])
    for t in times:
        if int(t) < len(counts):
            counts[int(t)] += 1
    assert statistics.fmean(counts) == pytest.approx(4.0, rel=0.05)
    assert statistics.pvariance(counts) == pytest.approx(4.0, rel=0.15)
    assert arrival_times(100, 4.0, seed=7) == times[:100]
    assert arrival_times(5, math.inf, seed=0) == [0.0] * 5


def test_burstiness_changes_the_spread_not_the_rate():
    bursty = [b - a for a, b in zip(*(lambda t: (t, t[1:]))(arrival_times(20000, 2.0, 1, burstiness=0.25)))]
    steady = [b - a for a, b in zip(*(lambda t: (t, t[1:]))(arrival_times(20000, 2.0, 1, burstiness=4.0)))]
    assert statistics.fmean(bursty) == pytest.approx(0.5, rel=0.05)
    assert statistics.fmean(steady) == pytest.approx(0.5, rel=0.05)
    assert statistics.stdev(bursty) > 2 * 0.5 > 4 * statistics.stdev(steady)


# --- the SSE client against a scripted HTTP server ----------------------------------------------

def sse(payload) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


async def scripted_completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if body["prompt"].startswith("refuse"):
        return web.json_response({"error": {"message": "prompt is too long", "type": "invalid_request_error",
                                            "param": "prompt"}}, status=400)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(body["max_tokens"]):
        await asyncio.sleep(0.02)
        await response.write(sse({"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}))
    if body["prompt"].startswith("truncate"):
        return response
    await response.write(sse({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}))
    await response.write(sse({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": body["max_tokens"]}}))
    await response.write(sse("[DONE]"))
    return response


async def with_scripted_server(fn):
    app = web.Application()
    app.router.add_post("/v1/completions", scripted_completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        return await fn(RequestSettings(f"http://127.0.0.1:{port}", "m"))
    finally:
        await runner.cleanup()


def test_client_times_each_chunk_and_reports_failures_with_their_error():
    requests = [BenchRequest(0, "hello", 1, 5), BenchRequest(1, "refuse me", 2, 5),
                BenchRequest(2, "truncate me", 2, 3), BenchRequest(3, "again", 1, 4)]

    async def drive(settings):
        return await run_load(settings, requests, LoadShape(max_concurrency=2), seed=0, show_progress=False)
    outcomes, duration = asyncio.run(with_scripted_server(drive))
    ok, refused, truncated, ok2 = outcomes
    assert [o.index for o in outcomes] == [0, 1, 2, 3]
    assert ok.ok and ok.output_tokens == 5 and ok.prompt_tokens == 7 and ok.finish_reason == "length"
    assert len(ok.itl_s) == 4 and all(gap >= 0.015 for gap in ok.itl_s)
    assert 0.015 <= ok.ttft_s < ok.e2e_s
    assert ok.tpot_s == pytest.approx((ok.e2e_s - ok.ttft_s) / 4)
    assert refused.error == "HTTP 400: prompt is too long"
    assert truncated.error == "stream ended without data: [DONE]"
    assert ok2.ok and ok2.output_tokens == 4
    s = summarize(outcomes, duration)
    assert (s.completed, s.failed) == (2, 2) and sum(s.errors.values()) == 2


def test_connection_refused_is_a_failed_request():
    async def drive():
        import aiohttp

        async with aiohttp.ClientSession() as session:
            return await send_request(session, RequestSettings("http://127.0.0.1:9", "m"),
                                      BenchRequest(0, "x", 1, 1), 0.0)
    result = asyncio.run(drive())
    assert not result.ok and "Connect" in result.error


def test_bench_command_reports_failed_requests_and_exits_nonzero(tmp_path, capsys):
    import threading

    from serving_bench.cli import main

    async def models(request):
        return web.json_response({"data": [{"id": "scripted"}]})

    async def refuse_every_third(request):
        refuse_every_third.calls += 1
        if refuse_every_third.calls % 3 == 0:
            return web.json_response({"error": {"message": "queue is full", "type": "rate_limit"}}, status=429)
        return await scripted_completions(request)
    refuse_every_third.calls = 0

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", refuse_every_third)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        out = tmp_path / "r.json"
        status = main(["--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "9", "--max-concurrency", "1",
                       "--random-input-len", "4", "--random-output-len", "3", "--no-progress",
                       "--result-json", str(out)])
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    assert status == 1
    summary = json.loads(out.read_text())["runs"][0]["summary"]
    assert (summary["completed"], summary["failed"]) == (6, 3)
    assert summary["errors"] == {"HTTP 429: queue is full": 3}
    printed = capsys.readouterr().out
    assert "Failed requests:" in printed and "FAILED x3: HTTP 429: queue is full" in printed


def test_every_bench_flag_is_explained():
    from serving_bench.cli import build_parser

    actions = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(actions) > 25
    assert all(a.help and len(a.help) > 15 for a in actions), [a.dest for a in actions if not a.help]


# --- end to end: `pdserve bench` against `pdserve serve --http-port` -----------------------------

@pytest.mark.slow
def test_pdserve_bench_against_a_real_cluster(tiny_checkpoints, tmp_path):
    from serving_bench.server import served_cluster
    from tests.cluster_helpers import pdserve_command

    flags = ["--model", tiny_checkpoints["llama3"], "--torch-threads", "1", "--cluster-name", f"bench-e2e-{os.getpid()}"]
    with served_cluster(flags, str(tmp_path / "serve.log"), timeout_s=300) as cluster:
        out = tmp_path / "bench.json"
        bench = subprocess.run(
            pdserve_command() + ["bench", "--base-url", cluster.base_url, "--num-prompts", "12",
                                 "--sweep-rates", "20,inf", "--max-concurrency", "6",
                                 "--workload", "shared-prefix", "--prefix-groups", "2", "--prefix-len", "24",
                                 "--question-len", "4", "8", "--prefix-output-len", "6",
                                 "--tokenizer", tiny_checkpoints["llama3"], "--endpoint", "chat",
                                 "--slo", "ttft=30,tpot=10", "--result-json", str(out),
                                 "--plot-dir", str(tmp_path / "plots")],
            capture_output=True, text=True, timeout=300)
    assert bench.returncode == 0, bench.stdout + bench.stderr
    report = json.loads(out.read_text())
    assert len(report["runs"]) == 2
    for run in report["runs"]:
        s = run["summary"]
        assert s["completed"] == 12 and s["failed"] == 0 and s["errors"] == {}
        assert s["good_requests"] == 12 and s["goodput"] > 0
        assert s["total_output_tokens"] == 12 * 6
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert set(s[key]) >= {"mean", "p50", "p90", "p99"} and s[key]["p50"] > 0
        assert all(r["prompt_tokens"] > 24 and r["output_tokens"] == 6 for r in run["requests"])
    assert "Completed requests:" in bench.stdout and "done" in bench.stderr
    assert sorted(os.listdir(tmp_path / "plots")) == ["bench_goodput.png", "bench_latency_cdf.png"]
