"""What a worker actor is created with: all of it, because Ray re-runs the constructor with the
same arguments when it restarts a dead worker, and the new incarnation must find its way back
into the cluster (Redis, its name, its role) from them alone."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cluster_state.agent import AgentConfig
from cluster_state.keys import DEFAULT_CLUSTER_NAME

ROLES = ("prefill", "decode", "mixed")


@dataclass(frozen=True)
class WorkerSpec:
    worker_id: str  # stable across restarts: "prefill-0", "decode-1", "mixed-0"
    role: str  # prefill | decode | mixed (colocated: prefills and decodes, no KV receiver)
    engine: Any  # engine.config.EngineConfig (kept opaque here: this package imports no engine)
    transfer_backend: str = "shm"
    lease_ttl_s: float = 30.0  # a decode worker frees blocks reserved for KV that stops coming
    torch_threads: int | None = None
    kv_push: str = "auto"  # prefill: push KV per chunk or per layer
    redis_url: str | None = None  # None: no cluster state (a worker driven directly, in tests)
    cluster_name: str = DEFAULT_CLUSTER_NAME
    actor_name: str = ""
    host: str | None = None  # address the KV endpoints listen on; None: this node's IP
    agent: AgentConfig = field(default_factory=AgentConfig)
    calibrate: bool = True  # measure a prefill and a few decode steps at start (seeds the cost fit)
    # A router that stops polling for this long is presumed dead: its requests here are aborted.
    router_lease_s: float = 10.0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"worker role must be one of {', '.join(ROLES)}, got {self.role!r}")
