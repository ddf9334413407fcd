"""kv_transfer between real processes (multiprocessing spawn, not Ray): every backend that can run
here moves random KV blocks bit-exact into non-contiguous block ids, in several chunks."""
from __future__ import annotations

import multiprocessing as mp
import os
import random

import pytest
import torch

from kv_transfer import (
    KVLayout,
    TransferError,
    TransferTicket,
    create_receiver,
    create_sender,
    gather_blocks,
)

CTX = mp.get_context("spawn")
WAIT_S = 60.0


def tiny_layout(dtype: str) -> KVLayout:
    return KVLayout("tiny", dtype, block_size=4, num_layers=3, num_kv_heads=2, head_dim=8)


def source_cache(layout: KVLayout, num_blocks: int, seed: int) -> torch.Tensor:
    """The prefill side's cache; the same seed gives the same tensor in every process."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(layout.cache_shape(num_blocks), generator=gen).to(layout.torch_dtype)


def chunk_plan(num_blocks: int, num_layers: int) -> list[tuple[int, int, int | None]]:
    """(start, count, layer) pushes covering a ticket: two all-layer chunks, then the rest layer
    by layer, the way a GPU prefill worker pushes after each layer."""
    first, second = num_blocks // 3, num_blocks // 3
    plan = [(0, first, None), (first, second, None)]
    rest = first + second
    return plan + [(rest, num_blocks - rest, layer) for layer in range(num_layers)]


def push_requests(backend: str, layout: KVLayout, jobs: list[tuple[TransferTicket, list[int], int]], results: mp.Queue, die_after_first_chunk: bool = False) -> None:
    """Child process: a prefill worker pushing each (ticket, its own block ids, seed) job."""
    sender = create_sender(backend, layout, sender_id=f"prefill-{os.getpid()}")
    for endpoint in sorted({ticket.endpoint for ticket, _, _ in jobs}):
        sender.connect(endpoint)  # pre-warm, before any request
    for ticket, local_ids, seed in jobs:
        cache = source_cache(layout, max(local_ids) + 1, seed)
        for start, count, layer in chunk_plan(len(ticket.block_ids), layout.num_layers):
            sender.send_blocks(ticket, gather_blocks(cache, local_ids[start : start + count], layer), start, layer)
            if die_after_first_chunk:
                os._exit(3)  # a prefill worker that dies mid-transfer
        sender.send_done(ticket)
    results.put(sender.snapshot())
    sender.close()


class FreeBlocks:
    """Hands out random, non-contiguous, unsorted block ids of a receiver, none twice."""

    def __init__(self, num_blocks: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self._free = self.rng.sample(range(num_blocks), num_blocks)

    def take(self, count: int) -> list[int]:
        return [self._free.pop() for _ in range(count)]


def make_job(rx, free: FreeBlocks, request_id: str, num_blocks: int, seed: int) -> tuple[TransferTicket, list[int], int]:
    """A ticket on rx plus the sender's own (random) block ids holding the request's KV."""
    ticket = rx.issue_ticket(request_id, free.take(num_blocks), num_blocks * rx.layout.block_size, f"lease-{request_id}")
    local_ids = free.rng.sample(range(2 * num_blocks), num_blocks)
    return ticket, local_ids, seed


def assert_landed(rx, jobs: list[tuple[TransferTicket, list[int], int]]) -> None:
    touched = torch.zeros(rx.num_blocks, dtype=torch.bool)
    for ticket, local_ids, seed in jobs:
        assert rx.wait(ticket.request_id, WAIT_S).name == "DONE"
        src = source_cache(rx.layout, max(local_ids) + 1, seed)
        assert torch.equal(rx.kv_cache[list(ticket.block_ids)], src[local_ids])
        touched[list(ticket.block_ids)] = True
    assert not rx.kv_cache[~touched].any(), "bytes landed outside the tickets' blocks"
    moved = sum(len(t.block_ids) for t, _, _ in jobs) * rx.layout.bytes_per_block
    snap = rx.snapshot()
    assert (snap.bytes, snap.transfers, snap.failures) == (moved, len(jobs), 0)


def run_senders(backend: str, layout: KVLayout, per_sender_jobs: list[list], **kwargs) -> list:
    results = CTX.Queue()
    procs = [CTX.Process(target=push_requests, args=(backend, layout, jobs, results), kwargs=kwargs) for jobs in per_sender_jobs]
    for proc in procs:
        proc.start()
    return procs, results


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", ["shm", "torch_dist"])
def test_one_sender_moves_blocks_bit_exact(backend: str, dtype: str) -> None:
    layout = tiny_layout(dtype)
    with create_receiver(backend, layout, num_blocks=64) as rx:
        free = FreeBlocks(rx.num_blocks, seed=len(backend + dtype))
        jobs = [make_job(rx, free, "req-a", 11, seed=1), make_job(rx, free, "req-b", 7, seed=2)]
        procs, results = run_senders(backend, layout, [jobs])
        assert_landed(rx, jobs)
        sent = results.get(timeout=WAIT_S)
        procs[0].join(WAIT_S)
        assert sent.bytes == 18 * layout.bytes_per_block and sent.transfers == 2
        assert sent.chunks == 2 * (2 + layout.num_layers)


@pytest.mark.parametrize("backend", ["torch_dist", "shm"])
def test_two_senders_one_receiver(backend: str) -> None:
    layout = tiny_layout("bfloat16")
    with create_receiver(backend, layout, num_blocks=48) as rx:
        free = FreeBlocks(rx.num_blocks, seed=7)
        jobs_a = [make_job(rx, free, "a-1", 9, seed=10), make_job(rx, free, "a-2", 4, seed=11)]
        jobs_b = [make_job(rx, free, "b-1", 8, seed=12)]
        procs, _ = run_senders(backend, layout, [jobs_a, jobs_b])
        assert_landed(rx, jobs_a + jobs_b)
        for proc in procs:
            proc.join(WAIT_S)


def test_torch_dist_pool_two_by_two() -> None:
    """Two prefill processes each connect to two decode receivers (four pair groups)."""
    layout = tiny_layout("float32")
    with create_receiver("torch_dist", layout, num_blocks=32) as rx0, create_receiver("torch_dist", layout, num_blocks=32) as rx1:
        free = {rx0: FreeBlocks(32, seed=22), rx1: FreeBlocks(32, seed=23)}
        jobs = {(s, r): make_job(rx, free[rx], f"s{s}-r{r}", 6, seed=20 + 2 * s + r) for s in (0, 1) for r, rx in enumerate((rx0, rx1))}
        procs, _ = run_senders("torch_dist", layout, [[jobs[s, 0], jobs[s, 1]] for s in (0, 1)])
        assert_landed(rx0, [jobs[0, 0], jobs[1, 0]])
        assert_landed(rx1, [jobs[0, 1], jobs[1, 1]])
        for proc in procs:
            proc.join(WAIT_S)


@pytest.mark.parametrize("backend", ["shm", "torch_dist"])
def test_sender_death_fails_transfer_instead_of_hanging(backend: str) -> None:
    layout = tiny_layout("float32")
    with create_receiver(backend, layout, num_blocks=16) as rx:
        job = make_job(rx, FreeBlocks(16, seed=3), "doomed", 6, seed=5)
        procs, _ = run_senders(backend, layout, [[job]], die_after_first_chunk=True)
        with pytest.raises(TransferError, match="doomed failed: sender"):
            rx.wait("doomed", WAIT_S)
        procs[0].join(WAIT_S)
        assert procs[0].exitcode == 3 and rx.snapshot().failures == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuda_ipc needs a CUDA device; this host has none")
def test_cuda_ipc_moves_blocks_bit_exact() -> None:
    layout = tiny_layout("bfloat16")
    with create_receiver("cuda_ipc", layout, num_blocks=32, device="cuda") as rx:
        job = make_job(rx, FreeBlocks(32, seed=9), "gpu", 8, seed=4)
        procs, _ = run_senders("cuda_ipc", layout, [[job]])
        ticket, local_ids, seed = job
        assert rx.wait("gpu", WAIT_S).name == "DONE"
        src = source_cache(layout, max(local_ids) + 1, seed)
        assert torch.equal(rx.kv_cache[list(ticket.block_ids)].cpu(), src[local_ids])
        procs[0].join(WAIT_S)
