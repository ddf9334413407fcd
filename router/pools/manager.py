"""The worker pools of one cluster: created by the first router, attached to by the others.

The first router (it finds no pool spec in Redis) takes the creation lock, creates every worker
as a named, detached Ray actor, writes the pool spec and waits for the workers to start. A later
router finds the spec and attaches to the same actors. A router that stops as the last live one
takes the pools down; a router that is killed takes nothing with it (`pdserve down` stops
orphaned pools).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass

from cluster_state.agent import AgentConfig
from cluster_state.routers import PoolSpec, RouterRegistry
from cluster_state.worker_spec import WorkerSpec
from engine.config import EngineConfig
from router.pools.actors import actor_name, create_actor, find_actor, kill_actor
from router.pools.config import PoolConfig
from router.pools.handle import WorkerHandle
from router.pools.view import ClusterView

logger = logging.getLogger(__name__)

CREATION_LOCK_S = 900.0  # long enough to load a large model; frees itself if the creator dies


class ClusterStartError(RuntimeError):
    """The cluster could not come up; the message says which worker and why."""


@dataclass(frozen=True)
class ClusterContext:
    redis_url: str
    cluster_name: str
    router_id: str
    local_ray: bool = True  # a private Ray instance on this host (no --ray-address)


class WorkerPools:
    def __init__(self, config: PoolConfig, prefill_engine: EngineConfig, decode_engine: EngineConfig,
                 context: ClusterContext, view: ClusterView, routers: RouterRegistry) -> None:
        self.config = config
        self.prefill_engine = prefill_engine
        self.decode_engine = decode_engine
        self.context = context
        self.view = view
        self.routers = routers
        self.spec: PoolSpec | None = None
        self.created = False  # this router created the pools

    # --- the pools' workers -------------------------------------------------------------
    @property
    def decode(self) -> list[WorkerHandle]:
        role = self.spec.mode == "disaggregated" and "decode" or "mixed"
        return sorted(self.view.of_role(role, routable_only=False), key=lambda w: w.index)

    @property
    def prefill(self) -> list[WorkerHandle]:
        return sorted(self.view.of_role("prefill", routable_only=False), key=lambda w: w.index)

    @property
    def all_workers(self) -> list[WorkerHandle]:
        return self.prefill + self.decode

    @property
    def mode(self) -> str:
        return self.spec.mode

    @property
    def max_model_len(self) -> int:
        return min(w.info["max_model_len"] for w in self.all_workers if w.info)

    @property
    def model_name(self) -> str:
        return next(w.info["layout"]["model"] for w in self.decode if w.info)

    # --- coming up ----------------------------------------------------------------------
    async def start(self, join: bool = False) -> None:
        """Attach to the cluster's pools, or create them when there are none (not with join)."""
        if await self._attach_if_present():
            return
        if join:
            raise ClusterStartError(
                f"--join: cluster {self.context.cluster_name!r} has no worker pools; start its "
                "first router without --join")
        while not await self.routers.lock_pools(CREATION_LOCK_S):
            logger.info("another router is creating the pools; waiting to attach")
            await asyncio.sleep(1.0)
            if await self._attach_if_present():
                return
        try:
            if not await self._attach_if_present():
                await self._create()
        finally:
            await self.routers.unlock_pools()

    async def _attach_if_present(self) -> bool:
        spec = await self.routers.read_pools()
        if spec is None:
            return False
        actors = {worker_id: find_actor(name) for worker_id, name in spec.workers.items()}
        if any(actor is None for actor in actors.values()):
            logger.warning("cluster %r: the pool spec names actors that are gone; it is stale",
                           self.context.cluster_name)
            return False
        self.spec = spec
        handles = [self.view.add(WorkerHandle(worker_id, worker_id.rsplit("-", 1)[0], actor))
                   for worker_id, actor in actors.items()]
        await self._start_all(handles)
        logger.info("attached to the %d workers of cluster %r", len(handles), self.context.cluster_name)
        return True

    async def _create(self) -> None:
        import ray

        specs = self._worker_specs()
        # This router holds the creation lock and no live pool spec exists, so an actor already
        # under one of these names is an orphan of a dead cluster of the same name.
        await asyncio.gather(*(remove_orphan(spec.actor_name) for spec in specs))
        cluster = ray.cluster_resources()
        gpus = cluster.get("GPU", 0) > 0
        actors = {spec.worker_id: create_actor(spec, cluster, gpus, self.config.pin_pools) for spec in specs}
        self.spec = PoolSpec(mode=self.config.mode, model=self.decode_engine.model,
                             workers={spec.worker_id: spec.actor_name for spec in specs},
                             created_by=self.context.router_id, created_at=time.time(),
                             options={"pools": repr(self.config), "engine": repr(self.decode_engine)})
        await self.routers.write_pools(self.spec)
        self.created = True
        handles = [self.view.add(WorkerHandle(spec.worker_id, spec.role, actors[spec.worker_id]))
                   for spec in specs]
        try:
            await self._start_all(handles)
            await self._check_layouts()
        except BaseException:
            await self.take_down()
            raise

    def _worker_specs(self) -> list[WorkerSpec]:
        config = self.config
        threads = config.torch_threads or max(1, (os.cpu_count() or 1) // config.num_workers)
        agent = AgentConfig(publish_interval_s=config.publish_interval_s, lease_ttl_s=config.registry_ttl_s)
        # On a private local Ray every worker shares this host: their KV endpoints stay on loopback.
        host = "127.0.0.1" if self.context.local_ray else None
        common = dict(transfer_backend=config.transfer_backend, lease_ttl_s=config.lease_ttl_s, host=host,
                      torch_threads=threads, kv_push=config.kv_push, redis_url=self.context.redis_url,
                      cluster_name=self.context.cluster_name, agent=agent, calibrate=config.calibrate,
                      router_lease_s=config.router_lease_s)
        roles = [(config.decode_role, config.num_decode_workers, self.decode_engine)]
        if config.mode == "disaggregated":
            roles.append(("prefill", config.num_prefill_workers, self.prefill_engine))
        return [WorkerSpec(worker_id=f"{role}-{i}", role=role, engine=engine,
                           actor_name=actor_name(self.context.cluster_name, f"{role}-{i}"), **common)
                for role, count, engine in roles for i in range(count)]

    async def _start_all(self, handles: list[WorkerHandle]) -> None:
        await asyncio.gather(*(self._start_worker(w) for w in handles))

    async def _start_worker(self, worker: WorkerHandle) -> None:
        try:
            worker.info = await worker.actor.start.remote()
        except Exception as err:
            raise ClusterStartError(f"{worker.name} failed to start: {root_cause(err)}") from err
        logger.info("%s ready (generation %d): %s", worker.name, worker.generation, worker.info["layout"])

    async def _check_layouts(self) -> None:
        """Pre-connect every prefill worker to every decode worker's KV receiver; the handshake
        refuses (and names) any difference in KV layout."""
        peers = [{"endpoints": w.info["endpoints"], "node": w.info["node"]} for w in self.decode
                 if w.info.get("endpoints")]
        for worker in self.prefill:
            try:
                await worker.actor.connect.remote(peers)
            except Exception as err:
                raise ClusterStartError(
                    f"{worker.name} refused the decode pool's KV layout: {root_cause(err)}") from err

    # --- inspection and going down -------------------------------------------------------
    async def stats(self) -> dict[str, list]:
        prefill = await asyncio.gather(*(w.actor.stats.remote() for w in self.prefill))
        decode = await asyncio.gather(*(w.actor.stats.remote() for w in self.decode))
        return {"prefill": list(prefill), "decode": list(decode)}

    async def take_down(self, timeout_s: float = 15.0) -> None:
        """Stop every worker of the pools (a clean shutdown first, all at once, then kill) and
        forget the pool spec."""
        workers = self.all_workers
        calls = [asyncio.ensure_future(_shutdown(w)) for w in workers]
        if calls:
            # asyncio.wait, not wait_for: a call that does not finish is left, never cancelled
            # and waited on; the kill below ends it either way.
            await asyncio.wait(calls, timeout=timeout_s)
        for worker in workers:
            kill_actor(worker.actor, worker.worker_id)
        try:
            await self.routers.forget_pools()
        except Exception as err:
            logger.warning("could not remove the pool spec from Redis: %s", err)


async def _shutdown(worker: WorkerHandle) -> None:
    try:
        await worker.actor.shutdown.remote()
    except Exception as err:  # a dead worker needs no shutdown
        logger.debug("%s shutdown: %s", worker.name, err)


async def remove_orphan(name: str, timeout_s: float = 30.0) -> None:
    actor = find_actor(name)
    if actor is None:
        return
    logger.warning("removing %s, left behind by a dead cluster of the same name", name)
    kill_actor(actor, name)
    deadline = time.monotonic() + timeout_s
    while find_actor(name) is not None:  # the name is released once the actor is gone
        if time.monotonic() > deadline:
            raise ClusterStartError(f"the actor name {name} is still taken after {timeout_s:.0f}s")
        await asyncio.sleep(0.1)


def root_cause(err: BaseException) -> str:
    """The worker-side exception's own message, without Ray's traceback wrapping."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    return str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
