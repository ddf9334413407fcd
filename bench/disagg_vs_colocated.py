"""Disaggregated against colocated serving: the same cores, the same model, the same workload,
one sweep of request rates, goodput under a TPOT SLO for both.

- disaggregated: 1 prefill + 1 decode worker, --disaggregation always: every prompt is prefilled
  on the prefill worker and its KV sent to the decode worker, so decode steps never share a step
  (or a core) with a prefill.
- colocated: --mode colocated with as many mixed workers as the disaggregated run has workers
  (2 by default), each prefilling and decoding its own requests: a prompt's prefill chunks run in
  the same engine steps as the decodes of the requests already running there.

Each worker gets --torch-threads threads (default 1: on a 2-core host, one core per worker in
both layouts). Both clusters are `pdserve serve` processes driven over the OpenAI HTTP API by the
serving benchmark (serving_bench): at each rate both layouts get the same requests with the same
Poisson arrivals (each rate its own prompts, so none is a prefix-cache hit left by an earlier
rate). The TPOT SLO defaults to about twice the TPOT of one request alone on the 2-core CPU this
was written on (~15 ms). Writes bench/results/disagg_vs_colocated.json and .png.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving_bench.cli import length_stats, log  # noqa: E402
from serving_bench.client import RequestSettings, first_model  # noqa: E402
from serving_bench.flags import rate_list  # noqa: E402
from serving_bench.load import LoadShape, run_load  # noqa: E402
from serving_bench.metrics import SLO, summarize  # noqa: E402
from serving_bench.prompts import prompt_maker  # noqa: E402
from serving_bench.report import run_record, sweep_table, write_json  # noqa: E402
from serving_bench.server import served_cluster  # noqa: E402
from serving_bench.workloads import RandomLengths, build_workload, sweep_workloads  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def layouts(args) -> dict[str, list[str]]:
    common = ["--model", args.model, "--torch-threads", str(args.torch_threads),
              "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    return {
        "disaggregated": common + ["--mode", "disaggregated", "--prefill-workers", "1", "--decode-workers", "1",
                                   "--disaggregation", "always", "--cluster-name", "bench-disagg"],
        "colocated": common + ["--mode", "colocated", "--decode-workers", str(args.colocated_workers),
                               "--cluster-name", "bench-colocated"],
    }


async def model_name(base_url: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        return await first_model(session, base_url)


def run_layout(name: str, flags: list[str], workloads, warmup, args, slo: SLO) -> list[dict]:
    log(f"{name}: pdserve serve {' '.join(flags)}")
    with served_cluster(flags, os.path.join(args.log_dir, f"serve_{name}.log")) as cluster:
        settings = RequestSettings(cluster.base_url, asyncio.run(model_name(cluster.base_url)))
        asyncio.run(run_load(settings, warmup, LoadShape(max_concurrency=2), args.seed, show_progress=False))
        runs, printed = [], []
        for rate, requests in zip(args.rates, workloads):
            shape = LoadShape(rate)
            outcomes, duration = asyncio.run(run_load(settings, requests, shape, args.seed))
            summary = summarize(outcomes, duration, slo)
            runs.append(run_record(shape, summary, outcomes))
            printed.append((shape, summary))
        print(f"\n{name}:\n{sweep_table(printed)}", flush=True)
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo, an HF model directory or a .gguf file (default demo)")
    parser.add_argument("--rates", type=rate_list, default=[0.5, 1.0, 1.5, 2.0],
                        help="request rates of the sweep, Poisson arrivals (default 0.5,1,1.5,2)")
    parser.add_argument("--num-prompts", type=int, default=16, help="requests per rate (default 16)")
    parser.add_argument("--input-len", type=int, default=192, help="prompt tokens, mean (default 192)")
    parser.add_argument("--output-len", type=int, default=32, help="output tokens, mean (default 32)")
    parser.add_argument("--range-ratio", type=float, default=0.25,
                        help="lengths uniform in [L*(1-r), L*(1+r)] (default 0.25)")
    parser.add_argument("--tpot-slo", type=float, default=0.03, help="TPOT target in seconds (default 0.03)")
    parser.add_argument("--ttft-slo", type=float, default=None, help="TTFT target in seconds (default: none)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--colocated-workers", type=int, default=2,
                        help="mixed workers of the colocated layout (default 2: as many as 1 prefill + 1 decode)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512,
                        help="tokens per engine step, prefill chunks included, in both layouts (default 512)")
    parser.add_argument("--layouts", default="disaggregated,colocated", help="which layouts to run, in order")
    parser.add_argument("--seed", type=int, default=0, help="seed of the workload and the arrivals")
    parser.add_argument("--out", default=os.path.join(RESULTS, "disagg_vs_colocated.json"), help="the JSON written")
    parser.add_argument("--plot", default=os.path.join(RESULTS, "disagg_vs_colocated.png"), help="the PNG written")
    parser.add_argument("--log-dir", default="/tmp", help="where the servers' logs go (default /tmp)")
    args = parser.parse_args(argv)

    slo = SLO(ttft_s=args.ttft_slo, tpot_s=args.tpot_slo)
    maker = prompt_maker(args.model)
    # Each rate its own prompts (no prefix-cache hits across rates), the same ones in both layouts.
    workloads = sweep_workloads(RandomLengths(args.input_len, args.output_len, args.range_ratio),
                                args.num_prompts, maker, args.seed, len(args.rates))
    warmup = build_workload(RandomLengths(args.input_len, 4), 2, maker, args.seed + len(args.rates))
    requests = [r for w in workloads for r in w]
    began = time.perf_counter()
    results = {name: run_layout(name, flags, workloads, warmup, args, slo)
               for name, flags in layouts(args).items() if name in args.layouts.split(",")}
    report = {"model": os.path.basename(args.model), "cpu_cores": len(os.sched_getaffinity(0)),
              "torch_threads_per_worker": args.torch_threads, "colocated_workers": args.colocated_workers,
              "max_num_batched_tokens": args.max_num_batched_tokens,
              "workload": {"input_len": args.input_len, "output_len": args.output_len,
                           "range_ratio": args.range_ratio, "num_prompts": args.num_prompts, "seed": args.seed,
                           "prompt_lengths": length_stats([r.prompt_len for r in requests]),
                           "output_lengths": length_stats([r.output_len for r in requests])},
              "slo": {"tpot_s": args.tpot_slo, "ttft_s": args.ttft_slo},
              "layouts": layouts(args), "elapsed_s": round(time.perf_counter() - began, 1), "results": results}
    write_json(args.out, report)
    log(f"wrote {args.out}")
    from serving_bench.plots import plot_goodput

    title = (f"{report['model']}, {report['cpu_cores']} cores: goodput under TPOT <= {args.tpot_slo:g}s, "
             f"prompts ~{args.input_len}, outputs ~{args.output_len}")
    log("wrote " + plot_goodput(results, args.plot, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
