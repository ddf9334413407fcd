"""Predicted costs of placing a request, from the workers' published load and fitted rates.

Every figure comes from the workers' own measurements (their step-cost fits, their transfer
rate); a worker that has measured nothing yet falls back on another worker's rates, and only a
cluster that has measured nothing at all uses the defaults below.
"""
from __future__ import annotations

from router.pools.handle import WorkerHandle

# Used until a worker has measured itself (it calibrates at start, so rarely for long).
DEFAULT_PREFILL_S_PER_TOKEN = 0.002
DEFAULT_TRANSFER_BYTES_PER_S = 1e9


def prefill_s_per_token(worker: WorkerHandle) -> float:
    rate = worker.load.prefill_s_per_token
    return rate if rate > 0 else DEFAULT_PREFILL_S_PER_TOKEN


def queued_prefill_s(worker: WorkerHandle) -> float:
    """Time for the prompt tokens already queued on the worker (admitted, not computed)."""
    return worker.queued_prefill_tokens * prefill_s_per_token(worker)


def prefill_chunks(worker: WorkerHandle, tokens: int) -> int:
    return -(-tokens // max(1, worker.load.max_num_batched_tokens)) if tokens else 0


def prefill_s(worker: WorkerHandle, tokens: int) -> float:
    """A prefill of `tokens` in steps of its own (a prefill worker's, an idle decode worker's):
    each chunk pays a step's fixed cost and the cost of holding prefill tokens."""
    step = worker.load.step_base_s + worker.load.mixed_step_s
    return tokens * prefill_s_per_token(worker) + prefill_chunks(worker, tokens) * step


def prefill_beside_decodes_s(worker: WorkerHandle, tokens: int) -> float:
    """What a prefill of `tokens` adds to steps the worker runs anyway: its tokens, and what a
    step with prefill tokens costs more than a decode-only one, in each of its chunks."""
    return tokens * prefill_s_per_token(worker) + prefill_chunks(worker, tokens) * worker.load.mixed_step_s


def marginal_prefill_s(worker: WorkerHandle, tokens: int) -> float:
    """A prefill of `tokens` joining steps the worker runs anyway (a busy decode worker's): the
    step's fixed cost is already paid by the decodes."""
    if worker.load.num_running == 0:
        return prefill_s(worker, tokens)
    return prefill_beside_decodes_s(worker, tokens)


def running_stall_s(worker: WorkerHandle, tokens: int) -> float:
    """Total delay a local prefill of `tokens` adds to the requests decoding on the worker now:
    each waits, in every step that carries a chunk of it, for the duration of
    prefill_beside_decodes_s, in the middle of its stream."""
    return worker.load.num_running * prefill_beside_decodes_s(worker, tokens)


def arrivals_stall_s(worker: WorkerHandle, tokens: int) -> float:
    """Expected total delay a local prefill of `tokens` adds to the requests that arrive at the
    worker while it waits its turn (Q) or runs (T = prefill_beside_decodes_s), at the worker's
    measured arrival rate: those of the queue lose all of T, those of the prefill itself what is
    left of it, T/2 on average. Without this term, an idle worker would take every long prompt,
    and every request arriving behind one would decode at the pace of its chunks."""
    duration = prefill_beside_decodes_s(worker, tokens)
    return worker.arrivals.per_s * (queued_prefill_s(worker) + duration / 2) * duration


def decode_slowdown_s(worker: WorkerHandle, tokens: int) -> float:
    """Total delay a local prefill of `tokens` adds to decoding on the worker: to the requests
    running now and, expected, to those arriving while it waits or runs."""
    return running_stall_s(worker, tokens) + arrivals_stall_s(worker, tokens)


def transfer_s(prefill: WorkerHandle, decode: WorkerHandle, tokens: int) -> float:
    """Time to move the KV of `tokens` prompt tokens from prefill to decode."""
    record = decode.record
    bytes_per_block = record.bytes_per_block if record is not None else 0
    blocks = -(-tokens // decode.block_size)
    rate = prefill.load.transfer_bytes_per_s or DEFAULT_TRANSFER_BYTES_PER_S
    return blocks * bytes_per_block / rate


def load_of(worker: WorkerHandle) -> int:
    return worker.num_requests
