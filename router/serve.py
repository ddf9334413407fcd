"""`pdserve serve`: Ray, the worker pools, the cluster backend and the gRPC server, in one process."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

from engine.config import EngineConfig
from router.cluster_backend import ClusterBackend
from router.pools import REPO_ROOT, ClusterStartError, PoolConfig, WorkerPools

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    # Decode workers normally run the same engine config; a different one is for tests and
    # experiments, and the KV handshake refuses it when the cache layouts differ.
    decode_engine: EngineConfig | None = None
    pools: PoolConfig = field(default_factory=PoolConfig)
    host: str = "0.0.0.0"
    grpc_port: int = 50051
    ray_address: str | None = None  # None: start a private local Ray instance
    max_in_flight: int = 256

    def __post_init__(self) -> None:
        if self.decode_engine is not None and self.decode_engine.model != self.engine.model:
            raise ValueError("prefill and decode workers must serve the same model")


def init_ray(address: str | None, num_workers: int) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    # Workers import pdserve from this checkout even when it is not pip-installed.
    pythonpath = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    # "local": a private instance of our own, even when `ray start` left a cluster (or the
    # address file of a dead one) on this machine; plain ray.init() would try to join it.
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, num_workers),  # one logical CPU per worker actor
        include_dashboard=False,
        logging_level=logging.WARNING,
        object_store_memory=256 * 2**20,  # workers pass small messages; KV moves outside Ray
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
    )


def load_tokenizer(model: str):
    from engine.loader import resolve_model_path
    from engine.tokenizer import Tokenizer

    path = resolve_model_path(model)
    return Tokenizer.from_gguf(path) if path.endswith(".gguf") else Tokenizer.from_hf_dir(path)


@asynccontextmanager
async def running_cluster(config: ServeConfig) -> AsyncIterator[ClusterBackend]:
    """Ray (local unless an address is given), both pools started and connected, a backend."""
    pool_cfg = config.pools
    num_workers = pool_cfg.num_decode_workers + (
        pool_cfg.num_prefill_workers if pool_cfg.mode == "disaggregated" else 0)
    init_ray(config.ray_address, num_workers)
    pools = WorkerPools(pool_cfg, config.engine, config.decode_engine or config.engine)
    try:
        await pools.start()
        backend = ClusterBackend(pools, config.max_in_flight)
        await backend.start()
        try:
            yield backend
        finally:
            await backend.close()
    finally:
        await pools.shutdown()


async def serve(config: ServeConfig) -> int:
    from router.grpc_server import serve_grpc

    log = lambda msg: print(f"[pdserve] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"starting {config.pools.mode} cluster: model {config.engine.model}, "
        f"{config.pools.num_prefill_workers if config.pools.mode == 'disaggregated' else 0} prefill + "
        f"{config.pools.num_decode_workers} {'decode' if config.pools.mode == 'disaggregated' else 'mixed'} "
        f"worker(s), KV transfer over {config.pools.transfer_backend}")
    try:
        check_port_free(config.host, config.grpc_port)
    except OSError as err:
        log(f"error: cannot listen on {config.host}:{config.grpc_port}: {err.strerror or err}")
        return 1
    tokenizer = await asyncio.to_thread(load_tokenizer, config.engine.model)
    try:
        async with running_cluster(config) as backend:
            task = asyncio.current_task()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, task.cancel)
            try:
                await serve_grpc(backend, tokenizer, config.host, config.grpc_port,
                                 on_started=lambda port: log(f"serving gRPC on {config.host}:{port}"))
            except asyncio.CancelledError:
                log("shutting down")
    except (ClusterStartError, RuntimeError) as err:
        log(f"error: {err}")
        return 1
    return 0


def check_port_free(host: str, port: int) -> None:
    """Fail before minutes of model loading, not after, when the port is taken."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, port))
