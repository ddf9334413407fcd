"""Routing policies: round_robin, least_loaded and kv_aware, behind one interface.

kv_aware predicts each worker's cost for the request in prompt tokens: the tokens it would
have to compute (the prompt less the longest prefix the block index says it caches) plus its
queued work. A guard keeps a hot prefix from piling every request onto the worker that caches
it: a worker whose load is well above the least loaded one's is passed over, so the prefix
spreads to a second worker once the first is busy.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from router.pools.handle import WorkerHandle
from router.routing.cost import load_of, prefill_s_per_token

POLICIES = ("kv_aware", "least_loaded", "round_robin")


@dataclass
class RoutingRequest:
    """What a policy may look at: the prompt and, per worker, its cached prefix (in blocks)."""

    prompt_len: int
    cached_blocks: dict[tuple[str, int], int] = field(default_factory=dict)  # worker key -> blocks

    def cached_tokens(self, worker: WorkerHandle) -> int:
        blocks = self.cached_blocks.get(worker.key, 0)
        # The last prompt token is always computed: its logits give the first output token.
        return min(blocks * worker.block_size, self.prompt_len - 1)

    def uncached_tokens(self, worker: WorkerHandle) -> int:
        return self.prompt_len - self.cached_tokens(worker)


class RoutingPolicy(Protocol):
    name: str

    def choose(self, workers: Sequence[WorkerHandle], request: RoutingRequest) -> WorkerHandle: ...


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._turns: dict[str, itertools.count] = {}

    def choose(self, workers: Sequence[WorkerHandle], request: RoutingRequest) -> WorkerHandle:
        ordered = sorted(workers, key=lambda w: w.index)
        turn = self._turns.setdefault(ordered[0].role, itertools.count())
        return ordered[next(turn) % len(ordered)]


class LeastLoaded:
    """The worker with the fewest requests; ties go to the lowest index."""

    name = "least_loaded"

    def choose(self, workers: Sequence[WorkerHandle], request: RoutingRequest) -> WorkerHandle:
        return min(workers, key=lambda w: (load_of(w), w.queued_prefill_tokens, w.index))


@dataclass
class KVAware:
    name = "kv_aware"
    # The guard: a worker more than this many requests above the least loaded one, and above
    # `balance_ratio` times its load, is not chosen for its cache.
    balance_margin: int = 4
    balance_ratio: float = 1.5

    def cost_tokens(self, worker: WorkerHandle, request: RoutingRequest) -> float:
        """Prompt tokens to compute here plus the worker's queued work, in prompt tokens: its
        queued prefill tokens, and its running decodes as the prefill tokens a step of them costs."""
        per_token = prefill_s_per_token(worker)
        decode_tokens = worker.load.num_running * worker.load.decode_s_per_seq / per_token
        return request.uncached_tokens(worker) + worker.queued_prefill_tokens + decode_tokens

    def choose(self, workers: Sequence[WorkerHandle], request: RoutingRequest) -> WorkerHandle:
        lightest = min(load_of(w) for w in workers)
        bound = max(lightest + self.balance_margin, lightest * self.balance_ratio)
        balanced = [w for w in workers if load_of(w) <= bound]
        return min(balanced, key=lambda w: (self.cost_tokens(w, request), load_of(w), w.index))


def make_policy(name: str) -> RoutingPolicy:
    if name == "round_robin":
        return RoundRobin()
    if name == "least_loaded":
        return LeastLoaded()
    if name == "kv_aware":
        return KVAware()
    raise ValueError(f"routing policy must be one of {', '.join(POLICIES)}, got {name!r}")
