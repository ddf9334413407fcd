"""`pdserve serve` without --ray-address starts a private Ray instance of its own, even on a
machine where `ray start` left a cluster (live, or dead with its address file behind); with
--ray-address auto or host:port it joins that cluster instead.

The machine is a virtual host (tests/deploy_hosts.py): the foreign cluster, its address file
and pdserve's own Ray stay inside it and die with it."""
from __future__ import annotations

import json
import os
import secrets
import signal

import pytest

from tests.deploy_hosts import (VirtualNetwork, ask_capital_of_france, namespaces_available,
                                tail, wait_for_serving)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(namespaces_available() is not None,
                                 reason=str(namespaces_available()))]

MACHINE_IP = "10.253.0.10"
FOREIGN = f"{MACHINE_IP}:6379"

CLUSTER_OF = """
import json, sys, ray
from router.serve import init_ray
init_ray(None if sys.argv[1] == "-" else sys.argv[1], 2)
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "nodes": len(ray.nodes()),
                  "cpus": ray.cluster_resources().get("CPU"),
                  "free_cpus": ray.available_resources().get("CPU")}))
"""


def cluster_of(machine, address: str | None) -> dict:
    """The cluster that router.serve.init_ray(address) ends up in, from a fresh driver."""
    result = machine.exec(["python", "-c", CLUSTER_OF, address or "-"], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_serve_starts_its_own_ray_beside_a_foreign_one_and_joins_on_request(demo_gguf_path):
    with VirtualNetwork() as net:
        machine = net.add_host("machine", MACHINE_IP)
        machine.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        # The earlier `ray start`: a one-CPU cluster that pdserve's two workers would not fit.
        machine.run("ray start --head --port=6379 --num-cpus=1 --disable-usage-stats",
                    check=True, timeout=120)
        address_file = os.path.join(machine.env["RAY_TMPDIR"], "ray", "ray_current_cluster")
        assert open(address_file).read().strip() == FOREIGN

        log = os.path.join(machine.root, "serve.log")
        server = machine.popen(["pdserve", "serve", "--grpc-port", "50051"], log_path=log)
        wait_for_serving(machine, "127.0.0.1:50051", 300, lambda: tail(log))
        reply = ask_capital_of_france(machine, "127.0.0.1:50051")
        assert reply.returncode == 0 and "Paris" in reply.stdout, reply.stderr + tail(log)
        # The foreign cluster is as `ray start` left it: one node, its one CPU free.
        foreign = cluster_of(machine, FOREIGN)
        assert foreign == {"gcs": FOREIGN, "nodes": 1, "cpus": 1.0, "free_cpus": 1.0}
        # --ray-address auto (the address file) and host:port join the foreign cluster.
        assert cluster_of(machine, "auto")["gcs"] == FOREIGN
        machine.send_signal(server, signal.SIGINT)
        assert server.wait(timeout=90) == 0, tail(log)

        # The foreign cluster dies and leaves its address file: still a private instance.
        machine.run("ray stop --force", check=True, timeout=120)
        with open(address_file, "w") as f:
            f.write(FOREIGN)
        private = cluster_of(machine, None)
        assert private["gcs"] != FOREIGN and private["nodes"] == 1
