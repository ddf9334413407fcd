"""Property-based fuzzing of both front doors against one real cluster (a tiny checkpoint, one
colocated worker).

gRPC: every field of GenerateRequest with huge, negative, NaN and infinite numbers, token ids
outside the vocabulary, huge stop lists, messages past the size limit, and raw bytes (invalid
UTF-8 in every string field, corrupt wire format). HTTP: OpenAI bodies with wrong types, huge
numbers, NaN and Infinity literals, deeply nested JSON, invalid UTF-8, huge stop lists and
oversized bodies. Every case is served, or refused with INVALID_ARGUMENT / 400 (or the limit's own
code) and a message naming the field; none gets INTERNAL / UNKNOWN / 500, none hangs, and
afterwards the worker is the same process, healthy, serving a normal request. The number of
cases is printed at the end of the run."""
from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import EngineConfig
from protos.pdserve.v1 import generation_pb2 as pb
from protos.pdserve.v1 import generation_pb2_grpc as pb_grpc
from router.embedded import EmbeddedCluster, workers_idle
from router.limits import RequestLimits
from router.pools import PoolConfig
from router.serve import ServeConfig
from tests.cluster_helpers import collect, greedy_request
from tests.fuzz_report import count, outcome

pytestmark = pytest.mark.slow

MAX_MESSAGE_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024
DEADLINE_S = 20.0  # a hang fails the case; generous for a loaded CI machine
FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# What a refusal's message starts with: the path of a GenerateRequest field.
FIELD = re.compile(r"^(request|input|request_id|model|prompt|priority|resume_from|"
                   r"chat(\.messages(\[\d+\](\.role|\.content)?)?)?|token_ids\.ids(\[\d+\])?|"
                   r"sampling_params\.\w+(\[\d+\])?): ")
# Codes a case may end with besides OK, and what each must say.
ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT: FIELD,
    grpc.StatusCode.RESOURCE_EXHAUSTED: re.compile(r"(larger than max|--max-)"),
    grpc.StatusCode.NOT_FOUND: re.compile(r"^resume_from: "),
    grpc.StatusCode.OUT_OF_RANGE: re.compile(r"^resume_from: "),
}


