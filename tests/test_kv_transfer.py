"""Unit tests of kv_transfer's value objects, leases, counters and in-process protocol checks."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading

import pytest
import torch

from kv_transfer import (
    KVLayout,
    KVLayoutMismatch,
    LeaseTable,
    TransferCounters,
    TransferError,
    TransferState,
    TransferTicket,
    TransferTimeout,
    check_layouts,
    create_receiver,
    create_sender,
    gather_blocks,
    scatter_blocks,
)

LAYOUT = KVLayout("tiny", "float32", block_size=4, num_layers=2, num_kv_heads=2, head_dim=8)
REPO = pathlib.Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_layout_normalizes_dtype_and_counts_bytes() -> None:
    layout = KVLayout("m", torch.bfloat16, 16, 3, 2, 64)
    assert layout.dtype == "bfloat16" and layout.torch_dtype is torch.bfloat16
    assert layout.bytes_per_block == 3 * 2 * 16 * 2 * 64 * 2
    assert layout.allocate(5).shape == (5, 3, 2, 16, 2, 64)  # block-major


def test_layout_check_names_every_differing_field() -> None:
    other = KVLayout("tiny", "bfloat16", block_size=8, num_layers=2, num_kv_heads=2, head_dim=8)
    with pytest.raises(KVLayoutMismatch) as err:
        check_layouts(LAYOUT, other)
    assert "dtype differs: sender float32, receiver bfloat16" in str(err.value)
    assert "block_size differs: sender 4, receiver 8" in str(err.value)
    assert "head_dim" not in str(err.value)
    check_layouts(LAYOUT, KVLayout.from_dict(LAYOUT.to_dict()))


def test_ticket_rejects_repeated_blocks() -> None:
    with pytest.raises(ValueError, match="repeat"):
        TransferTicket("r", "h:1", (3, 4, 3), 12, "l")
    assert TransferTicket("r", "h:1", [5, 1], 8, "l").block_ids == (5, 1)


def test_gather_then_scatter_roundtrips_noncontiguous_and_per_layer() -> None:
    src = torch.randn(LAYOUT.cache_shape(10))
    dst = LAYOUT.allocate(12)
    scatter_blocks(dst, [11, 0, 5], gather_blocks(src, [2, 7, 3]))
    scatter_blocks(dst, [6, 7], gather_blocks(src, [8, 9], layer=1), layer=1)
    assert torch.equal(dst[[11, 0, 5]], src[[2, 7, 3]])
    assert torch.equal(dst[[6, 7], 1], src[[8, 9], 1])
    assert not dst[[6, 7], 0].any()  # layer 0 of those blocks was never sent


def test_lease_expiry_frees_blocks_with_fake_clock() -> None:
    clock = FakeClock()
    held = {"lease-a": [1, 2], "lease-b": [3], "lease-c": [4, 5]}
    free_blocks: list[int] = []
    table = LeaseTable(on_expire=lambda lease: free_blocks.extend(held.pop(lease)), clock=clock)
    table.grant("lease-a", ttl_s=5)
    table.grant("lease-b", ttl_s=10)
    table.grant("lease-c", ttl_s=5)
    clock.now += 4
    assert table.renew("lease-a")  # a's peer is alive: deadline moves to 109
    assert table.expire_stale() == []
    clock.now += 2  # 106: c (deadline 105) lapsed, a and b still live
    assert table.expire_stale() == ["lease-c"]
    assert free_blocks == [4, 5]
    assert not table.renew("lease-c")  # a peer presumed dead cannot revive freed blocks
    assert table.release("lease-b")  # normal completion: no callback
    assert table.expire_stale(now=1000.0) == ["lease-a"]
    assert sorted(free_blocks) == [1, 2, 4, 5] and held == {"lease-b": [3]} and len(table) == 0


def test_lease_rejects_nonpositive_ttl() -> None:
    with pytest.raises(ValueError):
        LeaseTable().grant("x", 0)


def test_counters_are_exact_under_concurrent_increments() -> None:
    counters = TransferCounters("shm")

    def work() -> None:
        for _ in range(1000):
            counters.add_chunk(3, 0.001)
            counters.add_transfer()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counters.add_failure()
    snap = counters.snapshot()
    assert (snap.bytes, snap.chunks, snap.transfers, snap.failures) == (24000, 8000, 8000, 1)
    assert snap.seconds == pytest.approx(8.0)


@pytest.mark.parametrize("backend", ["shm", "torch_dist"])
@pytest.mark.parametrize("field,value", [("block_size", 8), ("dtype", "bfloat16")])
def test_handshake_refuses_layout_mismatch(backend: str, field: str, value: object) -> None:
    fields = LAYOUT.to_dict() | {field: value}
    with create_receiver(backend, KVLayout.from_dict(fields), num_blocks=4) as rx:
        sender = create_sender(backend, LAYOUT, timeout_s=5)
        with pytest.raises(KVLayoutMismatch) as err:
            sender.connect(rx.endpoint)
        expected = f"{field} differs: sender {getattr(LAYOUT, field)}, receiver {value}"
        assert expected in str(err.value)
        assert rx.snapshot().failures == 1


def test_stalled_transfer_times_out_and_stray_blocks_fail() -> None:
    with create_receiver("shm", LAYOUT, num_blocks=8) as rx, create_sender("shm", LAYOUT) as tx:
        tx.connect(rx.endpoint)
        ticket = rx.issue_ticket("stall", [1, 2], num_tokens=8, lease_id="l1")
        tx.send_blocks(ticket, torch.ones(LAYOUT.cache_shape(1)), start=0)
        with pytest.raises(TransferTimeout, match="stall"):
            rx.wait("stall", timeout_s=0.3)  # the sender never says done
        assert rx.poll("stall") is TransferState.IN_PROGRESS
        # Done after only half the blocks landed is a failure, not a silent partial cache.
        tx.send_done(ticket)
        with pytest.raises(TransferError, match="never landed"):
            rx.wait("stall", timeout_s=5)
        forged = TransferTicket("stall-2", rx.endpoint, (6,), 4, "l2")
        rx.issue_ticket("stall-2", [5], num_tokens=4, lease_id="l2")
        tx.send_blocks(forged, torch.ones(LAYOUT.cache_shape(1)))
        with pytest.raises(TransferError, match="not in the ticket"):
            rx.wait("stall-2", timeout_s=5)
        assert rx.snapshot().failures == 2


def test_unknown_backend_and_lazy_import() -> None:
    with pytest.raises(ValueError, match="known: cuda_ipc, shm, torch_dist"):
        create_sender("rdma", LAYOUT)
    code = "import sys, kv_transfer; assert not any(m in sys.modules for m in ('kv_transfer.shm', 'kv_transfer.cuda_ipc', 'kv_transfer.torch_dist'))"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_kv_transfer_imports_no_other_package() -> None:
    for path in (REPO / "kv_transfer").glob("*.py"):
        text = path.read_text()
        for package in ("engine", "router", "prefill_worker", "decode_worker"):
            assert f"from {package}" not in text and f"import {package}" not in text, path


@pytest.mark.parametrize("backend", ["shm", "torch_dist"])
def test_tickets_and_senders_of_another_generation_are_refused(backend: str) -> None:
    with create_receiver(backend, LAYOUT, num_blocks=8) as rx:
        rx.generation = 2  # this receiver's worker restarted once
        tx = create_sender(backend, LAYOUT, sender_id="prefill-0", generation=5, timeout_s=5)
        try:
            tx.connect(rx.endpoint)
            old = TransferTicket("old", rx.endpoint, (1,), 4, "l-old", generation=1)
            # shm writes before the receiver sees a header: the sender itself must refuse.
            with pytest.raises(TransferError, match="stale ticket.*generation 1.*now generation 2"):
                tx.send_blocks(old, torch.ones(LAYOUT.cache_shape(1)))
            # A sender that skipped that check (or a forged header) is refused by the receiver.
            rx.issue_ticket("old", [1], num_tokens=4, lease_id="l-old")
            tx._links[rx.endpoint].generation = 1
            before = rx.kv_cache[1].clone()
            tx.send_blocks(old, torch.full(LAYOUT.cache_shape(1), 7.0))
            tx.send_done(old)
            with pytest.raises(TransferTimeout):
                rx.wait("old", timeout_s=0.5)  # nothing of it counted
            if backend == "torch_dist":  # the receiver lands the payload itself: it wrote nothing
                assert torch.equal(rx.kv_cache[1], before)
            assert rx.snapshot().failures == 2
            # An older incarnation of a sender the receiver knows a newer one of: refused at hello.
            zombie = create_sender(backend, LAYOUT, sender_id="prefill-0", generation=4, timeout_s=5)
            with pytest.raises(TransferError, match="stale sender: prefill-0 generation 4"):
                zombie.connect(rx.endpoint)
            # The registry can veto a sender too (the worker asks it whether that one is current).
            rx.peer_check = lambda sender_id, generation: "replaced" if sender_id == "prefill-1" else None
            vetoed = create_sender(backend, LAYOUT, sender_id="prefill-1", generation=9, timeout_s=5)
            with pytest.raises(TransferError, match="replaced"):
                vetoed.connect(rx.endpoint)
        finally:
            tx.close()
