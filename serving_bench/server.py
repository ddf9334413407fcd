"""A `pdserve serve` process to benchmark: started on free ports, ready once `GET /health`
answers 200, stopped with Ctrl-C (SIGINT) so the router takes its pools down."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(base_url: str, process: subprocess.Popen, timeout_s: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            with open(log_path) as log:
                raise RuntimeError(f"pdserve serve exited early:\n{log.read()[-4000:]}")
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"{base_url}/health did not answer 200 within {timeout_s:.0f} s")


@dataclass(frozen=True)
class ServedCluster:
    base_url: str
    grpc_port: int
    process: subprocess.Popen


@contextmanager
def served_cluster(serve_flags: Sequence[str], log_path: str, timeout_s: float = 600.0) -> Iterator[ServedCluster]:
    """`pdserve serve <serve_flags>` on free gRPC and HTTP ports of 127.0.0.1, its output in log_path."""
    grpc_port, http_port = free_port(), free_port()
    command = [sys.executable, "-m", "router.cli", "serve", "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
               "--http-port", str(http_port), *serve_flags]
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{http_port}"
    try:
        wait_until_healthy(base_url, process, timeout_s, log_path)
        yield ServedCluster(base_url, grpc_port, process)
    finally:
        stop(process)


def stop(process: subprocess.Popen, grace_s: float = 90.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