@pytest.fixture(scope="module")
def server(tiny_checkpoints, ray_local):
    engine = EngineConfig.from_options(tiny_checkpoints["llama3"], dtype="float32", device="cpu",
                                       num_blocks=96, block_size=4)
    config = ServeConfig(engine=engine, pools=PoolConfig(mode="colocated", torch_threads=1),
                         cluster_name="fuzz", limits=RequestLimits(max_message_bytes=MAX_MESSAGE_BYTES),
                         http_port=0, max_request_body_bytes=MAX_BODY_BYTES)
    with EmbeddedCluster(config) as cluster:
        channel = grpc.insecure_channel(f"127.0.0.1:{cluster.port}",
                                        options=[("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES)])
        workers = {w.worker_id: (w.record.pid, w.record.generation) for w in cluster.backend.view.workers.values()}
        yield cluster, channel, workers
        channel.close()


def check_outcome(call) -> None:
    """Served to the end, or refused cleanly."""
    try:
        responses = list(call)
    except grpc.RpcError as err:
        outcome(err.code().name)
        pattern = ALLOWED.get(err.code())
        assert pattern is not None, f"{err.code().name}: {err.details()}"
        assert pattern.search(err.details() or ""), f"{err.code().name}: {err.details()!r} names no field"
        return
    outcome("OK")
    assert responses and responses[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED


# --- strategies -------------------------------------------------------------------------------
INT32 = st.one_of(st.integers(-2**31, 2**31 - 1), st.sampled_from([-2**31, -1, 0, 1, 7, 2**31 - 1]))
INT64 = st.one_of(st.integers(-2**63, 2**63 - 1), st.sampled_from([-2**63, -1, 0, 2**63 - 1]))
DOUBLE = st.one_of(st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324,
                                                 0.0, -0.0, 0.5, 1.0, 2.0, -2.0000001]))
TOKEN = st.one_of(st.integers(0, 600), INT32)  # the tiny vocabulary has 512 ids
TEXT = st.one_of(st.text(max_size=40), st.builds(lambda c, n: c * n, st.characters(), st.integers(0, 400)))
LONG_TEXT = st.one_of(TEXT, st.integers(60_000, 80_000).map(lambda n: "a" * n))  # past the message limit


@st.composite
def sampling_params(draw) -> pb.SamplingParams:
    params = pb.SamplingParams()
    for name in ("max_tokens", "top_k", "logprobs"):
        if draw(st.booleans()):
            value = draw(st.one_of(INT32, st.integers(0, 24)))
            setattr(params, name, value)
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        if draw(st.booleans()):
            setattr(params, name, draw(st.one_of(DOUBLE, st.floats(0.01, 1.0))))
    if draw(st.booleans()):
        params.seed = draw(INT64)
    params.stop.extend(draw(st.lists(TEXT, max_size=draw(st.sampled_from([3, 40])))))
    params.stop_token_ids.extend(draw(st.lists(TOKEN, max_size=draw(st.sampled_from([3, 400])))))
    params.ignore_eos = draw(st.booleans())
    params.include_stop_str_in_output = draw(st.booleans())
    if draw(st.booleans()) and not params.HasField("max_tokens"):
        params.max_tokens = draw(st.integers(1, 6))  # most valid cases stay short
    return params


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    request = pb.GenerateRequest(request_id=draw(st.one_of(st.just(""), TEXT)), model=draw(st.sampled_from(["", "", "nope", "tiny"])),
                                 priority=draw(INT32))
    kind = draw(st.sampled_from(["prompt", "prompt", "chat", "token_ids", "token_ids", "none"]))
    if kind == "prompt":
        request.prompt = draw(LONG_TEXT)
    elif kind == "chat":
        for _ in range(draw(st.integers(0, 4))):
            request.chat.messages.add(role=draw(st.sampled_from(["user", "system", "assistant", "", "robot"])),
                                      content=draw(TEXT))
        if not request.chat.messages:
            request.chat.SetInParent()
    elif kind == "token_ids":
        request.token_ids.ids.extend(draw(st.one_of(st.lists(TOKEN, max_size=draw(st.sampled_from([8, 300]))),
                                                    st.lists(st.integers(3, 500), min_size=1, max_size=20))))
        request.token_ids.SetInParent()
    if draw(st.booleans()):
        request.sampling_params.CopyFrom(draw(sampling_params()))
    if draw(st.integers(0, 9)) == 0:
        request.resume_from = draw(INT32)
    return request


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field in protobuf wire format."""
    length, out = len(payload), bytearray()
    while True:
        out.append((length & 0x7F) | (0x80 if length > 0x7F else 0))
        length >>= 7
        if not length:
            break
    return bytes([number << 3 | 2]) + bytes(out) + payload


BAD_UTF8 = st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"ok\xf0\x28\x8c\x28", b"\x80abc"])
# Where the bad bytes go: (wire bytes of the request, the field the error must name).
UTF8_TARGETS = {
    "request_id": lambda bad: _field(1, bad),
    "model": lambda bad: _field(2, bad),
    "prompt": lambda bad: _field(3, bad),
    "chat.messages[0].content": lambda bad: _field(4, _field(1, _field(1, b"user") + _field(2, bad))),
    "chat.messages[1].role": lambda bad: _field(4, _field(1, _field(1, b"user")) + _field(1, _field(1, bad))),
    "sampling_params.stop[2]": lambda bad: _field(6, _field(7, b"a") + _field(7, b"b") + _field(7, bad)),
}


def raw_call(channel):
    return channel.unary_stream("/pdserve.v1.Generation/Generate", request_serializer=lambda raw: raw,
                                response_deserializer=pb.GenerateResponse.FromString)


# --- the properties ---------------------------------------------------------------------------
@FUZZ
@given(request=generate_requests())
def test_every_field_is_served_or_refused_naming_it(server, request) -> None:
    _, channel, _ = server
    count("grpc fields")
    check_outcome(pb_grpc.GenerationStub(channel).Generate(request, timeout=DEADLINE_S))


@settings(FUZZ, max_examples=60)
@given(target=st.sampled_from(sorted(UTF8_TARGETS)), bad=BAD_UTF8, prefix=st.sampled_from([b"", _field(3, b"hi")]))
def test_invalid_utf8_in_any_string_field_is_named(server, target, bad, prefix) -> None:
    _, channel, _ = server
    count("grpc invalid utf-8")
    raw = (prefix if target != "prompt" else b"") + UTF8_TARGETS[target](bad)
    with pytest.raises(grpc.RpcError) as info:
        list(raw_call(channel)(raw, timeout=DEADLINE_S))
    outcome(info.value.code().name)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == f"{target}: not valid UTF-8"


@settings(FUZZ, max_examples=80)
@given(raw=st.one_of(st.binary(max_size=120),
                     st.builds(lambda request, cut: request.SerializeToString()[:cut], generate_requests(),
                               st.integers(0, 40))))
def test_corrupt_wire_format_is_refused(server, raw) -> None:
    _, channel, _ = server
    count("grpc raw bytes")
    check_outcome(raw_call(channel)(raw, timeout=DEADLINE_S))


# --- HTTP -----------------------------------------------------------------------------------------
HTTP_FIELDS = ("model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
               "top_k", "min_p", "seed", "stop", "stop_token_ids", "logprobs", "top_logprobs", "n", "stream",
               "stream_options", "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos",
               "priority", "echo", "suffix", "best_of", "logit_bias", "response_format", "user",
               "include_stop_str_in_output")
JSON_NUMBER = st.one_of(st.integers(), st.integers(-2**70, 2**70), st.sampled_from([10**400, -10**400, 2**63, 2**64]),
                        st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0, 1, -1, 0.5, 2.5, 1e308]))
JSON_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), JSON_NUMBER, TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12)
# Values close to valid for each field, so that cases get past the first type check.
NEAR_VALID = {
    "prompt": st.one_of(TEXT, st.lists(TOKEN, max_size=12), st.lists(st.lists(TOKEN, max_size=3), max_size=2)),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "", "x"]),
                                                "content": st.one_of(TEXT, st.none(), st.lists(
                                                    st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
                                                    max_size=2))}), max_size=3),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=40)),
    "stop_token_ids": st.lists(TOKEN, max_size=300),
    "max_tokens": st.one_of(st.integers(1, 8), JSON_NUMBER),
    "temperature": JSON_NUMBER, "top_p": JSON_NUMBER, "min_p": JSON_NUMBER, "top_k": JSON_NUMBER,
    "seed": JSON_NUMBER, "logprobs": st.one_of(st.integers(0, 25), st.booleans()),
    "top_logprobs": st.integers(-1, 25), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}


@st.composite
def http_bodies(draw) -> tuple[str, dict]:
    chat = draw(st.booleans())
    body: dict = {"max_tokens": draw(st.integers(1, 6))}
    if chat:
        body["messages"] = [{"role": "user", "content": draw(TEXT) or "hi"}]
    else:
        body["prompt"] = draw(TEXT) or "hi"
    for name in draw(st.lists(st.sampled_from(HTTP_FIELDS), max_size=4, unique=True)):
        body[name] = draw(NEAR_VALID.get(name, JSON_VALUE) if draw(st.booleans()) else JSON_VALUE)
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


def http_post(cluster, path: str, raw: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(cluster.http_url.removesuffix("/v1") + path, data=raw, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=DEADLINE_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def check_http_outcome(status: int, payload: bytes) -> None:
    """Served to the end (a whole answer, or an event stream ending in [DONE] without an error), or
    refused with OpenAI's error JSON naming the field (or the body, when it is not JSON at all)."""
    outcome(f"HTTP {status}")
    assert status in (200, 400, 404, 413), (status, payload[:500])
    if status == 200:
        text = payload.decode()
        if text.startswith("data: "):
            assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text, text[-500:]
        else:
            assert json.loads(text)["choices"]
        return
    error = json.loads(payload)["error"]
    if status == 413:
        assert "body" in error["message"].lower() or "size" in error["message"].lower(), error
    elif error["param"] is None:  # a body that is not a JSON object at all
        assert "body" in error["message"] or "JSON" in error["message"], error
    else:
        assert error["message"].startswith(error["param"]), error


@FUZZ
@given(case=http_bodies())
def test_every_http_body_field_is_served_or_refused_naming_it(server, case) -> None:
    cluster, _, _ = server
    count("http bodies")
    path, body = case
    check_http_outcome(*http_post(cluster, path, json.dumps(body).encode()))


RAW_BODIES = st.one_of(
    st.binary(max_size=80),
    st.builds(lambda bad: b'{"prompt": "' + bad + b'", "max_tokens": 2}', BAD_UTF8),
    st.builds(lambda where: where.replace(b"X", b"\\udc80"), st.sampled_from(  # escaped lone surrogates
        [b'{"prompt": "aX"}', b'{"messages": [{"role": "user", "content": "X"}]}', b'{"prompt": "a", "stop": ["X"]}',
         b'{"prompt": "a", "X": 1}'])),
    st.builds(lambda depth, open_: open_ * depth, st.integers(10, 200_000), st.sampled_from([b"[", b'{"a":'])),
    st.builds(lambda depth: b'{"prompt": "hi", "stop": ' + b"[" * depth + b"]" * depth + b"}", st.integers(1, 50_000)),
    st.sampled_from([b'{"prompt": "hi", "temperature": NaN}', b'{"prompt": "hi", "top_p": Infinity}',
                     b'{"prompt": "hi", "min_p": -Infinity}', b'{"prompt": "hi", "max_tokens": 1e999}',
                     b'{"prompt": "hi", "max_tokens": 2', b"null", b"[]", b'"prompt"', b"",
                     b'{"prompt": "hi", "min_p": ' + b"9" * 5000 + b"}"]),
    st.builds(lambda field, sign: b'{"prompt": "hi", "' + field + b'": ' + sign + b"9" * 400 + b"}",
              st.sampled_from([b"temperature", b"top_p", b"min_p", b"top_k", b"seed", b"priority", b"max_tokens",
                               b"presence_penalty", b"repetition_penalty", b"logprobs", b"n"]),
              st.sampled_from([b"", b"-"])),
    st.integers(MAX_BODY_BYTES, 2 * MAX_BODY_BYTES).map(lambda n: b'{"prompt": "' + b"a" * n + b'"}'),
)


@settings(FUZZ, max_examples=80)
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), raw=RAW_BODIES)
def test_raw_http_bodies_are_refused_cleanly(server, path, raw) -> None:
    cluster, _, _ = server
    count("http raw bodies")
    check_http_outcome(*http_post(cluster, path, raw))


def test_after_the_fuzz_the_worker_is_the_same_healthy_process(server, tiny_checkpoints) -> None:
    cluster, channel, workers = server
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    after = {w.worker_id: (w.record.pid, w.record.generation) for w in cluster.backend.view.workers.values()}
    assert after == workers  # no worker died (a restart would bring a new pid and generation)
    ids, _, last = collect(pb_grpc.GenerationStub(channel).Generate(greedy_request([5, 9, 13], 4), timeout=30))
    assert len(ids) == 4 and last.finish_reason == pb.FINISH_REASON_LENGTH
    status, _ = http_post(cluster, "/v1/completions", json.dumps({"prompt": [5, 9, 13], "max_tokens": 3}).encode())
    assert status == 200
    assert workers_idle(cluster.wait_for_baseline())  # every KV block back, no request left
