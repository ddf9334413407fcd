"""The flags of `pdserve bench`, apart from the code that runs it, so `pdserve --help` stays light."""
from __future__ import annotations

import argparse
import math

ENDPOINTS = ("chat", "completions")

DESCRIPTION = """\
Drive a running OpenAI-compatible server (pdserve serve --http-port, vLLM, ...) over HTTP and
measure, per request, TTFT (time to the first streamed text), TPOT ((E2E - TTFT) / (output
tokens - 1)), ITL (every gap between streamed chunks) and E2E; print mean / p50 / p90 / p99 of
each, request and token throughput, completed and failed counts and goodput under --slo. Every
request streams (SSE) with stream_options.include_usage; token counts are the server's. Failed
requests are counted and reported with their error; the exit status is 1 when any failed.
"""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a request rate must be positive (or inf), got {text}")
    return value


def rate_list(text: str) -> list[float]:
    return [rate(item) for item in text.split(",") if item.strip()]


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="the server's root URL, without /v1 (default http://127.0.0.1:8000)")
    g.add_argument("--model", default=None,
                   help="the model name sent in each request (default: the first of GET /v1/models)")
    g.add_argument("--endpoint", default="completions", choices=ENDPOINTS,
                   help="completions (POST /v1/completions, prompt text) or chat (POST "
                        "/v1/chat/completions, a system message for shared prefixes and a user "
                        "message) (default completions)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    g.add_argument("--allow-eos", action="store_true",
                   help="let requests stop at EOS (by default ignore_eos is sent, so each request "
                        "generates exactly its output length)")
    g.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds one request may take before it counts as failed (default 600)")

    g = parser.add_argument_group("load")
    g.add_argument("--num-prompts", type=positive_int, default=100, help="requests per run (default 100)")
    g.add_argument("--request-rate", type=rate, default=math.inf,
                   help="requests per second, with Poisson arrivals; inf sends all at once (default inf)")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="shape of the gamma-distributed gaps between arrivals: 1 is Poisson, below 1 "
                        "burstier, above 1 more even (default 1)")
    g.add_argument("--max-concurrency", type=positive_int, default=None,
                   help="requests in flight at most; with the default rate inf this is a closed "
                        "loop of N clients (default: no cap)")
    g.add_argument("--sweep-rates", type=rate_list, default=None, metavar="R1,R2,...",
                   help="one run per request rate, same requests each time, instead of --request-rate")
    g.add_argument("--seed", type=int, default=0, help="seed of the workload and of the arrivals (default 0)")
    g.add_argument("--no-progress", action="store_true", help="no progress line on stderr")

    g = parser.add_argument_group("workload")
    g.add_argument("--workload", default="random", choices=["random", "shared-prefix", "sharegpt"],
                   help="random: uniform lengths; shared-prefix: a few long system prompts shared by "
                        "many users; sharegpt: a ShareGPT-like log-normal length distribution made "
                        "here, nothing downloaded (default random)")
    g.add_argument("--tokenizer", default=None,
                   help="build prompts of exact token lengths with this model's tokenizer: demo, an "
                        "HF model directory or a .gguf file (default: common English words, one token "
                        "each in most vocabularies)")
    g.add_argument("--random-input-len", type=positive_int, default=128, help="random: prompt length (default 128)")
    g.add_argument("--random-output-len", type=positive_int, default=32, help="random: output tokens (default 32)")
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="random: lengths uniform in [L*(1-r), L*(1+r)] (default 0: exactly L)")
    g.add_argument("--prefix-groups", type=positive_int, default=4,
                   help="shared-prefix: distinct system prompts (default 4)")
    g.add_argument("--prefix-len", type=positive_int, default=512,
                   help="shared-prefix: length of each system prompt (default 512)")
    g.add_argument("--question-len", type=int, nargs=2, default=(16, 64), metavar=("MIN", "MAX"),
                   help="shared-prefix: length range of each user's question (default 16 64)")
    g.add_argument("--prefix-output-len", type=positive_int, default=32,
                   help="shared-prefix: output tokens (default 32)")
    g.add_argument("--sharegpt-input-median", type=float, default=100.0,
                   help="sharegpt: median prompt length (default 100; mean ~165 at sigma 1)")
    g.add_argument("--sharegpt-output-median", type=float, default=200.0,
                   help="sharegpt: median output length (default 200; mean ~330 at sigma 1)")
    g.add_argument("--sharegpt-sigma", type=float, default=1.0,
                   help="sharegpt: sigma of both log-normal distributions (default 1.0)")
    g.add_argument("--sharegpt-max-input", type=positive_int, default=1024,
                   help="sharegpt: prompt lengths clipped to this (default 1024)")
    g.add_argument("--sharegpt-max-output", type=positive_int, default=512,
                   help="sharegpt: output lengths clipped to this (default 512)")

    g = parser.add_argument_group("results")
    g.add_argument("--slo", default=None, metavar="ttft=S,tpot=S,e2e=S",
                   help="latency targets in seconds for goodput, e.g. ttft=0.5,tpot=0.05: the "
                        "completed requests per second that met every target given")
    g.add_argument("--result-json", default=None, metavar="PATH",
                   help="write the settings, every run's summary and every request's timings here")
    g.add_argument("--plot-dir", default=None, metavar="DIR",
                   help="write PNG plots here (needs matplotlib, the `bench` extra): latency CDFs "
                        "of every run, and goodput against request rate for a sweep")
    g.add_argument("--plot-prefix", default=None,
                   help="file name prefix of the plots (default: the --result-json name, else 'serving')")
