"""What the worker pools are made of: their sizes, the KV transfer between them, leases."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PoolConfig:
    mode: str = "disaggregated"  # disaggregated: prefill + decode pools; colocated: mixed workers
    num_prefill_workers: int = 1
    num_decode_workers: int = 1
    # auto: per pair, shm / CUDA IPC on one node, torch_dist across nodes; or one backend for all
    transfer_backend: str = "auto"
    # Blocks reserved for KV that stops coming (its prefill worker died) are freed after this;
    # the prefill worker renews every third of it.
    lease_ttl_s: float = 6.0
    torch_threads: int | None = None  # per worker; None splits this host's cores between workers
    kv_push: str = "auto"  # prefill pushes KV per chunk or per layer; auto: chunk everywhere for now
    # Registry lease of a worker: it leaves routing this long after its last heartbeat.
    registry_ttl_s: float = 3.0
    publish_interval_s: float = 0.1  # workers publish load and KV events at least this often
    router_lease_s: float = 10.0  # workers abort the requests of a router silent this long
    calibrate: bool = True  # workers time a prefill and a few decode steps at start
    # Pin each pool to nodes advertising its Ray resource (`prefill` / `decode`): "auto" when some
    # node advertises it when the pools are created, "always" (workers wait for such nodes, e.g.
    # while an autoscaler brings them up), "never".
    pin_pools: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in ("disaggregated", "colocated"):
            raise ValueError(f"mode must be 'disaggregated' or 'colocated', got {self.mode!r}")
        if self.num_decode_workers < 1:
            raise ValueError("at least one decode worker is needed")
        if self.mode == "disaggregated" and self.num_prefill_workers < 1:
            raise ValueError("disaggregated mode needs at least one prefill worker")
        if self.kv_push not in ("auto", "chunk", "layer"):
            raise ValueError(f"kv_push must be 'auto', 'chunk' or 'layer', got {self.kv_push!r}")
        if not 0 < self.registry_ttl_s <= 5:
            raise ValueError(f"the registry lease must be in (0, 5] seconds, got {self.registry_ttl_s}")
        if self.pin_pools not in ("auto", "always", "never"):
            raise ValueError(f"pin_pools must be 'auto', 'always' or 'never', got {self.pin_pools!r}")
        if not 0 < self.publish_interval_s < self.registry_ttl_s:
            raise ValueError("the publish interval must be positive and shorter than the registry lease")

    @property
    def num_workers(self) -> int:
        return self.num_decode_workers + (self.num_prefill_workers if self.mode == "disaggregated" else 0)

    @property
    def decode_role(self) -> str:
        return "decode" if self.mode == "disaggregated" else "mixed"
