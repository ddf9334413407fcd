"""`pdserve serve` with no flags comes up, answers health, and `pdserve client` streams text."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.slow


def pdserve_command() -> list[str]:
    script = shutil.which("pdserve")
    return [script] if script else [sys.executable, "-m", "router.cli"]


def wait_for_serving(target: str, server: subprocess.Popen, timeout_s: float) -> None:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, f"pdserve serve exited early:\n{server.stderr.read()}"
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(1)
    raise AssertionError("pdserve serve did not report SERVING in time")


def test_serve_with_no_flags_then_client_streams_text(demo_gguf_path):
    # No flags at all: local Ray, 1 prefill + 1 decode worker, the demo model, gRPC on 50051.
    server = subprocess.Popen(pdserve_command() + ["serve"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        wait_for_serving("127.0.0.1:50051", server, timeout_s=300)
        client = subprocess.run(
            pdserve_command() + ["client", "--chat", "--temperature", "0", "--max-tokens", "24",
                                 "--usage", "What is the capital of France?"],
            capture_output=True, text=True, timeout=120)
        assert client.returncode == 0, client.stderr
        assert "Paris" in client.stdout
        assert "prompt=" in client.stderr and "completion=" in client.stderr
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0
        assert "shutting down" in server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
