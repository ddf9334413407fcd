"""`pdserve bench` / `bench/serving.py`: flags, one run per load, printing, JSON and plots."""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from dataclasses import asdict

from serving_bench.client import RequestSettings, first_model
from serving_bench.flags import DESCRIPTION, add_bench_arguments
from serving_bench.load import LoadShape, run_load
from serving_bench.metrics import SLO, summarize
from serving_bench.prompts import prompt_maker
from serving_bench.report import result_block, run_record, sweep_table, write_json
from serving_bench.workloads import RandomLengths, SharedPrefix, ShareGPTLike, sweep_workloads


def workload_spec(args: argparse.Namespace) -> RandomLengths | SharedPrefix | ShareGPTLike:
    if args.workload == "random":
        if not 0 <= args.random_range_ratio < 1:
            raise ValueError("--random-range-ratio must be in [0, 1)")
        return RandomLengths(args.random_input_len, args.random_output_len, args.random_range_ratio)
    if args.workload == "shared-prefix":
        low, high = args.question_len
        if not 1 <= low <= high:
            raise ValueError("--question-len needs 1 <= MIN <= MAX")
        return SharedPrefix(args.prefix_groups, args.prefix_len, (low, high), args.prefix_output_len)
    return ShareGPTLike(args.sharegpt_input_median, args.sharegpt_output_median, args.sharegpt_sigma,
                        args.sharegpt_max_input, args.sharegpt_max_output)


def load_shapes(args: argparse.Namespace) -> list[LoadShape]:
    rates = args.sweep_rates or [args.request_rate]
    return [LoadShape(r, args.max_concurrency, args.burstiness) for r in rates]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


async def resolve_model(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    import aiohttp

    try:
        async with aiohttp.ClientSession() as session:
            return await first_model(session, args.base_url)
    except aiohttp.ClientError as err:
        raise RuntimeError(f"cannot reach {args.base_url}: {err}") from err


def length_stats(values: list[int]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def run_bench(args: argparse.Namespace) -> dict:
    spec = workload_spec(args)
    slo = SLO.parse(args.slo)
    maker = prompt_maker(args.tokenizer)
    shapes = load_shapes(args)
    workloads = sweep_workloads(spec, args.num_prompts, maker, args.seed, len(shapes))
    every = [r for requests in workloads for r in requests]
    model = asyncio.run(resolve_model(args))
    settings = RequestSettings(args.base_url, model, args.endpoint, args.temperature, not args.allow_eos)
    prompts, outputs = length_stats([r.prompt_len for r in every]), length_stats([r.output_len for r in every])
    log(f"{args.num_prompts} {args.workload} requests per run to {settings.url} (model {model}): prompts "
        f"{prompts['min']}-{prompts['max']} {maker.unit} (mean {prompts['mean']:.0f}), outputs "
        f"{outputs['min']}-{outputs['max']} tokens (mean {outputs['mean']:.0f})")
    runs, printed = [], []
    for shape, requests in zip(shapes, workloads):
        outcomes, duration = asyncio.run(run_load(settings, requests, shape, args.seed, args.request_timeout,
                                                  show_progress=not args.no_progress))
        summary = summarize(outcomes, duration, slo)
        print(result_block(shape, summary), flush=True)
        runs.append(run_record(shape, summary, outcomes))
        printed.append((shape, summary))
    if len(printed) > 1:
        print(sweep_table(printed))
    return {"settings": {"base_url": args.base_url, "model": model, "endpoint": args.endpoint,
                         "workload": args.workload, "workload_spec": asdict(spec), "num_prompts": args.num_prompts,
                         "seed": args.seed, "prompt_unit": maker.unit, "tokenizer": args.tokenizer,
                         "ignore_eos": not args.allow_eos, "temperature": args.temperature},
            "prompt_lengths": prompts, "output_lengths": outputs,
            "runs": runs}


def write_outputs(args: argparse.Namespace, report: dict) -> None:
    if args.result_json:
        write_json(args.result_json, report)
        log(f"wrote {args.result_json}")
    if args.plot_dir:
        from serving_bench.plots import plot_goodput, plot_latency_cdfs

        prefix = args.plot_prefix or (os.path.splitext(os.path.basename(args.result_json))[0]
                                      if args.result_json else "serving")
        title = f"{report['settings']['workload']} workload, {report['settings']['model']}"
        paths = [plot_latency_cdfs(report["runs"], os.path.join(args.plot_dir, f"{prefix}_latency_cdf.png"), title)]
        if len(report["runs"]) > 1:
            paths.append(plot_goodput({"pdserve": report["runs"]},
                                      os.path.join(args.plot_dir, f"{prefix}_goodput.png"), title))
        log("wrote " + ", ".join(paths))


def run_from_args(args: argparse.Namespace) -> int:
    try:
        report = run_bench(args)
    except ValueError as err:
        print(f"pdserve bench: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"pdserve bench: {err}", file=sys.stderr)
        return 1
    write_outputs(args, report)
    failed = sum(run["summary"]["failed"] for run in report["runs"])
    return 1 if failed else 0


def build_parser(prog: str = "pdserve bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(parser)
    return parser


def main(argv=None) -> int:
    return run_from_args(build_parser().parse_args(argv))
