"""The prefill and decode pools as Ray actors: creation, start-up handshake, routing, shutdown."""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.config import EngineConfig

logger = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ClusterStartError(RuntimeError):
    """The cluster could not come up; the message says which worker and why."""


@dataclass(frozen=True)
class PoolConfig:
    mode: str = "disaggregated"  # disaggregated: prefill + decode pools; colocated: mixed workers
    num_prefill_workers: int = 1
    num_decode_workers: int = 1
    transfer_backend: str = "shm"  # shm (one host), torch_dist (gloo / NCCL), cuda_ipc
    lease_ttl_s: float = 30.0  # reserved blocks are freed when no KV arrives for this long
    torch_threads: int | None = None  # per worker; None splits this host's cores between workers
    kv_push: str = "auto"  # prefill pushes KV per chunk or per layer; auto: layer on GPU, chunk on CPU

    def __post_init__(self) -> None:
        if self.mode not in ("disaggregated", "colocated"):
            raise ValueError(f"mode must be 'disaggregated' or 'colocated', got {self.mode!r}")
        if self.num_decode_workers < 1:
            raise ValueError("at least one decode worker is needed")
        if self.mode == "disaggregated" and self.num_prefill_workers < 1:
            raise ValueError("disaggregated mode needs at least one prefill worker")
        if self.kv_push not in ("auto", "chunk", "layer"):
            raise ValueError(f"kv_push must be 'auto', 'chunk' or 'layer', got {self.kv_push!r}")


@dataclass
class WorkerHandle:
    role: str  # prefill | decode | mixed
    index: int
    actor: Any  # a Ray actor handle
    info: dict = field(default_factory=dict)
    in_flight: int = 0
    healthy: bool = True  # False once the actor died; no new request is routed to it

    @property
    def name(self) -> str:
        return f"{self.role} worker {self.index}"


class RoutingPolicy(Protocol):
    def choose(self, workers: list[WorkerHandle], prompt_token_ids: list[int]) -> WorkerHandle: ...


class LeastLoaded:
    """The worker with the fewest requests in flight; ties go to the lowest index."""

    def choose(self, workers: list[WorkerHandle], prompt_token_ids: list[int]) -> WorkerHandle:
        return min(workers, key=lambda w: (w.in_flight, w.index))


def _actor_options(role: str, cluster: dict, ray_gpus: bool) -> dict:
    pool_resource = "prefill" if role == "prefill" else "decode"
    options: dict[str, Any] = {"num_cpus": 1, "max_concurrency": 10_000}
    if ray_gpus:
        options["num_gpus"] = 1
    if pool_resource in cluster:  # pools pinned to node types that advertise the resource
        options["resources"] = {pool_resource: 1}
    return options


class WorkerPools:
    def __init__(self, config: PoolConfig, prefill_engine: EngineConfig,
                 decode_engine: EngineConfig) -> None:
        self.config = config
        self.prefill_engine = prefill_engine
        self.decode_engine = decode_engine
        self.prefill: list[WorkerHandle] = []
        self.decode: list[WorkerHandle] = []
        self.policy: RoutingPolicy = LeastLoaded()

    @property
    def all_workers(self) -> list[WorkerHandle]:
        return self.prefill + self.decode

    async def start(self) -> None:
        """Create the actors, load models, and pre-connect every prefill worker to every
        decode worker's KV receiver (the handshake refuses layout mismatches)."""
        import ray

        from decode_worker import DecodeWorker
        from prefill_worker import PrefillWorker

        cluster = ray.cluster_resources()
        gpus = cluster.get("GPU", 0) > 0
        threads = self.config.torch_threads or self._default_threads()
        decode_role = "decode" if self.config.mode == "disaggregated" else "mixed"
        decode_cls = ray.remote(DecodeWorker)
        for i in range(self.config.num_decode_workers):
            actor = decode_cls.options(**_actor_options("decode", cluster, gpus)).remote(
                self.decode_engine, decode_role, self.config.transfer_backend,
                self.config.lease_ttl_s, threads)
            self.decode.append(WorkerHandle(decode_role, i, actor))
        if self.config.mode == "disaggregated":
            prefill_cls = ray.remote(PrefillWorker)
            for i in range(self.config.num_prefill_workers):
                actor = prefill_cls.options(**_actor_options("prefill", cluster, gpus)).remote(
                    self.prefill_engine, self.config.transfer_backend, threads,
                    self.config.lease_ttl_s / 3, self.config.kv_push)
                self.prefill.append(WorkerHandle("prefill", i, actor))
        await asyncio.gather(*(self._start_worker(w) for w in self.all_workers))
        endpoints = [w.info["endpoint"] for w in self.decode]
        await asyncio.gather(*(self._connect(w, endpoints) for w in self.prefill))

    def _default_threads(self) -> int:
        workers = self.config.num_decode_workers + (
            self.config.num_prefill_workers if self.config.mode == "disaggregated" else 0)
        return max(1, (os.cpu_count() or 1) // workers)

    async def _start_worker(self, worker: WorkerHandle) -> None:
        try:
            worker.info = await worker.actor.start.remote()
        except Exception as err:
            raise ClusterStartError(f"{worker.name} failed to start: {_root_cause(err)}") from err
        logger.info("%s ready: %s", worker.name, worker.info["layout"])

    async def _connect(self, worker: WorkerHandle, endpoints: list[str]) -> None:
        try:
            await worker.actor.connect.remote(endpoints)
        except Exception as err:
            raise ClusterStartError(
                f"{worker.name} refused the decode pool's KV layout: {_root_cause(err)}") from err

    @property
    def max_model_len(self) -> int:
        return min(w.info["max_model_len"] for w in self.all_workers)

    @property
    def model_name(self) -> str:
        return self.decode[0].info["layout"]["model"]

    def choose(self, workers: list[WorkerHandle], prompt_token_ids: list[int]) -> WorkerHandle | None:
        """A healthy worker picked by the policy, or None when the pool has none left."""
        healthy = [w for w in workers if w.healthy]
        return self.policy.choose(healthy, prompt_token_ids) if healthy else None

    async def stats(self) -> dict[str, list]:
        prefill = await asyncio.gather(*(w.actor.stats.remote() for w in self.prefill))
        decode = await asyncio.gather(*(w.actor.stats.remote() for w in self.decode))
        return {"prefill": list(prefill), "decode": list(decode)}

    async def shutdown(self) -> None:
        import ray

        for worker in self.all_workers:
            try:
                await asyncio.wait_for(worker.actor.shutdown.remote(), 10)
            except Exception as err:  # a dead worker needs no shutdown
                logger.debug("%s shutdown: %s", worker.name, err)
            ray.kill(worker.actor)


def _root_cause(err: BaseException) -> str:
    """The worker-side exception's own message, without Ray's traceback wrapping."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    return str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
