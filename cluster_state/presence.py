"""How a worker actor joins the cluster: its registry record, its agent, its load report.

Shared by the prefill and the decode worker. The engine is used through its attributes only
(kv_layout_fields, kv_shape, max_model_len, config), so this package still imports no engine.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from cluster_state.agent import WorkerAgent
from cluster_state.connection import RedisSettings
from cluster_state.keys import ClusterKeys
from cluster_state.load import LoadReport
from cluster_state.registry import WorkerRecord
from cluster_state.worker_spec import WorkerSpec

_REPORT_FIELDS = frozenset(f.name for f in dataclasses.fields(LoadReport))


def node_ip() -> str:
    """This node's address as Ray knows it (what peers on other nodes reach), else loopback."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # not in a Ray worker
        pass
    return "127.0.0.1"


def worker_node(spec: WorkerSpec) -> str:
    """The address this worker's KV endpoints listen on and that its peers compare nodes by."""
    return spec.host or node_ip()


def registry_record(spec: WorkerSpec, engine: Any, receivers: Any | None) -> WorkerRecord:
    """The record a worker registers (generation 0: the agent takes one)."""
    endpoints = receivers.endpoints if receivers is not None else {}
    return WorkerRecord(
        worker_id=spec.worker_id, role=spec.role, actor_name=spec.actor_name, node_ip=worker_node(spec),
        pid=os.getpid(), endpoint=next(iter(endpoints.values()), None), endpoints=endpoints,
        transfer_backend=spec.transfer_backend, kv_layout=engine.kv_layout_fields(),
        max_num_seqs=engine.config.scheduler.max_num_seqs, num_blocks=engine.kv_shape.num_blocks,
        bytes_per_block=engine.kv_shape.bytes_per_block, max_model_len=engine.max_model_len,
        started_at=time.time())


def load_report(engine_load: Any, **extra: Any) -> LoadReport:
    """An engine.step_stats.EngineLoad as the LoadReport routers read. It is dated when the
    engine took it, not when it is sent: while a step runs, the worker keeps sending the
    snapshot taken before the step, and what reached it since is not in that snapshot."""
    fields = {k: v for k, v in dataclasses.asdict(engine_load).items() if k in _REPORT_FIELDS}
    return LoadReport(**fields, **extra, published_at=engine_load.taken_at or time.time())


async def start_agent(spec: WorkerSpec, background: Any, record: WorkerRecord, secret: bytes | None,
                      extra_load=None) -> WorkerAgent:
    """Register (a new generation) and return the agent; the caller runs agent.run()."""
    agent = WorkerAgent.for_engine(RedisSettings.from_url(spec.redis_url), ClusterKeys(spec.cluster_name),
                                   record, background, spec.agent, extra_load)
    agent.secret = secret
    await agent.register()
    return agent


async def fetch_cluster_secret(spec: WorkerSpec, timeout_s: float = 60.0) -> bytes | None:
    """The cluster's KV transfer secret (None without Redis: a worker driven directly in a test
    keeps kv_transfer's default), waiting for Redis with backoff."""
    import asyncio

    from cluster_state.connection import Backoff, connect, is_redis_error
    from cluster_state.secret import ensure_cluster_secret

    if not spec.redis_url:
        return None
    redis = connect(RedisSettings.from_url(spec.redis_url))
    backoff, deadline = Backoff(), time.monotonic() + timeout_s
    try:
        while True:
            try:
                return await ensure_cluster_secret(redis, ClusterKeys(spec.cluster_name))
            except Exception as err:
                if not is_redis_error(err) or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(backoff.next_delay())
    finally:
        await redis.aclose()
