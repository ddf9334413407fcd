"""Machines for the deployment tests: each one a network and PID namespace of this host.

A `VirtualNetwork` is a bridge in a namespace of its own; every `Host` on it has its own network
namespace (one veth on the bridge, its own address, its own loopback), its own PID namespace
(so `ray stop` and process listings see only that host's processes), and its own HOME and Ray
temp dir. Commands written for separate machines (the `ray up` files' start commands, the Helm
chart's pod commands) run there as written: fixed ports do not collide with anything else on
this machine, no traffic leaves the namespaces, and closing a host kills every process it
started, daemons included, because they all die with its PID namespace's first process.

Needs root (ip netns, unshare, nsenter), as CI and the development machines have.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def namespaces_available() -> str | None:
    """None when this machine can build virtual hosts, else why not."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", "unshare", "nsenter", "setpriv"):
        if shutil.which(tool) is None:
            return f"needs {tool} (util-linux / iproute2)"
    return None


def base_env() -> dict[str, str]:
    """This process's environment for a host, with the checkout importable and no Ray address."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "PDSERVE_")) and k not in ("VIRTUAL_ENV",)}
    # The model cache of this machine (the demo model, fetched once): the hosts have no
    # network, as the image, which carries the demo model, needs none.
    from engine.loader import cache_dir

    env["PDSERVE_CACHE_DIR"] = cache_dir()
    env.pop("XDG_CACHE_HOME", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    # The interpreter running the tests, and its scripts (pdserve, ray), come first.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env


@dataclass
class Host:
    name: str
    ip: str
    netns: str
    root: str  # HOME and the Ray temp dir live under it
    env: dict[str, str] = field(default_factory=dict)
    holder: subprocess.Popen | None = None
    init_pid: int = 0  # the PID namespace's first process: everything started here dies with it

    @property
    def home(self) -> str:
        return os.path.join(self.root, "home")

    def start(self) -> None:
        os.makedirs(self.home, exist_ok=True)
        os.makedirs(os.path.join(self.root, "t"), exist_ok=True)
        self.env = {**base_env(), "HOME": self.home, "RAY_TMPDIR": os.path.join(self.root, "t")}
        # If the test process dies without closing the host (a timeout's SIGKILL), the holder
        # gets SIGKILL (pdeathsig) and its child, the PID namespace's first process, with it.
        self.holder = subprocess.Popen(
            ["setpriv", "--pdeathsig", "KILL", "ip", "netns", "exec", self.netns,
             "unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "sleep", "infinity"],
            start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not self.init_pid:
            try:
                with open(f"/proc/{self.holder.pid}/task/{self.holder.pid}/children") as f:
                    children = f.read().split()
                self.init_pid = int(children[0]) if children else 0
            except OSError:
                pass
            time.sleep(0.05)
        if not self.init_pid:
            raise RuntimeError(f"host {self.name}: its PID namespace did not start")

    def _enter(self) -> list[str]:
        return ["nsenter", "-t", str(self.init_pid), "--net", "--pid", "--mount", "--"]

    def run(self, command: str, env: dict[str, str] | None = None, timeout: float = 120,
            check: bool = False) -> subprocess.CompletedProcess:
        """One shell command on this host, the way an SSH session runs it: bash -c."""
        result = subprocess.run(self._enter() + ["bash", "-c", command],
                                env={**self.env, **(env or {})}, capture_output=True, text=True,
                                timeout=timeout, cwd=self.home)
        if check and result.returncode != 0:
            raise AssertionError(f"on {self.name}: {command!r} exited {result.returncode}\n"
                                 f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        return result

    def popen(self, argv: list[str], env: dict[str, str] | None = None,
              log_path: str | None = None) -> subprocess.Popen:
        """A long-running process (a container's main process) on this host."""
        out = open(log_path or os.path.join(self.root, "process.log"), "ab")
        try:
            return subprocess.Popen(self._enter() + argv, env={**self.env, **(env or {})},
                                    stdout=out, stderr=subprocess.STDOUT, cwd=self.home,
                                    stdin=subprocess.DEVNULL)
        finally:
            out.close()

    def exec(self, argv: list[str], env: dict[str, str] | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess:
        """A program (no shell) on this host, to completion."""
        return subprocess.run(self._enter() + argv, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout, cwd=self.home)

    @staticmethod
    def send_signal(process: subprocess.Popen, sig: int) -> None:
        """Signal a process started by popen(): nsenter forwards no signal, so it goes to
        nsenter's child, the program itself; nsenter then exits with the program's status."""
        with open(f"/proc/{process.pid}/task/{process.pid}/children") as f:
            for child in f.read().split():
                os.kill(int(child), sig)

    def python(self, code: str, env: dict[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess:
        return self.exec([sys.executable, "-c", code], env=env, timeout=timeout)

    def close(self) -> None:
        if self.init_pid:
            try:
                os.kill(self.init_pid, 9)  # the kernel kills the rest of the PID namespace
            except ProcessLookupError:
                pass
        if self.holder is not None:
            try:
                self.holder.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.holder.kill()
                self.holder.wait()


class VirtualNetwork:
    """Hosts on one bridge; a host's default route points at the bridge, which leads nowhere."""

    def __init__(self, subnet: str = "10.251.0") -> None:
        self.tag = secrets.token_hex(3)
        self.subnet = subnet
        self.switch = f"pdt{self.tag}sw"
        self.root = tempfile.mkdtemp(prefix=f"pdt{self.tag}", dir="/tmp")  # short: Unix sockets
        self.hosts: list[Host] = []
        self.bridge_ip = ""

    def __enter__(self) -> "VirtualNetwork":
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        return self

    def add_host(self, name: str, ip: str) -> Host:
        """A host at `ip`, a /24 address the other hosts reach it at."""
        index = len(self.hosts)
        netns = f"pdt{self.tag}h{index}"
        prefix = ip.rsplit(".", 1)[0]
        if not self.bridge_ip:  # the bridge joins the first host's /24 as its gateway, .1
            self.bridge_ip = f"{prefix}.1"
            _ip("-n", self.switch, "addr", "add", f"{self.bridge_ip}/24", "dev", "br0")
        elif self.bridge_ip.rsplit(".", 1)[0] != prefix:
            raise ValueError(f"{ip} is not on the network's /24 ({self.bridge_ip})")
        _ip("netns", "add", netns)
        veth, peer = f"pd{self.tag}{index}a", f"pd{self.tag}{index}b"
        _ip("link", "add", veth, "netns", netns, "type", "veth", "peer", "name", peer,
            "netns", self.switch)
        _ip("-n", self.switch, "link", "set", peer, "master", "br0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "addr", "add", f"{ip}/24", "dev", veth)
        _ip("-n", netns, "link", "set", veth, "up")
        _ip("-n", netns, "route", "add", "default", "via", self.bridge_ip)
        host = Host(name, ip, netns, os.path.join(self.root, name))
        self.hosts.append(host)
        host.start()
        return host

    def close(self) -> None:
        for host in reversed(self.hosts):
            host.close()
        for host in self.hosts:
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.close()


HEALTH_CHECK = """
import sys, time, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(sys.argv[1]))
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
            print("SERVING"); sys.exit(0)
    except grpc.RpcError:
        pass
    time.sleep(2)
sys.exit(1)
"""


def wait_for_serving(host: Host, target: str, timeout_s: float, diagnostics) -> None:
    """The standard gRPC health service answers SERVING at `target`, as seen from `host`."""
    result = subprocess.run(host._enter() + [sys.executable, "-c", HEALTH_CHECK, target,
                                             str(timeout_s)],
                            env=host.env, capture_output=True, text=True, timeout=timeout_s + 30)
    if result.returncode != 0:
        raise AssertionError(f"{target} never reported SERVING within {timeout_s:.0f} s\n"
                             f"{result.stderr[-2000:]}\n{diagnostics()}")


def ask_capital_of_france(host: Host, target: str) -> subprocess.CompletedProcess:
    return host.run(
        f"pdserve client --target {target} --chat --temperature 0 --max-tokens 24 "
        "'What is the capital of France?'", timeout=180)


def ray_available_resources(host: Host, env: dict[str, str] | None = None) -> dict:
    """What the Ray cluster that `host` belongs to has left, from a driver on that host."""
    result = host.python(
        "import json, ray; ray.init(address='auto', logging_level='ERROR'); "
        "print(json.dumps(ray.available_resources()))", env=env, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def tail(path: str, lines: int = 60) -> str:
    try:
        with open(path, errors="replace") as f:
            return f"--- {path}\n" + "".join(f.readlines()[-lines:])
    except OSError as err:
        return f"--- {path}: {err}"
