"""The README's two commands in a fresh clone, under the stock Debian Python that refuses
`pip install` (PEP 668), with a fresh HOME: `serve` builds .venv and serves, the venv's
`pdserve client` gets an answer, and `test` adds the test extras and runs tests."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.deploy_hosts import REPO_ROOT

pytestmark = pytest.mark.slow

STOCK_PYTHON = "/usr/bin/python3"  # Debian's own interpreter on these machines


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stock_env(home: str, ray_tmp: str) -> dict[str, str]:
    """A new user's shell: system PATH, fresh HOME, none of this session's Python set-up. The
    machine's pip configuration (its package index) stays, as for any user."""
    keep = ("LANG", "LC_ALL", "TERM", "CI") + tuple(k for k in os.environ if k.startswith("PIP_"))
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(HOME=home, PATH="/usr/sbin:/usr/bin:/sbin:/bin", PYTHON=STOCK_PYTHON,
               RAY_TMPDIR=ray_tmp)  # this Ray's files stay in the test's own folder
    return env


def wait_for_serving(target: str, server: subprocess.Popen, log: str, timeout_s: float) -> None:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, f"quickstart serve exited:\n{open(log).read()[-5000:]}"
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(3)
    raise AssertionError(f"not SERVING after {timeout_s} s:\n{open(log).read()[-5000:]}")


@pytest.fixture
def fresh_clone():
    root = tempfile.mkdtemp(prefix="pdq", dir="/tmp")
    clone = os.path.join(root, "pdserve")
    subprocess.run(["git", "clone", "-q", REPO_ROOT, clone], check=True)
    os.makedirs(os.path.join(root, "home"))
    os.makedirs(os.path.join(root, "t"))
    yield clone, stock_env(os.path.join(root, "home"), os.path.join(root, "t"))
    shutil.rmtree(root, ignore_errors=True)


def test_readme_commands_in_a_fresh_clone_under_stock_debian_python(fresh_clone):
    clone, env = fresh_clone
    refused = subprocess.run([STOCK_PYTHON, "-m", "pip", "install", "--dry-run", "six"],
                             capture_output=True, text=True, env=env)
    assert refused.returncode != 0 and "externally-managed-environment" in refused.stderr

    port = free_port()
    log = os.path.join(os.path.dirname(clone), "serve.log")
    with open(log, "w") as out:
        server = subprocess.Popen(["bash", "deploy/quickstart.sh", "serve", "--grpc-port", str(port), "--http-port", "0"],
                                  cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_for_serving(f"127.0.0.1:{port}", server, log, timeout_s=1200)
        venv_bin = os.path.join(clone, ".venv", "bin")
        client = subprocess.run(
            [os.path.join(venv_bin, "pdserve"), "client", "--target", f"127.0.0.1:{port}", "--chat",
             "--temperature", "0", "--max-tokens", "24", "What is the capital of France?"],
            capture_output=True, text=True, env=env, timeout=180)
        assert client.returncode == 0, client.stderr
        assert "Paris" in client.stdout
        # serve installed no test extras.
        assert subprocess.run([os.path.join(venv_bin, "python"), "-c", "import pytest"],
                              capture_output=True).returncode != 0
        assert not subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True,
                                  text=True).stdout.strip(), "the venv must not show up in git"
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=120) == 0, open(log).read()[-3000:]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()

    tests = subprocess.run(["bash", "deploy/quickstart.sh", "test", "tests/test_protos.py",
                            "-p", "no:cacheprovider"],
                           cwd=clone, env=env, capture_output=True, text=True, timeout=1200)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]
    assert " passed" in tests.stdout
