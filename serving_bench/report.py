"""What a benchmark run prints and writes: result blocks, a sweep table, the JSON."""
from __future__ import annotations

import json
import os
from dataclasses import asdict

from serving_bench.client import RequestOutcome
from serving_bench.load import LoadShape
from serving_bench.metrics import BenchSummary

LATENCIES = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms"))


def slo_text(slo: dict | None) -> str:
    return ", ".join(f"{k.removesuffix('_s')}<={v:g}s" for k, v in (slo or {}).items())


def result_block(shape: LoadShape, summary: BenchSummary) -> str:
    s = summary
    lines = [f"{'=' * 18} Serving benchmark: {shape.label()} {'=' * 18}",
             f"{'Completed requests:':<48}{s.completed}",
             f"{'Failed requests:':<48}{s.failed}",
             f"{'Duration (s):':<48}{s.duration_s:.2f}",
             f"{'Total input tokens:':<48}{s.total_input_tokens}",
             f"{'Total output tokens:':<48}{s.total_output_tokens}",
             f"{'Request throughput (req/s):':<48}{s.request_throughput:.2f}",
             f"{'Output token throughput (tok/s):':<48}{s.output_token_throughput:.1f}",
             f"{'Total token throughput (tok/s):':<48}{s.total_token_throughput:.1f}"]
    if s.goodput is not None:
        lines.append(f"{'Goodput (req/s) [' + slo_text(s.slo) + ']:':<48}{s.goodput:.2f} "
                     f"({s.good_requests}/{s.completed + s.failed} requests met the SLO)")
    lines.append(f"{'(ms)':<8}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for name, key in LATENCIES:
        st = getattr(s, key)
        lines.append(f"{name:<8}{st.mean:>10.1f}{st.p50:>10.1f}{st.p90:>10.1f}{st.p99:>10.1f}")
    for error, count in s.errors.items():
        lines.append(f"FAILED x{count}: {error}")
    return "\n".join(lines)


def sweep_table(runs: list[tuple[LoadShape, BenchSummary]]) -> str:
    head = (f"{'load':<26}{'done':>6}{'fail':>6}{'req/s':>8}{'tok/s':>8}{'TTFT p50':>10}{'p99':>8}"
            f"{'TPOT p50':>10}{'p99':>8}{'goodput':>9}")
    rows = [head]
    for shape, s in runs:
        goodput = f"{s.goodput:.2f}" if s.goodput is not None else "-"
        rows.append(f"{shape.label():<26}{s.completed:>6}{s.failed:>6}{s.request_throughput:>8.2f}"
                    f"{s.output_token_throughput:>8.1f}{s.ttft_ms.p50:>10.0f}{s.ttft_ms.p99:>8.0f}"
                    f"{s.tpot_ms.p50:>10.1f}{s.tpot_ms.p99:>8.1f}{goodput:>9}")
    return "\n".join(rows)


def outcome_record(o: RequestOutcome) -> dict:
    record = asdict(o)
    record["tpot_s"] = o.tpot_s
    return record


def run_record(shape: LoadShape, summary: BenchSummary, outcomes: list[RequestOutcome]) -> dict:
    load = asdict(shape)
    load["request_rate"] = "inf" if load["request_rate"] == float("inf") else load["request_rate"]
    return {"load": load, "summary": summary.to_dict(), "requests": [outcome_record(o) for o in outcomes]}


def write_json(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
