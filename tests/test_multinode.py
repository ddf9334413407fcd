"""A Ray cluster of three nodes on loopback addresses of this machine: the head on 127.0.0.1, a
prefill node on 127.0.0.2 and a decode node on 127.0.0.3 (they advertise the `prefill` / `decode`
resources). Workers land on their pinned nodes, the pair moves KV with torch.distributed (gloo),
greedy outputs equal engine.LLM, and every socket a worker listens on is on its own node's address."""
from __future__ import annotations

import signal
import subprocess
import time

import grpc
import psutil
import pytest

from engine import LLM, SamplingParams
from protos.pdserve.v1 import generation_pb2_grpc as pb_grpc
from tests.cluster_helpers import stop_process, collect, greedy_request, live_workers, router_process_command, wait_for_serving
from tests.ray_nodes import RayNode, pdserve_env

pytestmark = pytest.mark.slow

PROMPTS = [[3 + (17 * i + j) % 400 for j in range(9 + 3 * i)] for i in range(5)]


@pytest.fixture(scope="module")
def nodes():
    head = RayNode("127.0.0.1", num_cpus=1).start()
    started = [head]
    try:
        started.append(RayNode("127.0.0.2", head=head, num_cpus=1, resources={"prefill": 1}).start())
        started.append(RayNode("127.0.0.3", head=head, num_cpus=1, resources={"decode": 1}).start())
        yield head
    finally:
        for node in reversed(started):
            node.stop()


def listening_addresses(pid: int) -> set[str]:
    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


def test_workers_on_their_nodes_move_kv_over_torch_distributed(tmp_path, nodes, tiny_checkpoints, redis_server,
                                                               cluster_name):
    from cluster_state.server import free_port

    model = tiny_checkpoints["llama3"]
    expected = [o.token_ids for o in LLM(model, dtype="float32", device="cpu").generate(
        PROMPTS, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))]
    port = free_port()
    log = open(tmp_path / "router.log", "w")
    router = subprocess.Popen(router_process_command() + [
        "serve", "--ray-address", nodes.address, "--redis-url", redis_server.url, "--cluster-name", cluster_name,
        "--grpc-port", str(port), "--http-port", "0", "--host", "127.0.0.1", "--model", model, "--dtype", "float32",
        "--kv-cache-memory-gb", "0.01", "--torch-threads", "1", "--disaggregation", "always"],
        stdout=log, stderr=subprocess.STDOUT, env=nodes.env(pdserve_env()))
    try:
        wait_for_serving(f"127.0.0.1:{port}", router, 300, tmp_path / "router.log")
        stub = pb_grpc.GenerationStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        assert [collect(stub.Generate(greedy_request(p, 8)))[0] for p in PROMPTS] == expected
        workers = live_workers(redis_server.url, cluster_name)
        assert workers["prefill-0"].record.node_ip == "127.0.0.2"
        assert workers["decode-0"].record.node_ip == "127.0.0.3"
        # Every ticket went out over torch.distributed, the backend between two nodes. The
        # figure arrives with the decode worker's next load report: read until it is there.
        deadline = time.monotonic() + 10
        choices = workers["decode-0"].load.transfer_choices
        while choices != {"torch_dist": len(PROMPTS)} and time.monotonic() < deadline:
            time.sleep(0.2)
            choices = live_workers(redis_server.url, cluster_name)["decode-0"].load.transfer_choices
        assert choices == {"torch_dist": len(PROMPTS)}, (tmp_path / "router.log").read_text()[-4000:]
        for name in ("prefill-0", "decode-0"):
            record = workers[name].record
            for endpoint in record.endpoints.values():
                assert endpoint.startswith(record.node_ip + ":"), (name, endpoint)
            addresses = listening_addresses(record.pid)
            assert addresses and "127.0.0.1" not in addresses, (name, addresses)
        router.send_signal(signal.SIGINT)
        assert router.wait(timeout=120) == 0
    finally:
        stop_process(router, log)
