"""`pdserve serve`: Ray, Redis, the worker pools, the cluster backend and the gRPC server.

One router process. It starts a private Ray instance (or joins one with --ray-address) and a
private redis-server (or uses --redis-url), registers itself, then creates the cluster's worker
pools or attaches to the ones an earlier router of the same cluster created. Stopping it as the
last router of the cluster takes the pools down; other routers keep them.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

from cluster_state import ClusterKeys, RedisSettings, connect, redacted_url
from cluster_state.aio import stop_tasks
from cluster_state.block_index import BlockIndexFollower
from cluster_state.journal import RequestJournal
from cluster_state.keys import DEFAULT_CLUSTER_NAME
from cluster_state.presence import node_ip
from cluster_state.registry import WorkerRegistry
from cluster_state.routers import RouterRegistry
from cluster_state.secret import ensure_cluster_secret, restore_cluster_secret
from cluster_state.server import PrivateRedis
from engine.config import EngineConfig
from router.cluster_backend import ClusterBackend, RoutingConfig
from router.http.server import DEFAULT_MAX_BODY_BYTES
from router.limits import RequestLimits
from router.pools import ClusterContext, ClusterStartError, ClusterView, PoolConfig, WorkerPools
from router.security import Gatekeeper, SecurityConfig, TlsError

logger = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUTER_LEASE_S = 5.0  # a router's registry record outlives its last heartbeat by this much
ROUTER_HEARTBEAT_S = 1.0


@dataclass(frozen=True)
class ServeConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    # Decode workers normally run the same engine config; a different one is for tests and
    # experiments, and the KV handshake refuses it when the cache layouts differ.
    decode_engine: EngineConfig | None = None
    pools: PoolConfig = field(default_factory=PoolConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    host: str = "0.0.0.0"
    grpc_port: int = 50051
    http_port: int = 8000  # the OpenAI-compatible HTTP API; -1: no HTTP server
    # max_tokens of a request that names none; None: the rest of the context (as vLLM does)
    default_max_tokens: int | None = None
    max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # HTTP bodies past this get a 413
    ray_address: str | None = None  # None: start a private local Ray instance
    redis_url: str | None = None  # None: start a private redis-server, owned by this router
    cluster_name: str = DEFAULT_CLUSTER_NAME
    join: bool = False  # attach to existing pools only; never create them
    router_id: str = field(default_factory=lambda: f"router-{uuid.uuid4().hex[:8]}")
    security: SecurityConfig = field(default_factory=SecurityConfig)  # API keys, rate limits, TLS
    limits: RequestLimits = field(default_factory=RequestLimits)

    def __post_init__(self) -> None:
        if self.decode_engine is not None and self.decode_engine.model != self.engine.model:
            raise ValueError("prefill and decode workers must serve the same model")
        ClusterKeys(self.cluster_name)  # validates the name
        if self.http_port < -1:
            raise ValueError(f"http_port must be a port, 0 (any free port) or -1 (no HTTP), got {self.http_port}")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be at least 1, got {self.default_max_tokens}")
        if self.max_request_body_bytes < 1:
            raise ValueError(f"max_request_body_bytes must be at least 1, got {self.max_request_body_bytes}")


def init_ray(address: str | None, num_workers: int) -> None:
    import ray

    if ray.is_initialized():
        return
    # Workers import pdserve from this checkout even when it is not pip-installed.
    pythonpath = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath}}
    if address:
        use_ray_token_if_present()
        ray.init(address=address, logging_level=logging.WARNING, runtime_env=runtime_env)
        return
    # "local": a private instance of our own, even when `ray start` left a cluster (or the
    # address file of a dead one) on this machine; plain ray.init() would try to join it.
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, num_workers),  # one logical CPU per worker actor
        include_dashboard=False,
        logging_level=logging.WARNING,
        object_store_memory=256 * 2**20,  # workers pass small messages; KV moves outside Ray
        runtime_env=runtime_env,
    )


def use_ray_token_if_present() -> None:
    """Join a cluster that runs Ray's token authentication (`ray start` turns it on when a token
    exists, e.g. ~/.ray/auth_token): a driver only sends the token in token mode, which is what
    `ray start` itself infers from the token's presence; RAY_AUTH_MODE set explicitly wins."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def load_tokenizer(model: str):
    from engine.loader import resolve_model_path
    from engine.tokenizer import Tokenizer

    path = resolve_model_path(model)
    return Tokenizer.from_gguf(path) if path.endswith(".gguf") else Tokenizer.from_hf_dir(path)


