"""KV transfer bandwidth: each backend between two processes vs a same-host memcpy.

For every payload size, a sender process pushes that many bytes of KV blocks (random block ids
on the receiver, in chunks of at most --chunk-mb) and says done; the time runs from just before
the first push (sender) to the moment the receiver's wait() returns DONE. Both stamps read the
same system-wide monotonic clock. Payloads are gathered before the clock starts: this measures
the transport, not the prefill worker's gather. A checksum of the landed blocks is compared with
the sender's on the last repeat. Baseline: `dst.copy_(src)` of the same size inside one process.

    python bench/kv_transfer.py                       # 1, 16, 256 MiB; torch_dist and shm
    python bench/kv_transfer.py --sizes-mb 4 64 --repeats 3 --backends shm
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import pathlib
import platform
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from kv_transfer import KVLayout, create_receiver, create_sender, gather_blocks  # noqa: E402

# 16 layers x K,V x 16 tokens x 8 heads x 64 dims x 2 bytes = 512 KiB per block, so every MiB
# size is a whole number of blocks (a Llama-1B-like fp16 cache).
LAYOUT = KVLayout("bench-1b", "float16", block_size=16, num_layers=16, num_kv_heads=8, head_dim=64)
MIB = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 16, 256], help="payload sizes in MiB")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per size (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repeats per size")
    parser.add_argument("--chunk-mb", type=int, default=64, help="largest chunk pushed in one send, MiB")
    parser.add_argument("--backends", nargs="+", default=["torch_dist", "shm"], choices=["torch_dist", "shm", "cuda_ipc"])
    parser.add_argument("--block-ids", choices=["random", "contiguous"], default="random",
                        help="receiver block ids per request: random (worst case, scattered 512 KiB blocks) or one run")
    # 1 by default: on a busy host, OpenMP wake-ups make multi-threaded copies of small payloads
    # 100x slower, which would measure the scheduler rather than the transport.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in every process")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "kv_transfer.json"))
    return parser.parse_args(argv)


def blocks_for(size_mb: int) -> int:
    return max(1, size_mb * MIB // LAYOUT.bytes_per_block)


def checksum(blocks: torch.Tensor) -> int:
    """Exact, order-independent within a block set: sum of the raw 16-bit words."""
    return int(blocks.contiguous().view(torch.int16).sum(dtype=torch.int64))


def sender_main(backend: str, endpoint: str, max_blocks: int, threads: int, jobs: mp.Queue, results: mp.Queue) -> None:
    torch.set_num_threads(threads)
    sender = create_sender(backend, LAYOUT)
    sender.connect(endpoint)
    source = torch.randn(LAYOUT.cache_shape(max_blocks), generator=torch.Generator().manual_seed(0)).to(LAYOUT.torch_dtype)
    while (job := jobs.get()) is not None:
        ticket, chunk_blocks = job
        n = len(ticket.block_ids)
        local_ids = random.Random(n).sample(range(max_blocks), n)
        chunks = [(s, gather_blocks(source, local_ids[s : s + chunk_blocks])) for s in range(0, n, chunk_blocks)]
        started = time.monotonic()
        for start, blocks in chunks:
            sender.send_blocks(ticket, blocks, start=start)
        sender.send_done(ticket)
        results.put((started, checksum(torch.cat([b for _, b in chunks]))))
    sender.close()


def bench_backend(backend: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    max_blocks = max(blocks_for(s) for s in args.sizes_mb)
    device = "cuda" if backend == "cuda_ipc" else "cpu"
    ctx = mp.get_context("spawn")
    jobs, results = ctx.Queue(), ctx.Queue()
    # Steady-state bandwidth: shared-memory pages touched up front (a serving worker touches them
    # as its KV grows instead, paying each page's first fault once).
    options = {"prefault": True} if backend == "shm" else {}
    rx = create_receiver(backend, LAYOUT, num_blocks=2 * max_blocks, device=device, timeout_s=300, **options)
    proc = ctx.Process(target=sender_main, args=(backend, rx.endpoint, max_blocks, args.threads, jobs, results))
    proc.start()
    gbps, verified, rng = {}, {}, random.Random(1)
    chunk_blocks = max(1, args.chunk_mb * MIB // LAYOUT.bytes_per_block)
    try:
        for size in args.sizes_mb:
            n, times = blocks_for(size), []
            for rep in range(args.warmup + args.repeats):
                request_id = f"{size}mb-{rep}"
                first = rng.randrange(rx.num_blocks - n + 1)
                ids = rng.sample(range(rx.num_blocks), n) if args.block_ids == "random" else range(first, first + n)
                ticket = rx.issue_ticket(request_id, ids, n * LAYOUT.block_size, request_id)
                jobs.put((ticket, chunk_blocks))
                rx.wait(request_id, timeout_s=300)
                finished = time.monotonic()
                started, sent_sum = results.get(timeout=300)
                if rep >= args.warmup:
                    times.append(finished - started)
                rx.release(request_id)
            verified[str(size)] = sent_sum == checksum(rx.kv_cache[list(ticket.block_ids)].cpu())
            gbps[str(size)] = round(n * LAYOUT.bytes_per_block / statistics.median(times) / 1e9, 3)
            print(f"  {backend:10s} {size:5d} MiB  {gbps[str(size)]:8.2f} GB/s  verified={verified[str(size)]}", file=sys.stderr, flush=True)
    finally:
        jobs.put(None)
        proc.join(60)
        snap = rx.snapshot()
        rx.close()
    return {"gbps": gbps, "verified": verified, "receiver_counters": {"bytes": snap.bytes, "transfers": snap.transfers, "failures": snap.failures}}


def bench_memcpy(args: argparse.Namespace) -> dict[str, float]:
    out = {}
    for size in args.sizes_mb:
        nbytes = blocks_for(size) * LAYOUT.bytes_per_block
        src, dst = torch.randn(nbytes // 2).half(), torch.zeros(nbytes // 2, dtype=torch.float16)
        times = []
        for rep in range(args.warmup + args.repeats):
            started = time.perf_counter()
            dst.copy_(src)
            if rep >= args.warmup:
                times.append(time.perf_counter() - started)
        out[str(size)] = round(nbytes / statistics.median(times) / 1e9, 3)
        print(f"  {'memcpy':10s} {size:5d} MiB  {out[str(size)]:8.2f} GB/s", file=sys.stderr, flush=True)
    return out


def describe_device() -> str:
    model = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} torch threads, {mp.cpu_count()} cores"


def backend_key(backend: str) -> str:
    return "torch_dist_gloo" if backend == "torch_dist" else backend


def print_table(report: dict, sizes: list[int], keys: list[str]) -> None:
    header = f"{'size MiB':>9} {'memcpy':>9} " + " ".join(f"{k:>16}" for k in keys)
    print(f"KV transfer bandwidth, GB/s (1e9 B/s), median of {report['repeats']}, {report['block_ids']} block ids -- {report['device']}")
    print(header)
    for size in sizes:
        memcpy = report["memcpy_gbps"][str(size)]
        cells = []
        for k in keys:
            v = report[k]["gbps"][str(size)]
            cells.append(f"{v:8.2f} ({v / memcpy:4.0%})")
        print(f"{size:9d} {memcpy:9.2f} " + " ".join(f"{c:>16}" for c in cells))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"layout {LAYOUT}, {LAYOUT.bytes_per_block // 1024} KiB/block", file=sys.stderr)
    report = {"device": describe_device(), "torch": torch.__version__, "layout": LAYOUT.to_dict(),
              "repeats": args.repeats, "threads": args.threads, "block_ids": args.block_ids, "chunk_mb": args.chunk_mb, "sizes_mb": args.sizes_mb}
    report["memcpy_gbps"] = bench_memcpy(args)
    keys = []
    for backend in args.backends:
        keys.append(backend_key(backend))
        report[keys[-1]] = bench_backend(backend, args)
    print_table(report, args.sizes_mb, keys)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
