"""A whole pdserve cluster and its gRPC and HTTP servers running on a background thread.

Benchmarks and tests use it to talk to a real cluster over real gRPC or HTTP from ordinary code.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from contextlib import AsyncExitStack

import grpc

from protos.pdserve.v1 import generation_pb2_grpc as pb_grpc
from router.grpc_server import GrpcServer
from router.health import follow_health
from router.http import running_http
from router.metrics import ServingMetrics
from router.serve import ServeConfig, front_door_gatekeeper, init_ray, load_tokenizer, running_cluster


class EmbeddedCluster:
    """`running_cluster(config)` plus a GrpcServer and an HttpServer on 127.0.0.1 (free ports;
    no HTTP when config.http_port is -1), served from a background thread.

    For benchmarks and tests that drive a real cluster with ordinary gRPC clients from the
    calling thread. Ray is started here, on the calling thread: Ray's local processes die with
    the thread that started them, so the server thread must not be the one to start it.
    """

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.backend = None
        self.port: int | None = None  # gRPC
        self.http = None  # the router.http.HttpServer, unless config.http_port is -1
        self.http_port: int | None = None
        self.metrics = None  # the router.metrics.ServingMetrics both servers feed
        self._stop: asyncio.Event | None = None
        self._done: Future | None = None

    def __enter__(self) -> "EmbeddedCluster":
        init_ray(self.config.ray_address, self.config.pools.num_workers)
        self.thread.start()
        ready: Future = Future()
        self._done = asyncio.run_coroutine_threadsafe(self._serve(ready), self.loop)
        ready.result(timeout=600)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        try:
            self._done.result(timeout=120)
        except TimeoutError:
            self._dump_stuck_tasks()
            raise
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def _dump_stuck_tasks(self) -> None:
        """What the server's loop is still waiting on, when stopping it took too long."""
        import faulthandler
        import sys

        def dump() -> None:
            for task in asyncio.all_tasks(self.loop):
                print(f"--- {task!r}", file=sys.stderr)
                task.print_stack(file=sys.stderr)
        self.loop.call_soon_threadsafe(dump)
        time.sleep(1.0)
        faulthandler.dump_traceback(file=sys.stderr)

    async def _serve(self, ready: Future) -> None:
        self._stop = asyncio.Event()
        try:
            tokenizer = await asyncio.to_thread(load_tokenizer, self.config.engine.model)
            async with running_cluster(self.config) as backend, AsyncExitStack() as stack:
                config = self.config
                self.metrics = ServingMetrics(backend)
                gate = front_door_gatekeeper(config, backend)
                server = GrpcServer(backend, tokenizer, "127.0.0.1", 0, observe=self.metrics.observe,
                                    default_max_tokens=config.default_max_tokens, gatekeeper=gate)
                self.backend, self.port = backend, await server.start()
                if config.http_port >= 0:
                    self.http = await stack.enter_async_context(running_http(
                        backend, tokenizer, "127.0.0.1", 0, metrics=self.metrics,
                        default_max_tokens=config.default_max_tokens,
                        max_body_bytes=config.max_request_body_bytes, gatekeeper=gate))
                    self.http_port = self.http.port
                await server.set_serving(backend.can_serve())
                health = asyncio.get_running_loop().create_task(
                    follow_health(backend.can_serve, server.set_serving))
                ready.set_result(True)
                await self._stop.wait()
                health.cancel()
                await server.stop(1.0)
        except BaseException as err:
            if not ready.done():
                ready.set_exception(err)
            raise

    def run(self, awaitable, timeout: float = 120):
        """Await something on the server's loop: a coroutine (backend.pools.stats()) or a Ray
        call (handle.actor.stats.remote())."""
        async def wait():
            return await awaitable
        return asyncio.run_coroutine_threadsafe(wait(), self.loop).result(timeout)

    @property
    def http_url(self) -> str:
        """Base URL of the OpenAI-compatible API, e.g. for openai.OpenAI(base_url=...)."""
        if self.http_port is None:
            raise RuntimeError("this cluster serves no HTTP (config.http_port is -1)")
        return f"http://127.0.0.1:{self.http_port}/v1"

    def stub(self) -> pb_grpc.GenerationStub:
        return pb_grpc.GenerationStub(grpc.insecure_channel(f"127.0.0.1:{self.port}"))

    def wait_for_baseline(self, timeout_s: float = 30.0) -> dict:
        """Poll the workers until every KV block is free and no request is left; returns stats."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.run(self.backend.pools.stats())
            if workers_idle(stats) or time.monotonic() > deadline:
                return stats
            time.sleep(0.2)


def workers_idle(stats: dict) -> bool:
    """Every KV block free and no request left, on every worker of `WorkerPools.stats()`."""
    workers = [s if isinstance(s, dict) else s.__dict__ for s in stats["prefill"] + stats["decode"]]
    return all(w["num_free_blocks"] == w["num_blocks"] and w["num_requests"] == 0 for w in workers)
