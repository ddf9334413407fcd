"""The machine side of bench/engine_throughput.py: read bandwidth (of a fresh buffer and of the
engine's own weights as stored), the bytes a decode step reads, the thread count, the CPU's name.
See that file's docstring for how the floor is built from these."""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import torch

from engine import LLM
from engine.model.stored import StoredEmbedding, StoredLinear
from engine.native import NativeBuildError, stream_read


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def fresh_buffer_gbps(size_mb: int = 1024, repeats: int = 5) -> dict[str, float]:
    """Read bandwidth of a fresh `size_mb` buffer in GB/s, the best of `repeats` passes, by
    torch's sum, by torch's matrix-vector product on a column-major weight (the torch decode
    path's layout), and by the native streaming sum when it builds here."""
    buf = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32)
    nbytes = buf.numel() * 4
    result = {"sum": nbytes / _best_seconds(buf.sum, repeats) / 1e9}
    weight = buf.view(1024, -1).t()  # (out, 1024), column-major
    x = torch.ones(1, 1024)
    result["gemv"] = nbytes / _best_seconds(lambda: torch.nn.functional.linear(x, weight), repeats) / 1e9
    try:
        result["native_sum"] = nbytes / _best_seconds(lambda: stream_read([buf]), repeats) / 1e9
    except NativeBuildError as err:
        log(f"native streaming read unavailable: {err}")
    return result


def weights_gbps(llm: LLM, passes: int, burst_passes: int = 5) -> tuple[float, float] | None:
    """Read bandwidth of this engine's weights in GB/s over `passes` passes: (sustained, the
    mean over all of them; burst, the best of the first `burst_passes`). None without the native
    kernels."""
    step = llm.engine.runner.native_decode
    if step is None:
        return None
    nbytes = sum(w.numel() * w.element_size() for w in step.weights)
    times = []
    for _ in range(max(passes, burst_passes)):
        start = time.perf_counter()
        stream_read(step.weights)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.mean(times) / 1e9, nbytes / min(times[:burst_passes]) / 1e9


def pick_num_threads(repeats: int = 5) -> int:
    """The thread count (1..usable cores) that runs a decode-like probe fastest right now."""
    cores = len(os.sched_getaffinity(0))
    weight = torch.randn(3072, 576)
    rows = torch.randn(8, 576)

    def probe():
        for _ in range(20):
            y = torch.nn.functional.linear(rows, weight)
            y = torch.nn.functional.silu(y) * y
    timings = {}
    for n in range(1, cores + 1):
        torch.set_num_threads(n)
        probe()
        timings[n] = _best_seconds(probe, repeats)
    log("thread probe: " + ", ".join(f"{n}: {t * 1e3:.1f} ms" for n, t in timings.items()))
    # More threads must be clearly faster: load that arrives later hurts them far more.
    chosen = 1
    for n in sorted(timings):
        if timings[n] * 1.3 < timings[chosen]:
            chosen = n
    return chosen


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step must read, as stored: every weight once, except an embedding table
    that is not also the LM head (a step reads one row of it per request). A tied embedding
    counts once, as the LM head."""
    embedding = model.embed_tokens
    tied = model.lm_head is None
    seen: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, (StoredLinear, StoredEmbedding)) and (tied or module is not embedding):
            for segment in module.stored.segments:
                seen[segment.data.data_ptr()] = segment.data.numel()
    for p in model.parameters():
        if p is getattr(embedding, "weight", None) and not tied:
            continue
        seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return sum(seen.values())


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
