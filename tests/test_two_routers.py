"""Two routers serve one cluster (one Ray cluster started by `ray start`, one Redis, one cluster
name): the second attaches to the pools the first created; kill -9 of the first leaves the second
serving and every worker running, and the dead router's requests leak no KV blocks."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import grpc
import pytest

from engine import LLM, SamplingParams
from protos.pdserve.v1 import generation_pb2 as pb
from protos.pdserve.v1 import generation_pb2_grpc as pb_grpc
from tests.cluster_helpers import stop_process, live_workers, collect, greedy_request, router_process_command, wait_for_serving
from tests.ray_nodes import RayNode, pdserve_env

pytestmark = pytest.mark.slow

PROMPTS = [[3 + (13 * i + j) % 300 for j in range(7 + 2 * i)] for i in range(6)]
ROUTER_LEASE_S = 3.0  # workers abort a silent router's requests after this long
LONG = 8000  # tokens: a stream that runs far longer than that lease (8 s and more here)


@pytest.fixture(scope="module")
def ray_head():
    node = RayNode("127.0.0.1", num_cpus=4).start()
    yield node
    node.stop()


def start_router(tmp_path, name: str, port: int, ray_head, redis_url: str, cluster: str, model: str,
                 *extra: str) -> tuple[subprocess.Popen, object]:
    log = open(tmp_path / f"{name}.log", "w")
    args = router_process_command() + [
        "serve", "--ray-address", ray_head.address, "--redis-url", redis_url, "--cluster-name", cluster,
        "--grpc-port", str(port), "--http-port", "0", "--host", "127.0.0.1", "--model", model, "--dtype", "float32",
        "--device", "cpu", "--block-size", "16", "--kv-cache-memory-gb", "0.15", "--max-num-seqs", "8",
        "--torch-threads", "1", "--router-lease", str(ROUTER_LEASE_S), "--no-http", *extra]
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env=ray_head.env(pdserve_env())), log




def test_a_second_router_attaches_and_survives_the_first_ones_death(
        tmp_path, long_tiny_checkpoint, redis_server, ray_head, cluster_name):
    from cluster_state.server import free_port

    model = long_tiny_checkpoint
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in LLM(model, dtype="float32", device="cpu").generate(PROMPTS, params)]
    port_a, port_b = free_port(), free_port()
    router_a, log_a = start_router(tmp_path, "a", port_a, ray_head, redis_server.url, cluster_name, model)
    router_b = None
    try:
        wait_for_serving(f"127.0.0.1:{port_a}", router_a, 300, tmp_path / "a.log")
        router_b, log_b = start_router(tmp_path, "b", port_b, ray_head, redis_server.url, cluster_name,
                                       model, "--join")
        wait_for_serving(f"127.0.0.1:{port_b}", router_b, 300, tmp_path / "b.log")
        assert "attached to the existing pools" in (tmp_path / "b.log").read_text()
        stubs = {port: pb_grpc.GenerationStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
                 for port in (port_a, port_b)}
        for stub in stubs.values():  # both serve, from the same workers
            assert [collect(stub.Generate(greedy_request(p, 8)))[0] for p in PROMPTS] == expected
        before = live_workers(redis_server.url, cluster_name)
        assert set(before) == {"prefill-0", "decode-0"}

        # Long streams on router A, then A dies mid-stream.
        streams = [stubs[port_a].Generate(greedy_request(PROMPTS[i], LONG)) for i in range(4)]
        for s in streams:
            next(s)
        os.kill(router_a.pid, signal.SIGKILL)
        router_a.wait()
        killed_at = time.monotonic()
        with pytest.raises(grpc.RpcError):
            for s in streams:
                list(s)
        # B serves on; the workers are the same processes, same incarnations.
        assert [collect(stubs[port_b].Generate(greedy_request(p, 8)))[0] for p in PROMPTS] == expected
        deadline = time.monotonic() + 60  # the workers notice A stopped polling and free its requests
        while True:
            after = live_workers(redis_server.url, cluster_name)
            idle = all(w.load.num_unfinished == 0 and w.load.num_free_blocks == w.load.num_blocks
                       for w in after.values())
            if idle and set(after) == set(before):
                break
            assert time.monotonic() < deadline, f"blocks leaked: {[w.load for w in after.values()]}"
            time.sleep(0.5)
        # Freed by the workers' router lease, long before the streams could have ended by themselves.
        assert time.monotonic() - killed_at < ROUTER_LEASE_S + 4
        assert {k: (w.record.pid, w.record.generation) for k, w in after.items()} == \
               {k: (w.record.pid, w.record.generation) for k, w in before.items()}
        # Ctrl-C on the last router takes the cluster down (A's lease may still run: A is gone).
        router_b.send_signal(signal.SIGINT)
        assert router_b.wait(timeout=120) == 0
        assert live_workers(redis_server.url, cluster_name) == {}
    finally:
        stop_process(router_a, log_a)
        stop_process(router_b)


def test_pdserve_down_stops_the_pools_a_killed_router_left_behind(
        tmp_path, tiny_checkpoints, redis_server, ray_head, cluster_name):
    from cluster_state.server import free_port

    port = free_port()
    router, log = start_router(tmp_path, "c", port, ray_head, redis_server.url, cluster_name,
                               tiny_checkpoints["llama3"])
    try:
        wait_for_serving(f"127.0.0.1:{port}", router, 300, tmp_path / "c.log")
        assert set(live_workers(redis_server.url, cluster_name)) == {"prefill-0", "decode-0"}
        os.kill(router.pid, signal.SIGKILL)  # nobody is left to take the pools down
        router.wait()
        down = subprocess.run(router_process_command() + [
            "down", "--ray-address", ray_head.address, "--redis-url", redis_server.url,
            "--cluster-name", cluster_name], capture_output=True, text=True, timeout=120,
            env=ray_head.env(pdserve_env()))
        assert down.returncode == 0, down.stderr
        assert "2 workers stopped" in down.stderr
        assert live_workers(redis_server.url, cluster_name) == {}
        # The names are free again: a new router of the same cluster creates fresh pools.
        router, log = start_router(tmp_path, "d", port, ray_head, redis_server.url, cluster_name,
                                   tiny_checkpoints["llama3"])
        wait_for_serving(f"127.0.0.1:{port}", router, 300, tmp_path / "d.log")
        assert "attached" not in (tmp_path / "d.log").read_text()
        assert {w.record.generation for w in live_workers(redis_server.url, cluster_name).values()} == {1}
        router.send_signal(signal.SIGINT)
        assert router.wait(timeout=120) == 0
    finally:
        stop_process(router, log)


def test_a_stream_resumes_on_another_router_after_its_router_is_killed(
        tmp_path, long_tiny_checkpoint, redis_server, ray_head, cluster_name):
    """Acceptance: kill -9 of the router mid-stream after k tokens; the client resumes on the
    other router with the same request id and resume_from=k and gets the rest, each token once:
    the concatenation equals an uninterrupted engine.LLM greedy run. Both routers require an API
    key and share one rate limit through Redis; another accepted key cannot resume the stream."""
    from cluster_state.server import free_port

    model, prompt, total = long_tiny_checkpoint, PROMPTS[3], 1200
    params = SamplingParams(max_tokens=total, temperature=0.0, ignore_eos=True)
    expected = LLM(model, dtype="float32", device="cpu").generate([prompt], params)[0].token_ids
    port_a, port_b = free_port(), free_port()
    security = ("--api-key", "secret-key", "--api-key", "other-key", "--rate-limit-rpm", "2")
    key = (("authorization", "Bearer secret-key"),)
    router_a, log_a = start_router(tmp_path, "a", port_a, ray_head, redis_server.url, cluster_name, model,
                                   *security)
    router_b = log_b = None
    try:
        wait_for_serving(f"127.0.0.1:{port_a}", router_a, 300, tmp_path / "a.log")  # health needs no key
        router_b, log_b = start_router(tmp_path, "b", port_b, ray_head, redis_server.url, cluster_name,
                                       model, "--join", *security)
        wait_for_serving(f"127.0.0.1:{port_b}", router_b, 300, tmp_path / "b.log")
        stub_a = pb_grpc.GenerationStub(grpc.insecure_channel(f"127.0.0.1:{port_a}"))
        stub_b = pb_grpc.GenerationStub(grpc.insecure_channel(f"127.0.0.1:{port_b}"))
        received: list[int] = []
        stream = stub_a.Generate(greedy_request(prompt, total, request_id="resume-me"), metadata=key)
        for response in stream:
            received.extend(response.token_ids)
            if len(received) >= 16:
                break
        os.kill(router_a.pid, signal.SIGKILL)
        router_a.wait()
        k = len(received)
        assert k < total  # killed mid-stream

        resume = pb.GenerateRequest(request_id="resume-me", resume_from=k)
        with pytest.raises(grpc.RpcError) as stranger:  # a valid key, not the stream's: no such stream
            collect(stub_b.Generate(resume, timeout=30, metadata=(("authorization", "Bearer other-key"),)))
        assert stranger.value.code() == grpc.StatusCode.NOT_FOUND and "resume-me" in stranger.value.details()
        deadline = time.monotonic() + 60
        while True:  # UNAVAILABLE until A's router lease runs out: it might still be alive
            try:
                rest, _, last = collect(stub_b.Generate(resume, timeout=120, metadata=key))
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                assert "still running" in err.details() and time.monotonic() < deadline
                time.sleep(0.5)
        assert received + rest == expected  # no gap, no duplicate, greedy as uninterrupted
        assert last.finish_reason == pb.FINISH_REASON_LENGTH and last.usage.completion_tokens == total

        # Refusals name what is wrong: an id never seen, more tokens than were journaled.
        with pytest.raises(grpc.RpcError) as unknown:
            collect(stub_b.Generate(pb.GenerateRequest(request_id="never-seen", resume_from=0), timeout=30,
                                    metadata=key))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and "never-seen" in unknown.value.details()
        with pytest.raises(grpc.RpcError) as beyond:
            collect(stub_b.Generate(pb.GenerateRequest(request_id="resume-me", resume_from=total + 5), timeout=30,
                                    metadata=key))
        assert beyond.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert f"journal has {total} tokens" in beyond.value.details()
        # The finished stream resumed at its end: nothing more to send, the end again.
        tail, _, last = collect(stub_b.Generate(pb.GenerateRequest(request_id="resume-me", resume_from=total),
                                                timeout=30, metadata=key))
        assert tail == [] and last.finish_reason == pb.FINISH_REASON_LENGTH
        # The key's 2 requests a minute: A's stream took one (a resumption takes none), so B
        # serves one more and refuses the next, with a retry-after.
        with pytest.raises(grpc.RpcError) as keyless:
            collect(stub_b.Generate(greedy_request(prompt, 2), timeout=30))
        assert keyless.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert len(collect(stub_b.Generate(greedy_request(prompt, 2), timeout=30, metadata=key))[0]) == 2
        with pytest.raises(grpc.RpcError) as limited:
            collect(stub_b.Generate(greedy_request(prompt, 2), timeout=30, metadata=key))
        assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert int(dict(limited.value.trailing_metadata())["retry-after"]) >= 1
        router_b.send_signal(signal.SIGINT)
        assert router_b.wait(timeout=120) == 0
    finally:
        stop_process(router_a, log_a)
        stop_process(router_b, log_b)
