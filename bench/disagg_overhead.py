"""What disaggregation costs a request at low load: TTFT and time per output token through the
cluster (gRPC -> router -> prefill worker -> KV transfer -> decode worker -> gRPC) next to
`engine.LLM` in one process, on the same prompts, in one run.

Requests go one at a time (low load), alternating between the two paths so that drift in the
machine's speed hits both alike; each figure is the median over the requests. Every process
(the single engine and each worker) gets the same number of torch threads, so the comparison
isolates the cost of the disaggregated path rather than how a small host splits its cores.
TTFT is measured by the client, from sending the request to the first token it receives.

Writes bench/results/disagg_overhead.json. Run with --help for the flags.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from protos.pdserve.v1 import generation_pb2 as pb  # noqa: E402
from router.cluster_backend import RoutingConfig  # noqa: E402
from router.embedded import EmbeddedCluster  # noqa: E402
from router.pools import PoolConfig  # noqa: E402
from router.serve import ServeConfig  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def timings(stream) -> tuple[float, float, int]:
    """(ttft s, time per output token s, tokens) of a stream of items with token ids."""
    start = time.perf_counter()
    first = last = None
    count = 0
    for new_ids in stream:
        if not new_ids:
            continue
        now = time.perf_counter()
        first = first or now
        last = now
        count += len(new_ids)
    tpot = (last - first) / (count - 1) if count > 1 else 0.0
    return first - start, tpot, count


def single_process(llm: LLM, prompt: list[int], params: SamplingParams):
    return timings(out.new_token_ids for out in llm.stream(prompt, params))


def through_cluster(stub, prompt: list[int], max_tokens: int):
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling_params=pb.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return timings(list(r.token_ids) for r in stub.Generate(request))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo, an HF model directory or a .gguf file")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length (default 1024)")
    parser.add_argument("--output-tokens", type=int, default=32, help="new tokens per request (default 32)")
    parser.add_argument("--requests", type=int, default=5, help="requests per path, after a warm-up (default 5)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads of the single engine and of each worker (default 1)")
    parser.add_argument("--transfer-backend", default="shm", choices=["shm", "torch_dist"],
                        help="KV transfer backend of the cluster (default shm)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "disagg_overhead.json"),
                        help="where to write the JSON results")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.torch_threads)
    options = dict(dtype="float32", device="cpu", kv_cache_memory_gb=0.5, max_num_batched_tokens=512)
    log(f"loading {args.model} in this process")
    llm = LLM(args.model, **options)
    vocab = llm.engine.loaded.config.vocab_size
    rng = random.Random(args.seed)
    # Distinct random prompts: no request is helped by an earlier one's prefix cache.
    prompts = [[rng.randrange(100, vocab - 100) for _ in range(args.prompt_tokens)]
               for _ in range(2 * (args.requests + 1))]
    params = SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True)
    config = ServeConfig(
        engine=EngineConfig.from_options(args.model, **options),
        pools=PoolConfig(mode="disaggregated", transfer_backend=args.transfer_backend,
                         torch_threads=args.torch_threads),
        # Every prompt through the prefill worker and the KV transfer: that path is measured here.
        routing=RoutingConfig(disaggregation="always"))
    log("starting the cluster (1 prefill + 1 decode worker)")
    single, cluster = [], []
    with EmbeddedCluster(config) as server:
        stub = server.stub()
        for i in range(args.requests + 1):
            log(f"request {i}/{args.requests}" + (" (warm-up)" if i == 0 else ""))
            s = single_process(llm, prompts[2 * i], params)
            c = through_cluster(stub, prompts[2 * i + 1], args.output_tokens)
            assert s[2] == c[2] == args.output_tokens
            if i > 0:
                single.append(s)
                cluster.append(c)
        stats = server.run(server.backend.pools.stats())
    result = summarize(args, single, cluster, stats)
    print_table(result)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    log(f"wrote {args.out}")
    return 0


def summarize(args, single, cluster, stats) -> dict:
    def med(rows, i):
        return round(1000 * statistics.median(r[i] for r in rows), 2)
    decode = stats["decode"][0]
    result = {
        "model": args.model, "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
        "requests": args.requests, "torch_threads": args.torch_threads,
        "transfer_backend": args.transfer_backend,
        "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "single_ttft_ms": med(single, 0), "cluster_ttft_ms": med(cluster, 0),
        "single_tpot_ms": med(single, 1), "cluster_tpot_ms": med(cluster, 1),
        "kv_transfer_bytes": decode.transfer_bytes,
    }
    result["ttft_ratio"] = round(result["cluster_ttft_ms"] / result["single_ttft_ms"], 3)
    result["tpot_ratio"] = round(result["cluster_tpot_ms"] / result["single_tpot_ms"], 3)
    return result


def print_table(r: dict) -> None:
    print(f"\n{r['prompt_tokens']}-token prompts, {r['output_tokens']} new tokens, one request at a time, "
          f"{r['torch_threads']} torch thread(s) per process, KV over {r['transfer_backend']}")
    print(f"{'metric':<26}{'one process':>14}{'cluster':>12}{'cluster/one':>13}")
    print(f"{'TTFT ms (median)':<26}{r['single_ttft_ms']:>14.1f}{r['cluster_ttft_ms']:>12.1f}"
          f"{r['ttft_ratio']:>12.2f}x")
    print(f"{'time/output token ms':<26}{r['single_tpot_ms']:>14.1f}{r['cluster_tpot_ms']:>12.1f}"
          f"{r['tpot_ratio']:>12.2f}x")


if __name__ == "__main__":
    sys.exit(main())
