"""The conditional disaggregation bench's paired bootstrap: auto's ratios against the better of
always and never, with how far chance could move them."""
from __future__ import annotations

import random

import pytest

from bench.conditional_disagg import paired_intervals, ratios_of


def rows(ttfts, tpots, lengths, round_index=1):
    return [{"round": round_index, "prompt_tokens": n, "ttft_ms": t, "tpot_ms": p, "output_tokens": 32}
            for t, p, n in zip(ttfts, tpots, lengths)]


def results_of(by_mode):
    return {mode: {"low": {"requests": value}} for mode, value in by_mode.items()}


def test_ratios_take_each_metric_against_the_better_mode():
    lengths = [10] * 4
    got = ratios_of({"auto": rows([100, 100, 100, 100], [10, 10, 10, 10], lengths),
                     "always": rows([200, 200, 200, 200], [8, 8, 8, 8], lengths),
                     "never": rows([50, 50, 50, 50], [20, 20, 20, 20], lengths)})
    assert got == pytest.approx([2.0, 2.0, 1.25])


def test_a_mode_uniformly_faster_is_inside_its_interval_everywhere():
    rng = random.Random(3)
    lengths = [rng.randint(8, 700) for _ in range(60)]
    base = [rng.uniform(100, 2000) for _ in lengths]
    tpot = [rng.uniform(10, 30) for _ in lengths]
    by_mode = {"auto": rows([0.9 * t for t in base], [0.9 * p for p in tpot], lengths),
               "always": rows(base, tpot, lengths),
               "never": rows([1.2 * t for t in base], [1.5 * p for p in tpot], lengths)}
    out = paired_intervals(results_of(by_mode), ["low"], samples=300)["low"]
    assert out["pairs"] == 60
    for metric in ("ttft_p50", "ttft_p99", "tpot_mean"):
        # Paired: every resample sees auto 10% faster than always on the same requests.
        assert out[metric]["ratio"] == pytest.approx(0.9, abs=1e-3)
        assert out[metric]["p5"] == pytest.approx(0.9, abs=1e-3) and out[metric]["p95"] == pytest.approx(0.9, abs=1e-3)
        assert out[metric]["share_at_most_1"] == 1.0


def test_noise_widens_the_interval_around_a_tie():
    rng = random.Random(5)
    lengths = [rng.randint(8, 48) for _ in range(80)]
    by_mode = {mode: rows([rng.uniform(100, 300) for _ in lengths], [rng.uniform(10, 20) for _ in lengths], lengths)
               for mode in ("auto", "always", "never")}
    out = paired_intervals(results_of(by_mode), ["low"], samples=300)["low"]
    assert out["ttft_p50"]["p5"] < out["ttft_p50"]["ratio"] < out["ttft_p50"]["p95"]
    assert out["ttft_p50"]["p95"] - out["ttft_p50"]["p5"] > 0.05
    assert 0.0 < out["ttft_p50"]["share_at_most_1"] < 1.0


def test_requests_that_do_not_pair_are_refused():
    by_mode = {"auto": rows([100], [10], [12]), "always": rows([100], [10], [12]), "never": rows([100], [10], [13])}
    with pytest.raises(RuntimeError, match="cannot pair"):
        paired_intervals(results_of(by_mode), ["low"], samples=10)
