"""Per-run statistics: latency percentiles, throughput and goodput under SLOs.

Conventions (those of `vllm bench serve`): TPOT of a request is (E2E - TTFT) / (output tokens - 1);
ITL pools every inter-chunk gap of every request; throughput counts completed requests and the
server's token counts over the run's wall time; goodput is the completed requests that met every
SLO, per second of that same wall time.
"""
from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from serving_bench.client import RequestOutcome

SLO_KEYS = ("ttft", "tpot", "e2e")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks; 0.0 for no values."""
    return float(np.percentile(values, q)) if len(values) else 0.0


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds."""
    mean: float
    p50: float
    p90: float
    p99: float
    std: float
    count: int

    @classmethod
    def of(cls, seconds: list[float]) -> LatencyStats:
        if not seconds:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0)
        ms = [1000 * s for s in seconds]
        return cls(statistics.fmean(ms), percentile(ms, 50), percentile(ms, 90), percentile(ms, 99),
                   statistics.pstdev(ms), len(ms))


@dataclass(frozen=True)
class SLO:
    """Latency targets in seconds; None is no target. A request is good when it completed and
    met every target given."""
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> SLO | None:
        """'ttft=0.5,tpot=0.05' (seconds) -> SLO; None or '' -> None."""
        if not text:
            return None
        targets = {}
        for item in text.split(","):
            key, sep, value = item.partition("=")
            key = key.strip().lower()
            if not sep or key not in SLO_KEYS:
                raise ValueError(f"SLO items are {'/'.join(SLO_KEYS)}=SECONDS, got {item!r}")
            targets[f"{key}_s"] = float(value)
            if targets[f"{key}_s"] <= 0:
                raise ValueError(f"SLO {key} must be positive, got {value}")
        return cls(**targets)

    def met_by(self, outcome: RequestOutcome) -> bool:
        if not outcome.ok:
            return False
        tpot = outcome.tpot_s
        return ((self.ttft_s is None or outcome.ttft_s <= self.ttft_s)
                and (self.tpot_s is None or tpot is None or tpot <= self.tpot_s)
                and (self.e2e_s is None or outcome.e2e_s <= self.e2e_s))


@dataclass(frozen=True)
class BenchSummary:
    completed: int
    failed: int
    duration_s: float
    request_throughput: float  # completed requests / s
    input_token_throughput: float
    output_token_throughput: float
    total_token_throughput: float
    total_input_tokens: int
    total_output_tokens: int
    ttft_ms: LatencyStats
    tpot_ms: LatencyStats
    itl_ms: LatencyStats
    e2e_ms: LatencyStats
    slo: dict | None = None
    good_requests: int | None = None
    goodput: float | None = None  # good requests / s
    errors: dict[str, int] = field(default_factory=dict)  # error text -> how many requests

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(outcomes: list[RequestOutcome], duration_s: float, slo: SLO | None = None) -> BenchSummary:
    done = [o for o in outcomes if o.ok]
    input_tokens = sum(o.prompt_tokens for o in done)
    output_tokens = sum(o.output_tokens for o in done)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    good = sum(slo.met_by(o) for o in outcomes) if slo else None
    return BenchSummary(
        completed=len(done), failed=len(outcomes) - len(done), duration_s=duration_s,
        request_throughput=per_s(len(done)), input_token_throughput=per_s(input_tokens),
        output_token_throughput=per_s(output_tokens), total_token_throughput=per_s(input_tokens + output_tokens),
        total_input_tokens=input_tokens, total_output_tokens=output_tokens,
        ttft_ms=LatencyStats.of([o.ttft_s for o in done]),
        tpot_ms=LatencyStats.of([o.tpot_s for o in done if o.tpot_s is not None]),
        itl_ms=LatencyStats.of([gap for o in done for gap in o.itl_s]),
        e2e_ms=LatencyStats.of([o.e2e_s for o in done]),
        slo={k: v for k, v in asdict(slo).items() if v is not None} if slo else None,
        good_requests=good, goodput=per_s(good) if slo else None,
        errors=dict(Counter(o.error for o in outcomes if not o.ok)),
    )
