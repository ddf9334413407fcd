"""Ray nodes for multi-node tests, on loopback addresses of this one machine.

Each node is a `ray start --block` process: it owns the node's Ray processes and stops them
when it is terminated, so a test stops exactly the nodes it started, by their own process ids,
never with a machine-wide `ray stop`. The head keeps its files (and its current-cluster address
file) in a temporary directory of its own, removed when it stops.

The cluster runs Ray's token authentication with a token of its own (in the head's directory):
every node and every driver that joins gets it through `env()`, whatever ~/.ray holds.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time

import psutil

from cluster_state.server import free_port


class RayNode:
    def __init__(self, ip: str, head: "RayNode | None" = None, num_cpus: int = 2,
                 resources: dict[str, float] | None = None) -> None:
        self.ip = ip
        self.head = head
        head_address = head.address if head is not None else None
        self.head_address = head_address
        self.num_cpus = num_cpus
        self.resources = resources or {}
        self.process: subprocess.Popen | None = None
        self.temp_dir = tempfile.mkdtemp(prefix="pdserve-ray-") if head is None else None
        self.port = free_port(ip) if head is None else None
        self._children: list[psutil.Process] = []
        if head is None:
            self.token_path = os.path.join(self.temp_dir, "auth_token")
            with open(self.token_path, "w") as f:
                f.write(secrets.token_hex(32))
        else:
            self.token_path = head.token_path

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a process that joins this cluster (a node, a driver)."""
        return {**(os.environ if base is None else base), "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": self.token_path}

    @property
    def address(self) -> str:
        return self.head_address or f"{self.ip}:{self.port}"

    def start(self, timeout_s: float = 120.0) -> "RayNode":
        args = ["ray", "start", "--node-ip-address", self.ip, "--num-cpus", str(self.num_cpus),
                "--disable-usage-stats", "--block"]
        if self.resources:
            args += ["--resources", json.dumps(self.resources)]
        if self.head_address is None:
            args += ["--head", "--port", str(self.port), "--include-dashboard=false", "--temp-dir", self.temp_dir]
        else:
            args += ["--address", self.head_address]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        env=self.env())
        self._wait_up(timeout_s)
        return self

    def _wait_up(self, timeout_s: float) -> None:
        """Until the node's raylet runs (a child of the `ray start` process)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start on {self.ip} exited: {self.process.stderr.read()[-2000:]}")
            children = psutil.Process(self.process.pid).children(recursive=True)
            if any(child.name() == "raylet" for child in children):
                time.sleep(1.0)  # the raylet registers with the GCS right after it starts
                self._children = psutil.Process(self.process.pid).children(recursive=True)
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"ray start on {self.ip} did not bring up a raylet in {timeout_s:.0f}s")

    def pids(self) -> list[int]:
        return [self.process.pid] + [c.pid for c in self._children] if self.process else []

    def stop(self) -> None:
        """Terminate the node's `ray start` process (it stops the node), then anything left."""
        if self.process is None:
            return
        try:
            self._children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for child in self._children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self.process.stderr.close()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.process = None


def pdserve_env() -> dict[str, str]:
    """The environment for pdserve processes started by tests: this checkout importable."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
