"""The gRPC front door's API keys, limits, TLS and mutual TLS, and per-key rate limits shared by
two servers through a real redis-server; a real grpc.aio server with the fake backend of
tests/test_grpc_server.py, certificates made here."""
from __future__ import annotations

import asyncio
import contextlib
import io

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cluster_state import ClusterKeys, RedisSettings, connect
from cluster_state.rate_limits import RateLimit
from protos.pdserve.v1 import generation_pb2 as pb
from protos.pdserve.v1 import generation_pb2_grpc as pb_grpc
from router.client import Connection, run_client
from router.grpc_server import GrpcServer
from router.limits import RequestLimits
from router.security import ApiKeys, Gatekeeper, SecurityConfig, TlsError, TlsFiles
from router.security.gatekeeper import client_host
from router.security.tls import client_credentials
from tests.certs import CertificateAuthority
from tests.test_grpc_server import WAIT_S, FakeBackend, FakeTokenizer, collect, prompt_request, run

KEYS = ("key-one", "key-two")


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@contextlib.asynccontextmanager
async def server_with(gate: Gatekeeper, backend: FakeBackend | None = None):
    server = GrpcServer(backend or FakeBackend(), FakeTokenizer(), "127.0.0.1", 0, gatekeeper=gate)
    port = await server.start()
    await server.set_serving(True)
    try:
        yield server, port
    finally:
        await server.stop(None)


