"""The one key schema. Every key of a cluster is `pdserve:{cluster}:...`, so clusters that share
one Redis never see each other's state, and `pdserve down` can find all of a cluster's keys.

| key | type | written by | lifetime |
|---|---|---|---|
| worker:{id} | hash: generation, record (JSON), load (JSON) | the worker; load every publish interval | lease: expires unless heartbeats renew it |
| generation:{id} | integer | the worker, INCR at every (re)start | permanent |
| kv_blocks:{id}:{generation} | set of 8-byte block hashes | the worker | expires with the lease |
| kv_seq:{id}:{generation} | integer: the last KV event batch applied to the set | the worker | expires with the lease |
| kv_events | stream of KV event batches (every worker) | the workers | trimmed to a bounded length |
| workers | set of worker ids ever registered | the worker | permanent (records tell who is live) |
| router:{id} | hash: record (JSON) | the router | lease |
| routers | set of router ids | the router | permanent |
| pools | string (JSON pool spec) | the router that created the pools | until `pdserve down` |
| pools_lock | string (router id) | the router creating the pools | expires (a crashed creator frees it) |
"""
from __future__ import annotations

from dataclasses import dataclass

PREFIX = "pdserve"
DEFAULT_CLUSTER_NAME = "pdserve"


@dataclass(frozen=True)
class ClusterKeys:
    cluster_name: str = DEFAULT_CLUSTER_NAME

    def __post_init__(self) -> None:
        name = self.cluster_name
        if not name or any(c in name for c in ":{} \t\n*?[]") or len(name) > 64:
            raise ValueError(
                f"cluster name must be 1-64 characters without spaces, ':', braces or glob "
                f"characters, got {name!r}")

    @property
    def base(self) -> str:
        return f"{PREFIX}:{self.cluster_name}"

    # --- workers ---------------------------------------------------------------------
    def worker(self, worker_id: str) -> str:
        return f"{self.base}:worker:{worker_id}"

    def generation(self, worker_id: str) -> str:
        return f"{self.base}:generation:{worker_id}"

    @property
    def workers(self) -> str:
        return f"{self.base}:workers"

    # --- KV block index ----------------------------------------------------------------
    def kv_blocks(self, worker_id: str, generation: int) -> str:
        return f"{self.base}:kv_blocks:{worker_id}:{generation}"

    def kv_seq(self, worker_id: str, generation: int) -> str:
        return f"{self.base}:kv_seq:{worker_id}:{generation}"

    @property
    def kv_events(self) -> str:
        return f"{self.base}:kv_events"

    # --- routers and pools -------------------------------------------------------------
    def router(self, router_id: str) -> str:
        return f"{self.base}:router:{router_id}"

    @property
    def routers(self) -> str:
        return f"{self.base}:routers"

    @property
    def pools(self) -> str:
        return f"{self.base}:pools"

    @property
    def pools_lock(self) -> str:
        return f"{self.base}:pools_lock"

    @property
    def pattern(self) -> str:
        """A SCAN pattern matching every key of this cluster."""
        return f"{self.base}:*"
