"""PNG plots of a run (matplotlib, from the `bench` extra, imported only when plotting):
latency CDFs, one line per load; goodput and throughput against the offered request rate."""
from __future__ import annotations

import math
import os

CDF_PANELS = (("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("ITL", "itl_s"), ("E2E", "e2e_s"))


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise RuntimeError("plots need matplotlib: pip install 'pdserve[bench]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def request_values(run: dict, key: str) -> list[float]:
    """Seconds of `key` over the completed requests of a run record; ITL pools every gap."""
    done = [r for r in run["requests"] if r["error"] is None]
    if key == "itl_s":
        return [gap for r in done for gap in r["itl_s"]]
    return [r[key] for r in done if r[key] is not None]


def run_label(run: dict) -> str:
    load = run["load"]
    label = f"rate {load['request_rate']}"
    return label + (f", conc {load['max_concurrency']}" if load["max_concurrency"] else "")


def plot_latency_cdfs(runs: list[dict], path: str, title: str) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, (name, key) in zip(axes, CDF_PANELS):
        for run in runs:
            values = sorted(1000 * v for v in request_values(run, key))
            if values:
                ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=run_label(run))
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests" if key != "itl_s" else "fraction of gaps")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return save(plt, fig, path)


def plot_goodput(series: dict[str, list[dict]], path: str, title: str) -> str:
    """`series`: a name -> run records with finite request rates (one line of each kind per name)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, runs) in enumerate(series.items()):
        runs = [r for r in runs if not math.isinf(float(r["load"]["request_rate"]))]
        rates = [float(r["load"]["request_rate"]) for r in runs]
        ax.plot(rates, [r["summary"]["request_throughput"] for r in runs], "--", marker="o", color=f"C{i}",
                alpha=0.5, label=f"{name}: throughput")
        if runs and runs[0]["summary"]["goodput"] is not None:
            ax.plot(rates, [r["summary"]["goodput"] for r in runs], marker="s", color=f"C{i}",
                    label=f"{name}: goodput")
    ax.set_xlabel("offered request rate (req/s)")
    ax.set_ylabel("req/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return save(plt, fig, path)


def save(plt, fig, path: str) -> str:
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
