"""Request builders, checks and process helpers for the end-to-end tests."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.pdserve.v1 import generation_pb2 as pb


def live_workers(redis_url: str, cluster_name: str) -> dict:
    """The cluster's registry as a router reads it: worker id -> LiveWorker."""
    import asyncio

    from cluster_state import ClusterKeys, RedisSettings, connect
    from cluster_state.registry import WorkerRegistry

    async def read():
        redis = connect(RedisSettings(redis_url))
        try:
            return await WorkerRegistry(redis, ClusterKeys(cluster_name)).live_workers()
        finally:
            await redis.aclose()
    return asyncio.run(read())


def greedy_request(token_ids: list[int], max_tokens: int, request_id: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=request_id, token_ids=pb.TokenIds(ids=token_ids),
        sampling_params=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


def collect(responses) -> tuple[list[int], str, pb.GenerateResponse]:
    """Token ids and text of a whole stream, and its last message."""
    ids: list[int] = []
    text = []
    last = None
    for response in responses:
        ids.extend(response.token_ids)
        text.append(response.text)
        last = response
    return ids, "".join(text), last


def pdserve_command() -> list[str]:
    """The installed `pdserve` script (what a user runs), else the module."""
    script = shutil.which("pdserve")
    return [script] if script else router_process_command()


def stop_process(process: subprocess.Popen, log=None) -> None:
    """Kill a process a test started if it is still running, and close its log."""
    if process is not None and process.poll() is None:
        process.kill()
        process.wait()
    if log is not None:
        log.close()


def router_process_command() -> list[str]:
    """`pdserve` as one Python process whose pid is the router's own (an installed script can be
    a wrapper, e.g. a pyenv shim, that runs the router as a child): for tests that kill it."""
    return [sys.executable, "-m", "router.cli"]


def wait_for_serving(target: str, server: subprocess.Popen, timeout_s: float, log_path=None) -> None:
    """Until the server's health service answers SERVING; its output is in server.stderr, or in
    the file log_path when it writes there."""
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            output = server.stderr.read() if server.stderr else open(log_path).read() if log_path else ""
            raise AssertionError(f"pdserve serve exited early:\n{output[-4000:]}")
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(1)
    raise AssertionError("pdserve serve did not report SERVING in time")
