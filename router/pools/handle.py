"""A worker as one router sees it: the actor, its registry record, its latest load, and what this
router has sent it that the load does not show yet."""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any

from cluster_state.load import LoadReport
from cluster_state.registry import WorkerRecord


# A prompt sent at t is in the worker's load snapshots from about t + this on (the actor call,
# the hop to its engine thread); one sent within it before a report may be counted twice.
ADMIT_LAG_S = 0.02
_send_ids = itertools.count()


class ArrivalRate:
    """Requests a worker takes in per second (from every router), from the counts in its load
    reports: an exponentially decaying count of arrivals over a time constant of `window_s`."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.per_s = 0.0
        self._count: int | None = None  # requests_taken of the last report
        self._at = 0.0

    def observe(self, requests_taken: int, at: float) -> None:
        if self._count is None or requests_taken < self._count:  # the first report, or a restart
            self._count, self._at = requests_taken, at
            return
        if at <= self._at:
            return
        self.per_s = (self.per_s * math.exp(-(at - self._at) / self.window_s)
                      + (requests_taken - self._count) / self.window_s)
        self._count, self._at = requests_taken, at


@dataclass(eq=False)
class WorkerHandle:
    worker_id: str  # "decode-0": stable across the worker's restarts
    role: str  # prefill | decode | mixed
    actor: Any  # the Ray actor handle (the same object across restarts)
    record: WorkerRecord | None = None  # from the registry; None until the worker registered
    load: LoadReport = field(default_factory=LoadReport)
    info: dict = field(default_factory=dict)  # what start() returned
    registered: bool = False  # in the registry at the last read (its lease is live)
    healthy: bool = True  # False after a call found the actor dead, until it registers again
    in_flight: int = 0  # this router's requests on it
    pending_admissions: int = 0  # admits sent to it that have not answered yet
    pending_blocks: int = 0  # KV blocks those admits will take
    prefill_sends: dict = field(default_factory=dict)  # send id -> (time.time() sent, tokens), not done yet
    refused_at: float | None = None  # last "no room" answer; the worker counts as full until newer load
    arrivals: ArrivalRate = field(default_factory=ArrivalRate)

    @property
    def index(self) -> int:
        return int(self.worker_id.rsplit("-", 1)[-1])

    @property
    def name(self) -> str:
        return f"{self.role} worker {self.index}"

    @property
    def generation(self) -> int:
        if self.record is not None:
            return self.record.generation
        return int(self.info.get("generation", 0))

    @property
    def key(self) -> tuple[str, int]:
        return self.worker_id, self.generation

    @property
    def node(self) -> str | None:
        """The address its KV endpoints listen on (what picks the backend of a pair)."""
        return self.record.node_ip if self.record is not None else self.info.get("node")

    @property
    def block_size(self) -> int:
        layout = self.info.get("layout") or (self.record.kv_layout if self.record else {})
        return int(layout.get("block_size", 16))

    def update_load(self, report: LoadReport) -> None:
        """Keep the newest report (registry, admit replies and token batches all carry one)."""
        if report.published_at >= self.load.published_at:
            self.load = report
            self.arrivals.observe(report.requests_taken, report.published_at)
            if self.refused_at is not None and report.published_at > self.refused_at:
                self.refused_at = None

    def mark_refused(self) -> None:
        self.refused_at = time.time()

    def prefill_sent(self, tokens: int) -> int:
        """Count a prefill of `tokens` this router just sent the worker; the id for prefill_done."""
        send_id = next(_send_ids)
        self.prefill_sends[send_id] = (time.time(), tokens)
        return send_id

    def prefill_done(self, send_id: int) -> None:
        del self.prefill_sends[send_id]

    @property
    def prefill_tokens_in_flight(self) -> int:
        """Prompt tokens this router sent the worker to prefill, not done yet."""
        return sum(tokens for _, tokens in self.prefill_sends.values())

    @property
    def queued_prefill_tokens(self) -> int:
        """Prompt tokens still to compute on the worker: what it published (what is left of the
        prompts it holds, those in progress included), plus the prompts this router sent it that
        the report cannot show yet, sent after it was taken. A prompt in progress thus counts by
        what is left of it, not whole. (The two clocks compared are the router's and the
        worker's wall clocks, as the registry's leases assume them in step.)"""
        taken = self.load.published_at - ADMIT_LAG_S
        unseen = sum(tokens for sent_at, tokens in self.prefill_sends.values() if sent_at > taken)
        return self.load.queued_prefill_tokens + unseen

    @property
    def num_requests(self) -> int:
        """Requests on the worker, counted alike by every router, plus what this router sent
        that the published load does not show yet."""
        return max(self.load.num_unfinished, self.in_flight) + self.pending_admissions

    @property
    def free_slots(self) -> int:
        """Sequence slots free now, less the admits in flight; 0 after a refusal until newer load."""
        if self.refused_at is not None:
            return 0
        return self.load.free_slots - self.pending_admissions

    @property
    def free_blocks(self) -> int:
        if self.refused_at is not None:
            return 0
        return self.load.num_free_blocks - self.pending_blocks