@asynccontextmanager
async def cluster_redis(config: ServeConfig) -> AsyncIterator[str]:
    """The cluster's Redis URL: the given one, or a private redis-server for this router's life.

    A private server listens on loopback with a local Ray, and on this node's address when the
    router joins a Ray cluster (workers on other nodes must reach it); it always has a password.
    """
    if config.redis_url:
        yield config.redis_url
        return
    host = "127.0.0.1" if not config.ray_address else node_ip()
    server = PrivateRedis(host=host).start()  # on this thread: the server dies with it
    logger.info("private redis-server on %s:%d (pid %d)", host, server.port, server.pid)
    try:
        yield server.url
    finally:
        server.stop()


@asynccontextmanager
async def running_cluster(config: ServeConfig) -> AsyncIterator[ClusterBackend]:
    """Ray, Redis, both pools started (or attached to) and connected, and a backend."""
    init_ray(config.ray_address, config.pools.num_workers)
    async with cluster_redis(config) as redis_url:
        redis = connect(RedisSettings.from_url(redis_url))
        keys = ClusterKeys(config.cluster_name)
        routers = RouterRegistry(redis, keys, config.router_id)
        tasks: list[asyncio.Task] = []
        try:
            try:
                await routers.heartbeat(_router_record(config), ROUTER_LEASE_S)
            except Exception as err:
                raise ClusterStartError(f"cannot reach Redis at {redacted_url(redis_url)}: {err}") from err
            secret = await ensure_cluster_secret(redis, keys)
            tasks.append(asyncio.create_task(_heartbeat_forever(routers, config, secret)))
            view = ClusterView(WorkerRegistry(redis, keys), config.pools.registry_ttl_s,
                               config.pools.publish_interval_s, presence_key=keys.router(config.router_id))
            # Workers get the URL with its password in (from $PDSERVE_REDIS_PASSWORD here, if the
            # URL lacked one): on other nodes they do not have this router's environment.
            context = ClusterContext(RedisSettings.from_url(redis_url).url, config.cluster_name,
                                     config.router_id, local_ray=not config.ray_address)
            pools = WorkerPools(config.pools, config.engine, config.decode_engine or config.engine,
                                context, view, routers)
            async with _pools_up(pools, routers, config.join):
                await view.refresh()
                follower = BlockIndexFollower(
                    redis, keys, lambda: [w.key for w in view.workers.values() if w.registered])
                tasks += [asyncio.create_task(view.run()), asyncio.create_task(follower.run())]
                journal = RequestJournal(redis, keys, config.router_id)
                backend = ClusterBackend(pools, view, follower, config.routing, config.router_id, journal,
                                         routers=routers)
                await backend.start()
                try:
                    yield backend
                finally:
                    await backend.close()
        finally:
            await stop_tasks(tasks)
            await redis.aclose()


@asynccontextmanager
async def _pools_up(pools: WorkerPools, routers: RouterRegistry, join: bool) -> AsyncIterator[None]:
    """The pools, attached or created; on the way out, taken down if this is the last router."""
    await pools.start(join)
    try:
        yield
    finally:
        try:
            # A router killed a moment ago still holds its lease; only one that renews counts.
            alive = await routers.others_alive(2.5 * ROUTER_HEARTBEAT_S)
            await routers.leave()
            others = len(alive)
        except Exception as err:
            logger.warning("cannot tell whether other routers remain (%s); leaving the pools up", err)
            others = -1
        if others > 0:
            logger.info("routers %s still serve cluster %r: its workers stay up", ", ".join(alive),
                        pools.context.cluster_name)
        if others == 0:
            logger.info("last router of cluster %r: stopping its workers", pools.context.cluster_name)
            await pools.take_down()