async def refusal(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


# --- API keys ---------------------------------------------------------------------------------
def test_api_keys_missing_or_wrong_are_unauthenticated_and_probes_stay_open() -> None:
    async def scenario():
        backend = FakeBackend()
        async with server_with(Gatekeeper(keys=ApiKeys(KEYS)), backend) as (_, port):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GenerationStub(channel)
                missing = await refusal(collect(stub, prompt_request(max_tokens=2)))
                wrong = await refusal(collect(stub, prompt_request(max_tokens=2), metadata=bearer("key-three")))
                not_bearer = await refusal(collect(stub, prompt_request(max_tokens=2),
                                                   metadata=(("authorization", "Basic key-one"),)))
                models = await refusal(stub.ListModels(pb.ListModelsRequest()))
                assert backend.calls == []
                served = [await collect(stub, prompt_request(max_tokens=2), metadata=bearer(k)) for k in KEYS]
                listed = await stub.ListModels(pb.ListModelsRequest(), metadata=bearer("key-two"))
                health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
                services = [s.name async for r in reflection for s in r.list_services_response.service]
        return missing, wrong, not_bearer, models, served, listed, health, services

    missing, wrong, not_bearer, models, served, listed, health, services = run(scenario())
    for error in (missing, wrong, not_bearer, models):
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "required" in missing.details() and "not valid" in wrong.details()
    assert all(s[-1].finish_reason == pb.FINISH_REASON_LENGTH for s in served)
    assert [m.name for m in listed.models] == ["tiny"]
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert "pdserve.v1.Generation" in services


def test_key_files_and_environment(tmp_path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text("# team a\nkey-a\n\n  key-b  \n# key-c is revoked\n")
    keys = ApiKeys.gather(["key-flag"], [str(path)], env="key-env")
    assert keys.keys == ("key-flag", "key-a", "key-b", "key-env")
    assert not ApiKeys().required
    with pytest.raises(ValueError, match="--api-key-file .*missing"):
        ApiKeys.gather(files=[str(tmp_path / "missing")])
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no key"):
        ApiKeys.gather(files=[str(tmp_path / "empty")])


# --- limits ------------------------------------------------------------------------------------
LIMITS = RequestLimits(max_message_bytes=4096, max_prompt_tokens=20, max_stop_strings=2,
                       max_stop_string_chars=8, max_stop_token_ids=3, max_logprobs=2,
                       max_streams_per_connection=2)


@pytest.mark.parametrize("request_, code, text", [
    (prompt_request(stop=["a", "b", "c"]), "INVALID_ARGUMENT", "sampling_params.stop: 3 stop strings; at most 2 (--max-stop-strings)"),
    (prompt_request(stop=["ok", "x" * 9]), "INVALID_ARGUMENT", "sampling_params.stop[1]: 9 characters; at most 8 (--max-stop-string-chars)"),
    (prompt_request(stop_token_ids=[3, 4, 5, 6]), "INVALID_ARGUMENT", "sampling_params.stop_token_ids: 4 ids; at most 3 (--max-stop-token-ids)"),
    (prompt_request(logprobs=3), "INVALID_ARGUMENT", "sampling_params.logprobs: 3 top logprobs asked; at most 2 (--max-logprobs)"),
    (prompt_request("x" * 20), "INVALID_ARGUMENT", "prompt: prompt has 21 tokens; at most 20 (--max-prompt-tokens)"),
    (prompt_request("x" * 5000), "RESOURCE_EXHAUSTED", "larger than max"),
])
def test_each_limit_refuses_with_an_error_naming_it(request_, code, text) -> None:
    async def scenario():
        backend = FakeBackend()
        async with server_with(Gatekeeper(limits=LIMITS), backend) as (_, port):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GenerationStub(channel)
                error = await refusal(collect(stub, request_, timeout=WAIT_S))
                within = await collect(stub, prompt_request(max_tokens=2, stop=["zz"], logprobs=2))
        return backend, error, within

    backend, error, within = run(scenario())
    assert error.code().name == code
    assert text in error.details(), error.details()
    assert len(backend.calls) == 1 and within[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_streams_per_connection_past_the_limit_are_refused() -> None:
    async def scenario():
        backend = FakeBackend(hang_after=1)
        async with server_with(Gatekeeper(limits=LIMITS), backend) as (_, port):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel, \
                    grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                              options=[("grpc.use_local_subchannel_pool", 1)]) as other:
                stub = pb_grpc.GenerationStub(channel)
                calls = [stub.Generate(prompt_request(max_tokens=4)) for _ in range(2)]
                for call in calls:
                    await call.__aiter__().__anext__()
                third = await refusal(collect(stub, prompt_request(max_tokens=2), timeout=WAIT_S))
                elsewhere = await collect(pb_grpc.GenerationStub(other), prompt_request(max_tokens=1), timeout=WAIT_S)
                calls[0].cancel()
                await asyncio.wait_for(backend.abort_event.wait(), WAIT_S)
                backend.hang_after = None
                freed = await collect(stub, prompt_request(max_tokens=1), timeout=WAIT_S)
                calls[1].cancel()
        return third, elsewhere, freed

    third, elsewhere, freed = run(scenario())
    assert third.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at most 2 (--max-streams-per-connection)" in third.details()
    assert elsewhere[-1].finish_reason == pb.FINISH_REASON_LENGTH  # another connection has its own
    assert freed[-1].finish_reason == pb.FINISH_REASON_LENGTH  # a closed stream makes room


# --- TLS ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, stranger = CertificateAuthority(folder, "test-ca"), CertificateAuthority(folder, "other-ca")
    return {"ca": ca.pem.cert, "server": ca.issue("server", server=True),
            "client": ca.issue("client", server=False), "stranger": stranger.issue("stranger", server=False)}


def _secure(port: int, pki, client: str | None = None) -> grpc.aio.Channel:
    pem = pki[client] if client else None
    creds = client_credentials(pki["ca"], pem.cert if pem else None, pem.key if pem else None)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)


def test_tls_serves_trusting_clients_and_refuses_plaintext(pki) -> None:
    async def scenario():
        tls = TlsFiles(pki["server"].cert, pki["server"].key).load()
        async with server_with(Gatekeeper(tls=tls)) as (_, port):
            async with _secure(port, pki) as channel:
                served = await collect(pb_grpc.GenerationStub(channel), prompt_request(max_tokens=2))
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                plain = await refusal(collect(pb_grpc.GenerationStub(channel), prompt_request(), timeout=3))
        return served, plain

    served, plain = run(scenario())
    assert served[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert plain.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(pki, tmp_path) -> None:
    async def scenario():
        tls = TlsFiles(pki["server"].cert, pki["server"].key, pki["ca"]).load()
        assert tls.mutual
        async with server_with(Gatekeeper(tls=tls, keys=ApiKeys(KEYS))) as (_, port):
            async with _secure(port, pki, "client") as channel:
                served = await collect(pb_grpc.GenerationStub(channel), prompt_request(max_tokens=2),
                                       metadata=bearer("key-one"))
            refused = []
            for client in (None, "stranger"):
                async with _secure(port, pki, client) as channel:
                    refused.append(await refusal(collect(pb_grpc.GenerationStub(channel), prompt_request(),
                                                         metadata=bearer("key-one"), timeout=3)))
            # The command-line client, with the same files and key.
            out, err = io.StringIO(), io.StringIO()
            code = await asyncio.to_thread(
                run_client, f"localhost:{port}", "hi", max_tokens=2, out=out, err=err,
                connection=Connection("key-one", pki["ca"], pki["client"].cert, pki["client"].key))
        return served, refused, code, out.getvalue(), err.getvalue()

    served, refused, code, out, err = run(scenario())
    assert served[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert [e.code() for e in refused] == [grpc.StatusCode.UNAVAILABLE] * 2
    assert code == 0 and out == "Hello wor\n", err


def test_tls_files_are_checked_naming_the_one_at_fault(pki, tmp_path) -> None:
    server, client = pki["server"], pki["client"]
    with pytest.raises(TlsError, match=f"--tls-key {client.key} does not match the certificate"):
        TlsFiles(server.cert, client.key).load()
    with pytest.raises(TlsError, match="--tls-cert .*nowhere.crt: cannot read it"):
        TlsFiles(str(tmp_path / "nowhere.crt"), server.key).load()
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(TlsError, match="--tls-client-ca .*junk.pem: not a PEM file"):
        TlsFiles(server.cert, server.key, str(tmp_path / "junk.pem")).load()


# --- rate limits -------------------------------------------------------------------------------
def test_rate_limits_are_shared_by_two_servers_through_redis(redis_server, cluster_name) -> None:
    async def scenario():
        redis = connect(RedisSettings(redis_server.url))
        security = SecurityConfig(ApiKeys(KEYS), RateLimit(requests_per_minute=2, tokens_per_minute=50))
        gates = [Gatekeeper.build(security, RequestLimits(), redis, ClusterKeys(cluster_name)) for _ in range(2)]
        try:
            async with server_with(gates[0]) as (_, port_a), server_with(gates[1]) as (_, port_b):
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port_a}") as a, \
                        grpc.aio.insecure_channel(f"127.0.0.1:{port_b}") as b:
                    stub_a, stub_b = pb_grpc.GenerationStub(a), pb_grpc.GenerationStub(b)
                    request = prompt_request(max_tokens=2)
                    await collect(stub_a, request, metadata=bearer("key-one"))
                    await collect(stub_b, request, metadata=bearer("key-one"))
                    over = await refusal(collect(stub_a, request, metadata=bearer("key-one")))
                    other_key = await collect(stub_b, request, metadata=bearer("key-two"))
                    too_big = await refusal(collect(stub_b, prompt_request(max_tokens=55),
                                                    metadata=bearer("key-two")))
        finally:
            await redis.aclose()
        return over, other_key, too_big

    over, other_key, too_big = run(scenario())
    assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2 requests per minute (--rate-limit-rpm)" in over.details()
    retry_after = dict(over.trailing_metadata())["retry-after"]
    assert int(retry_after) >= 1 and int(retry_after) <= 30  # one request comes back every 30 s
    assert other_key[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert too_big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--rate-limit-tpm" in too_big.details() and "retry-after" not in dict(too_big.trailing_metadata())


def test_a_request_without_max_tokens_runs_within_a_minute_of_tokens(redis_server, cluster_name) -> None:
    """The server would give it the rest of the 64-token context, more than the 50 tokens a
    minute the key has: it runs to 50 less its prompt instead of being refused; one that asks
    for more than that itself is still refused."""
    backend = FakeBackend()

    async def scenario():
        redis = connect(RedisSettings(redis_server.url))
        security = SecurityConfig(ApiKeys(KEYS), RateLimit(tokens_per_minute=50))
        gate = Gatekeeper.build(security, RequestLimits(), redis, ClusterKeys(cluster_name))
        try:
            async with server_with(gate, backend) as (_, port):
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    stub = pb_grpc.GenerationStub(channel)
                    defaulted = await collect(stub, prompt_request(), metadata=bearer("key-one"))
                    asked = await refusal(collect(stub, prompt_request(max_tokens=60), metadata=bearer("key-two")))
        finally:
            await redis.aclose()
        return defaulted, asked

    defaulted, asked = run(scenario())
    (_, prompt_ids, params), = backend.calls
    assert params.max_tokens == 50 - len(prompt_ids)
    assert defaulted[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert defaulted[-1].usage.completion_tokens == 50 - len(prompt_ids)
    assert asked.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--rate-limit-tpm" in asked.details()


def test_without_keys_made_up_tokens_share_their_address_bucket(redis_server, cluster_name) -> None:
    """No keys configured: a bearer token nobody checks must not buy a fresh bucket."""
    async def scenario():
        redis = connect(RedisSettings(redis_server.url))
        security = SecurityConfig(ApiKeys(()), RateLimit(requests_per_minute=2))
        gate = Gatekeeper.build(security, RequestLimits(), redis, ClusterKeys(cluster_name))
        try:
            async with server_with(gate) as (_, port):
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    stub = pb_grpc.GenerationStub(channel)
                    request = prompt_request(max_tokens=2)
                    await collect(stub, request, metadata=bearer("made-up-1"))
                    await collect(stub, request)
                    return await refusal(collect(stub, request, metadata=bearer("made-up-2")))
        finally:
            await redis.aclose()

    over = run(scenario())
    assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2 requests per minute (--rate-limit-rpm)" in over.details()


@pytest.mark.parametrize("address, host", [
    ("ipv4:10.1.2.3:50123", "10.1.2.3"), ("10.1.2.3", "10.1.2.3"),
    ("ipv6:[::1]:50123", "::1"), ("::1", "::1"), ("unix:/tmp/s", "unix:/tmp/s"),
])
def test_grpc_and_http_name_a_client_host_alike(address, host) -> None:
    assert client_host(address) == host


# --- resume_from without a journal -------------------------------------------------------------
@pytest.mark.parametrize("request_, code, text", [
    (pb.GenerateRequest(resume_from=3), "INVALID_ARGUMENT", "request_id: required with resume_from"),
    (pb.GenerateRequest(request_id="r", resume_from=-1), "INVALID_ARGUMENT", "resume_from: must be at least 0"),
    (pb.GenerateRequest(request_id="r", resume_from=0), "NOT_FOUND", "keeps no request journal"),
])
def test_resume_from_is_checked(request_, code, text) -> None:
    async def scenario():
        async with server_with(Gatekeeper()) as (_, port):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await refusal(collect(pb_grpc.GenerationStub(channel), request_))

    error = run(scenario())
    assert error.code().name == code and text in error.details()


# --- the HTTP front door -----------------------------------------------------------------------
@contextlib.asynccontextmanager
async def http_server_with(gate: Gatekeeper, backend: FakeBackend | None = None):
    from router.http import HttpServer

    server = HttpServer(backend or FakeBackend(), FakeTokenizer(), "127.0.0.1", 0, gatekeeper=gate)
    port = await server.start()
    await server.set_serving(True)
    try:
        yield server, port
    finally:
        await server.stop()


def completion(max_tokens: int = 2, **extra) -> dict:
    return {"prompt": "hi", "max_tokens": max_tokens, **extra}


async def post(session, url: str, body: dict, key: str | None = None, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with session.post(url, json=body, headers=headers, **kwargs) as response:
        return response.status, await response.json(), dict(response.headers)


def test_http_api_keys_rate_limits_and_limits(redis_server, cluster_name) -> None:
    import aiohttp

    async def scenario():
        redis = connect(RedisSettings(redis_server.url))
        security = SecurityConfig(ApiKeys(KEYS), RateLimit(requests_per_minute=2))
        gate = Gatekeeper.build(security, LIMITS, redis, ClusterKeys(cluster_name))
        results = {}
        try:
            async with http_server_with(gate) as (_, port), aiohttp.ClientSession() as session:
                url = f"http://127.0.0.1:{port}"
                results["missing"] = await post(session, url + "/v1/completions", completion())
                results["wrong"] = await post(session, url + "/v1/completions", completion(), "nope")
                async with session.get(url + "/v1/models") as response:
                    results["models"] = response.status
                async with session.get(url + "/health") as response:
                    results["health"] = response.status
                results["served"] = await post(session, url + "/v1/completions", completion(), "key-one")
                results["limit"] = await post(session, url + "/v1/completions",
                                              completion(stop=["a", "b", "c"]), "key-one")
                results["second"] = await post(session, url + "/v1/completions", completion(), "key-one")
                results["over"] = await post(session, url + "/v1/completions", completion(), "key-one")
                results["other_key"] = await post(session, url + "/v1/completions", completion(), "key-two")
        finally:
            await redis.aclose()
        return results

    r = run(scenario())
    for name in ("missing", "wrong"):
        status, body, headers = r[name]
        assert status == 401 and body["error"]["code"] == "invalid_api_key", r[name]
        assert headers["WWW-Authenticate"] == "Bearer"
    assert "Authorization: Bearer KEY" in r["missing"][1]["error"]["message"]
    assert r["models"] == 401 and r["health"] == 200
    assert r["served"][0] == 200 and r["served"][1]["choices"][0]["text"] == "Hello wor"
    status, body, _ = r["limit"]  # refused before the rate limit takes anything
    assert status == 400 and body["error"]["param"] == "stop"
    assert body["error"]["message"] == "stop: 3 stop strings; at most 2 (--max-stop-strings)"
    assert r["second"][0] == 200
    status, body, headers = r["over"]
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["type"] == "rate_limit_exceeded" and "--rate-limit-rpm" in body["error"]["message"]
    retry_after = int(headers["Retry-After"])
    assert retry_after >= 1 and retry_after <= 30
    assert r["other_key"][0] == 200


def test_http_streams_per_client_address_past_the_limit_get_429() -> None:
    import aiohttp

    async def scenario():
        backend = FakeBackend(hang_after=1)
        async with http_server_with(Gatekeeper(limits=LIMITS), backend) as (_, port), \
                aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/v1/completions"
            streams = [await session.post(url, json=completion(4, stream=True)) for _ in range(2)]
            for response in streams:
                await response.content.readline()  # the first event: the stream is open
            refused = await post(session, url, completion())
            for response in streams:
                response.close()
            await asyncio.wait_for(backend.abort_event.wait(), WAIT_S)
        return refused

    status, body, _ = run(scenario())
    assert status == 429 and body["error"]["code"] == "too_many_streams"
    assert "at most 2 (--max-streams-per-connection)" in body["error"]["message"]


def test_http_over_tls_and_mutual_tls(pki) -> None:
    import ssl

    import aiohttp

    from router.security.tls import client_ssl_context

    async def scenario():
        results = []
        for mutual in (False, True):
            tls = TlsFiles(pki["server"].cert, pki["server"].key, pki["ca"] if mutual else None).load()
            async with http_server_with(Gatekeeper(tls=tls)) as (_, port), aiohttp.ClientSession() as session:
                url = f"https://localhost:{port}/v1/completions"
                client = pki["client"] if mutual else None
                context = client_ssl_context(pki["ca"], client.cert if client else None, client.key if client else None)
                results.append(await post(session, url, completion(), ssl=context))
                if mutual:
                    for stranger in (None, pki["stranger"]):
                        context = client_ssl_context(pki["ca"], stranger.cert if stranger else None,
                                                     stranger.key if stranger else None)
                        with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
                            await post(session, url, completion(), ssl=context)
                else:
                    with pytest.raises(aiohttp.ClientError):
                        await post(session, url.replace("https", "http"), completion())
        return results

    for status, body, _ in run(scenario()):
        assert status == 200 and body["choices"][0]["text"] == "Hello wor"


def test_serve_refuses_bad_security_files_before_starting_anything(pki, tmp_path) -> None:
    import subprocess

    from cluster_state.server import free_port
    from tests.cluster_helpers import router_process_command

    def serve(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(router_process_command() + ["serve", "--grpc-port", str(free_port()),
                                                          "--no-http", *flags],
                              capture_output=True, text=True, timeout=120)

    mismatched = serve("--tls-cert", pki["server"].cert, "--tls-key", pki["client"].key)
    assert mismatched.returncode == 1
    assert f"--tls-key {pki['client'].key} does not match the certificate" in mismatched.stderr
    half = serve("--tls-cert", pki["server"].cert)
    assert half.returncode == 2 and "--tls-cert and --tls-key go together" in half.stderr
    no_file = serve("--api-key-file", str(tmp_path / "absent.txt"))
    assert no_file.returncode == 2 and "--api-key-file" in no_file.stderr and "absent.txt" in no_file.stderr


@pytest.mark.parametrize("raw, details", [
    (b"\x1a\x02\xff\xfe", "prompt: not valid UTF-8"),
    (b"\x22\x0b\x0a\x09\x0a\x04user\x12\x01\xff", "chat.messages[0].content: not valid UTF-8"),
    (b"\x32\x06\x3a\x01a\x3a\x01\xc3", "sampling_params.stop[1]: not valid UTF-8"),
    (b"\xff\xff\xff", "request: not a valid GenerateRequest"),
])
def test_requests_that_do_not_parse_are_invalid_naming_the_field(raw, details) -> None:
    async def scenario():
        backend = FakeBackend()
        async with server_with(Gatekeeper(), backend) as (_, port):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_stream("/pdserve.v1.Generation/Generate", request_serializer=lambda b: b,
                                            response_deserializer=pb.GenerateResponse.FromString)
                return backend, await refusal(collect_raw(call(raw, timeout=WAIT_S)))

    async def collect_raw(call):
        return [r async for r in call]

    backend, error = run(scenario())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(details), error.details()
    assert backend.calls == []
