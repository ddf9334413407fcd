"""Worker actors on Ray: their names, resource requests, creation, lookup and removal.

Workers are named, detached actors in the `pdserve` namespace (`{cluster}/{worker_id}`), so any
router of the cluster can find them and none of them dies with the router that created them.
Ray restarts a killed worker (max_restarts=-1) with the same spec; the new incarnation starts
and registers by itself. Calls are never retried by Ray (max_task_retries=0): a call that hit a
dead worker fails, and the router decides what to do.
"""
from __future__ import annotations

import logging
from typing import Any

from cluster_state.worker_spec import WorkerSpec
from router.pools.view import RAY_NAMESPACE

logger = logging.getLogger(__name__)


def actor_name(cluster_name: str, worker_id: str) -> str:
    return f"{cluster_name}/{worker_id}"


def actor_options(role: str, cluster: dict, ray_gpus: bool, pin: str = "auto") -> dict:
    """Resource requests: a GPU when the cluster has them, and the pool's custom resource
    (`prefill` / `decode`) when nodes advertise it (pin "auto") or always (pin "always": the
    worker waits until such a node joins), so pools can be pinned to node types."""
    pool_resource = "prefill" if role == "prefill" else "decode"
    options: dict[str, Any] = {"num_cpus": 1, "max_concurrency": 10_000}
    if ray_gpus:
        options["num_gpus"] = 1
    if pin == "always" or (pin == "auto" and pool_resource in cluster):
        options["resources"] = {pool_resource: 1}
    return options


def create_actor(spec: WorkerSpec, cluster: dict, ray_gpus: bool, pin: str = "auto"):
    import ray

    from decode_worker import DecodeWorker
    from prefill_worker import PrefillWorker

    cls = PrefillWorker if spec.role == "prefill" else DecodeWorker
    return ray.remote(cls).options(
        name=spec.actor_name, namespace=RAY_NAMESPACE, lifetime="detached", max_restarts=-1,
        max_task_retries=0, **actor_options(spec.role, cluster, ray_gpus, pin)).remote(spec)


def find_actor(name: str):
    """The named actor, or None when there is none."""
    import ray

    try:
        return ray.get_actor(name, namespace=RAY_NAMESPACE)
    except ValueError:
        return None


def kill_actor(actor, name: str) -> None:
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception as err:  # already gone
        logger.debug("killing %s: %s", name, err)