def _router_record(config: ServeConfig) -> dict:
    return {"router_id": config.router_id, "pid": os.getpid(), "host": socket.gethostname(),
            "grpc": f"{config.host}:{config.grpc_port}",
            "http": f"{config.host}:{config.http_port}" if config.http_port >= 0 else None,
            "started_at": time.time()}


async def _heartbeat_forever(routers: RouterRegistry, config: ServeConfig, secret: bytes) -> None:
    record = _router_record(config)
    while True:
        await asyncio.sleep(ROUTER_HEARTBEAT_S)
        try:
            await routers.heartbeat(record, ROUTER_LEASE_S)
            await restore_cluster_secret(routers.redis, routers.keys, secret)
        except Exception as err:  # Redis away: the view keeps routing on what it knows
            logger.debug("router heartbeat failed: %s", err)


async def serve(config: ServeConfig) -> int:
    log = lambda msg: print(f"[pdserve] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    pools = config.pools
    log(f"starting {pools.mode} cluster {config.cluster_name!r}: model {config.engine.model}, "
        f"{pools.num_prefill_workers if pools.mode == 'disaggregated' else 0} prefill + "
        f"{pools.num_decode_workers} {pools.decode_role} worker(s), KV transfer over "
        f"{pools.transfer_backend}, routing {config.routing.policy}, disaggregation "
        f"{config.routing.disaggregation}")
    ports = [("gRPC", config.grpc_port)] + ([("HTTP", config.http_port)] if config.http_port > 0 else [])
    for door, port in ports:
        try:
            check_port_free(config.host, port)
        except OSError as err:
            log(f"error: cannot listen on {config.host}:{port} ({door}): {err.strerror or err}")
            return 1
    try:
        if config.security.tls is not None:
            config.security.tls.load()  # fail now, not after loading the model
    except TlsError as err:
        log(f"error: {err}")
        return 1
    try:
        async with running_cluster(config) as backend:
            spec = backend.pools.spec
            if not backend.pools.created:
                log(f"attached to the existing pools of cluster {config.cluster_name!r} "
                    f"(model {spec.model}, created by {spec.created_by})")
            tokenizer = await asyncio.to_thread(load_tokenizer, spec.model)
            task = asyncio.current_task()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, task.cancel)
            try:
                await _serve_front_doors(config, backend, tokenizer, log)
            except asyncio.CancelledError:
                log("shutting down")
    except (ClusterStartError, RuntimeError) as err:
        log(f"error: {err}")
        return 1
    return 0


def front_door_gatekeeper(config: ServeConfig, backend: ClusterBackend) -> Gatekeeper:
    """The router's API keys, rate limits (buckets in the cluster's Redis), limits and TLS."""
    return Gatekeeper.build(config.security, config.limits, backend.routers.redis, backend.routers.keys)


async def _serve_front_doors(config: ServeConfig, backend: ClusterBackend, tokenizer, log) -> None:
    """gRPC, and HTTP unless disabled, until cancelled; both feed one set of metrics."""
    from router.grpc_server import serve_grpc
    from router.http import running_http
    from router.metrics import ServingMetrics

    metrics = ServingMetrics(backend)
    gate = front_door_gatekeeper(config, backend)
    scheme = "http" if gate.tls is None else "https"
    async with AsyncExitStack() as stack:
        if config.http_port >= 0:
            http = await stack.enter_async_context(running_http(
                backend, tokenizer, config.host, config.http_port, metrics=metrics,
                default_max_tokens=config.default_max_tokens, max_body_bytes=config.max_request_body_bytes,
                gatekeeper=gate))
            log(f"serving the OpenAI-compatible HTTP API on {scheme}://{config.host}:{http.port}/v1")
        await serve_grpc(backend, tokenizer, config.host, config.grpc_port,
                         on_started=lambda port: log(f"serving gRPC on {config.host}:{port}"),
                         default_max_tokens=config.default_max_tokens, observe=metrics.observe,
                         gatekeeper=gate)


def check_port_free(host: str, port: int) -> None:
    """Fail before minutes of model loading, not after, when the port is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, port))

