"""Prometheus metrics of one router: its requests, and the cluster as the workers report it.

Request metrics (latency histograms, token and finish counters) are fed by router.relay for every
request of either front door. Cluster metrics are read at scrape time from what the router already
holds: each worker's latest load report (published to Redis, labels `worker` and `role`), the
admission queue and the disaggregation policy's decisions. Names follow vLLM's, with a `pdserve:`
prefix, so dashboards built for vLLM need only the prefix changed.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from router.relay import RequestObservation

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets close to vLLM's: TTFT and queue time from a millisecond to minutes, token gaps finer.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                  0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0)


class ServingMetrics:
    """A registry of its own per router (two routers in one process never mix their figures)."""

    def __init__(self, backend: Any = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.time_to_first_token = Histogram(
            "pdserve:time_to_first_token_seconds", "Time from arrival to the first output token.",
            registry=r, buckets=_TTFT_BUCKETS)
        self.inter_token_latency = Histogram(
            "pdserve:inter_token_latency_seconds", "Time between successive output tokens of a request.",
            registry=r, buckets=_TOKEN_BUCKETS)
        self.time_per_output_token = Histogram(
            "pdserve:time_per_output_token_seconds",
            "Per request: time after the first token divided by the tokens after it.",
            registry=r, buckets=_TOKEN_BUCKETS)
        self.e2e_latency = Histogram(
            "pdserve:e2e_request_latency_seconds", "Time from arrival to the last token.",
            registry=r, buckets=_E2E_BUCKETS)
        self.queue_time = Histogram(
            "pdserve:request_queue_time_seconds",
            "Time a request waited in the admission queue until a decode worker admitted it.",
            registry=r, buckets=_TTFT_BUCKETS)
        self.prompt_tokens = Counter(
            "pdserve:prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter(
            "pdserve:generation_tokens", "Tokens generated for finished requests.", registry=r)
        self.request_success = Counter(
            "pdserve:request_success", "Requests that finished, by finish reason.",
            ["finished_reason"], registry=r)
        self.request_failure = Counter(
            "pdserve:request_failure", "Requests that reached the backend and did not finish, by why.",
            ["reason"], registry=r)
        if backend is not None:
            self.attach(backend)

    def attach(self, backend: Any) -> None:
        """Read the cluster's figures from this backend at scrape time, and its queue times."""
        self.registry.register(ClusterCollector(backend))
        observers = getattr(backend, "queue_time_observers", None)
        if observers is not None:
            observers.append(self.queue_time.observe)

    def observe(self, request: RequestObservation) -> None:
        """One request that reached the backend (router.relay calls this as it ends)."""
        if request.finish_reason is None:
            self.request_failure.labels(reason=request.failure or "unknown").inc()
            return
        self.request_success.labels(finished_reason=request.finish_reason).inc()
        self.prompt_tokens.inc(request.prompt_tokens)
        self.generation_tokens.inc(request.completion_tokens)
        self.e2e_latency.observe(request.e2e_s)
        if request.time_to_first_token_s is not None:
            self.time_to_first_token.observe(request.time_to_first_token_s)
        for gap in request.inter_token_s:
            self.inter_token_latency.observe(gap)
        if request.inter_token_s:
            self.time_per_output_token.observe(sum(request.inter_token_s) / len(request.inter_token_s))

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class ClusterCollector(Collector):
    """Gauges and counters of the workers (from their load reports) and of the router's queue."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def collect(self) -> Iterator[Any]:
        view = getattr(self.backend, "view", None)
        workers = sorted(view.workers.values(), key=lambda w: w.worker_id) if view is not None else []
        yield from _worker_gauges(workers)
        yield from _worker_counters(workers)
        queue, streams = getattr(self.backend, "queue", None), getattr(self.backend, "streams", None)
        if queue is not None:
            waiting = GaugeMetricFamily("pdserve:router_queue_length",
                                        "Requests waiting in this router's admission queue.")
            waiting.add_metric([], len(queue))
            yield waiting
        if streams is not None:
            in_flight = GaugeMetricFamily("pdserve:router_requests_in_flight",
                                          "Requests this router is queueing or streaming now.")
            in_flight.add_metric([], len(streams))
            yield in_flight
        disaggregation = getattr(self.backend, "disaggregation", None)
        if disaggregation is not None:
            decisions = CounterMetricFamily(
                "pdserve:disaggregation_decisions",
                "Where requests were prefilled (remote: a prefill worker; local: the decode worker), "
                "and why.", labels=["path", "reason"])
            for key, count in sorted(disaggregation.decisions.items()):
                path, reason = key.split(":", 1)
                decisions.add_metric([path, reason], count)
            yield decisions


def _worker_gauges(workers: list) -> Iterator[GaugeMetricFamily]:
    labels = ["worker", "role"]
    running = GaugeMetricFamily("pdserve:num_requests_running",
                                "Requests in the worker's running batch.", labels=labels)
    waiting = GaugeMetricFamily("pdserve:num_requests_waiting",
                                "Requests admitted by the worker and not running yet (queued, or "
                                "waiting for their KV).", labels=labels)
    usage = GaugeMetricFamily("pdserve:kv_cache_usage_perc",
                              "Fraction of the worker's KV cache blocks in use (1 = full).", labels=labels)
    for w in workers:
        key = [w.worker_id, w.role]
        load = w.load
        running.add_metric(key, load.num_running)
        waiting.add_metric(key, load.num_waiting + load.num_waiting_for_kv)
        usage.add_metric(key, 1.0 - load.num_free_blocks / load.num_blocks if load.num_blocks else 0.0)
    return iter((running, waiting, usage))


def _worker_counters(workers: list) -> Iterator[CounterMetricFamily]:
    labels = ["worker", "role"]
    queries = CounterMetricFamily("pdserve:prefix_cache_queries",
                                  "Prompt tokens looked up in the worker's prefix cache.", labels=labels)
    hits = CounterMetricFamily("pdserve:prefix_cache_hits",
                               "Prompt tokens found in the worker's prefix cache.", labels=labels)
    transfer_labels = labels + ["backend"]
    moved = CounterMetricFamily("pdserve:kv_transfer_bytes",
                                "KV bytes pushed (prefill) or received (decode), per transfer backend.",
                                labels=transfer_labels)
    seconds = CounterMetricFamily("pdserve:kv_transfer_seconds",
                                  "Time spent moving KV payload, per transfer backend.", labels=transfer_labels)
    transfers = CounterMetricFamily("pdserve:kv_transfers", "KV transfers that completed.",
                                    labels=transfer_labels)
    failures = CounterMetricFamily("pdserve:kv_transfer_failures", "KV transfers or pushes that failed.",
                                   labels=transfer_labels)
    for w in workers:
        key = [w.worker_id, w.role]
        queries.add_metric(key, w.load.prefix_cache_queries)
        hits.add_metric(key, w.load.prefix_cache_hits)
        for backend, figures in sorted(w.load.kv_transfer.items()):
            moved.add_metric(key + [backend], figures.get("bytes", 0))
            seconds.add_metric(key + [backend], figures.get("seconds", 0.0))
            transfers.add_metric(key + [backend], figures.get("transfers", 0))
            failures.add_metric(key + [backend], figures.get("failures", 0))
    return iter((queries, hits, moved, seconds, transfers, failures))
