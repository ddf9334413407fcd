"""The OpenAI-compatible HTTP API against a real cluster, through the `openai` package and raw HTTP.

One cluster (a small random Llama with an 8192-token context, 1 prefill + 1 decode worker, every
prompt prefilled on the prefill worker and its KV moved to the decode worker) serves
every test of the module over both front doors: HTTP answers must equal gRPC's for greedy
decoding, malformed bodies get OpenAI's error JSON, a client that hangs up mid-stream frees its
blocks everywhere, and /metrics counts what was served.
"""
from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request

import grpc
import pytest

from engine.config import EngineConfig
from protos.pdserve.v1 import generation_pb2 as pb
from router.cluster_backend import RoutingConfig
from router.embedded import EmbeddedCluster, workers_idle
from router.pools import PoolConfig
from router.serve import ServeConfig
from tests.cluster_helpers import collect

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

MAX_BODY_BYTES = 64 * 1024
DEFAULT_MAX_TOKENS = 40  # --default-max-tokens of the module's cluster
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
PROMPTS = ["The quick brown fox", "Once upon a time, in a land"]
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def cluster(long_tiny_checkpoint, ray_local):
    engine = EngineConfig.from_options(long_tiny_checkpoint, dtype="float32", device="cpu",
                                       num_blocks=1024, block_size=16, max_num_seqs=8)
    config = ServeConfig(engine=engine, pools=PoolConfig(torch_threads=1, lease_ttl_s=10.0),
                         routing=RoutingConfig(max_queued_requests=64, disaggregation="always"), max_request_body_bytes=MAX_BODY_BYTES,
                         default_max_tokens=DEFAULT_MAX_TOKENS)
    with EmbeddedCluster(config) as server:
        yield server


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.http_url, api_key="unused", max_retries=0)


def grpc_answer(cluster, max_tokens: int, prompt: str | None = None, chat=None) -> tuple[str, pb.Usage, str]:
    """(text, usage, finish reason) of a greedy gRPC request."""
    params = pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    if chat is not None:
        request = pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in chat]),
                                     sampling_params=params)
    else:
        request = pb.GenerateRequest(prompt=prompt, sampling_params=params)
    _, text, last = collect(cluster.stub().Generate(request))
    return text, last.usage, pb.FinishReason.Name(last.finish_reason)


# --- the same answers as gRPC ---------------------------------------------------------------
def test_completions_sync_and_async_streamed_or_not_equal_grpc(cluster, client):
    for prompt in PROMPTS:
        text, usage, _ = grpc_answer(cluster, 12, prompt=prompt)
        whole = client.completions.create(model="", prompt=prompt, max_tokens=12, **GREEDY)
        assert whole.choices[0].text == text
        assert whole.choices[0].finish_reason == "length"
        assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (usage.prompt_tokens, 12)
        assert whole.usage.total_tokens == usage.prompt_tokens + 12
        chunks = list(client.completions.create(prompt=prompt, max_tokens=12, stream=True, model="",
                                                stream_options={"include_usage": True}, **GREEDY))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text
        assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == usage.prompt_tokens

    async def async_client():
        aclient = openai.AsyncOpenAI(base_url=cluster.http_url, api_key="unused", max_retries=0)
        whole = await aclient.completions.create(model="", prompt=PROMPTS[0], max_tokens=12, **GREEDY)
        stream = await aclient.completions.create(model="", prompt=PROMPTS[0], max_tokens=12, stream=True,
                                                  **GREEDY)
        streamed = "".join([c.choices[0].text async for c in stream])
        await aclient.close()
        return whole.choices[0].text, streamed
    text, _, _ = grpc_answer(cluster, 12, prompt=PROMPTS[0])
    assert asyncio.run(async_client()) == (text, text)


def test_chat_sync_and_async_streamed_or_not_equal_grpc(cluster, client):
    text, usage, _ = grpc_answer(cluster, 10, chat=CHAT)
    whole = client.chat.completions.create(model=cluster.backend.model_names()[0], messages=CHAT,
                                           max_completion_tokens=10, **GREEDY)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == text
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (usage.prompt_tokens, 10)
    chunks = list(client.chat.completions.create(model="", messages=CHAT, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10

    async def async_client():
        aclient = openai.AsyncOpenAI(base_url=cluster.http_url, api_key="unused", max_retries=0)
        whole = await aclient.chat.completions.create(model="", messages=CHAT, max_tokens=10, **GREEDY)
        stream = await aclient.chat.completions.create(model="", messages=CHAT, max_tokens=10, stream=True,
                                                       **GREEDY)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
        await aclient.close()
        return whole.choices[0].message.content, streamed
    assert asyncio.run(async_client()) == (text, text)


def test_token_id_prompts_and_logprobs(cluster, client):
    ids = [5, 17, 99, 250, 31]
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling_params=pb.SamplingParams(
        max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2))
    grpc_ids, text, _ = collect(cluster.stub().Generate(request))
    whole = client.completions.create(model="", prompt=ids, max_tokens=6, logprobs=2, **GREEDY)
    assert whole.choices[0].text == text
    logprobs = whole.choices[0].logprobs
    assert len(logprobs.tokens) == len(grpc_ids) == 6
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    chat = client.chat.completions.create(model="", messages=CHAT, max_tokens=4, logprobs=True, top_logprobs=3,
                                          **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(entry.top_logprobs) == 3 for entry in content)
    # Greedy: the chosen token is the most likely one.
    assert all(entry.logprob == pytest.approx(entry.top_logprobs[0].logprob) for entry in content)


def test_a_request_without_max_tokens_runs_to_the_server_default_not_16(cluster, client):
    whole = client.completions.create(model="", prompt=PROMPTS[0], **GREEDY)
    assert whole.usage.completion_tokens == DEFAULT_MAX_TOKENS
    chat = client.chat.completions.create(model="", messages=CHAT, **GREEDY)
    assert chat.usage.completion_tokens == DEFAULT_MAX_TOKENS
    request = pb.GenerateRequest(prompt=PROMPTS[0], sampling_params=pb.SamplingParams(temperature=0.0,
                                                                                      ignore_eos=True))
    ids, text, _ = collect(cluster.stub().Generate(request))
    assert len(ids) == DEFAULT_MAX_TOKENS and text == whole.choices[0].text


# --- malformed bodies -----------------------------------------------------------------------
def post(url: str, body: bytes | dict, timeout: float = 60) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


MSG = [{"role": "user", "content": "hi"}]
MALFORMED = [
    ("completions", b"{not json", 400, None),
    ("completions", b"[1, 2]", 400, None),
    ("completions", b'{"prompt": "hi", "temperature": NaN}', 400, None),
    ("completions", {"max_tokens": 4}, 400, "prompt"),
    ("completions", {"prompt": ""}, 400, "prompt"),
    ("completions", {"prompt": 42}, 400, "prompt"),
    ("completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"prompt": [1, 10**9]}, 400, "prompt[1]"),
    ("completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ("completions", {"prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    ("completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("completions", {"prompt": "hi", "temperature": 2.5}, 400, "temperature"),
    ("completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("completions", {"prompt": "hi", "top_p": "all"}, 400, "top_p"),
    ("completions", {"prompt": "hi", "top_k": 1.5}, 400, "top_k"),
    ("completions", {"prompt": "hi", "min_p": 2}, 400, "min_p"),
    ("completions", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("completions", {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty"),
    ("completions", {"prompt": "hi", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("completions", {"prompt": "hi", "seed": "x"}, 400, "seed"),
    ("completions", {"prompt": "hi", "seed": 2**70}, 400, "seed"),
    ("completions", {"prompt": "hi", "priority": 2**31}, 400, "priority"),
    ("completions", {"prompt": "hi", "stop": 3}, 400, "stop"),
    ("completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("completions", {"prompt": "hi", "n": 2}, 400, "n"),
    ("completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    ("completions", {"prompt": "hi", "ignore_eos": 1}, 400, "ignore_eos"),
    ("completions", {"prompt": "hi", "stop_token_ids": [10**9]}, 400, "stop_token_ids[0]"),
    ("completions", {"prompt": "hi", "model": "no-such-model"}, 404, "model"),
    ("completions", {"prompt": "x" * MAX_BODY_BYTES}, 413, None),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {"messages": "hi"}, 400, "messages"),
    ("chat/completions", {}, 400, "messages"),
    ("chat/completions", {"messages": ["hi"]}, 400, "messages[0]"),
    ("chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]"),
    ("chat/completions", {"messages": MSG, "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ("chat/completions", {"messages": MSG, "logprobs": "yes"}, 400, "logprobs"),
    ("chat/completions", {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat/completions", {"messages": MSG, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("chat/completions", {"messages": MSG, "n": 3}, 400, "n"),
    ("chat/completions", {"messages": MSG, "model": 7}, 400, "model"),
    ("chat/completions", {"messages": MSG, "model": "gpt-4"}, 404, "model"),
]


def test_malformed_bodies_get_openai_errors_and_the_server_stays_healthy(cluster):
    base = cluster.http_url
    wrong = []
    for path, body, status, param in MALFORMED:
        got_status, got = post(f"{base}/{path}", body)
        error = got.get("error", {})
        if (got_status, error.get("param")) != (status, param) or not {"message", "type", "code"} <= error.keys():
            wrong.append((path, str(body)[:60], got_status, got))
    assert not wrong, wrong
    assert get(f"{base}/no-such-endpoint")[0] == 404
    assert get(cluster.http_url.removesuffix("/v1") + "/health")[0] == 200
    status, body = post(f"{base}/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] >= 1
    assert workers_idle(cluster.wait_for_baseline())


# --- a client that hangs up -------------------------------------------------------------------
def test_a_client_that_disconnects_mid_stream_frees_its_blocks_everywhere(cluster):
    baseline = cluster.wait_for_baseline()
    assert workers_idle(baseline)
    body = json.dumps({"prompt": PROMPTS[1], "max_tokens": 6000, "temperature": 0, "ignore_eos": True,
                       "stream": True}).encode()
    host, port = "127.0.0.1", cluster.http_port
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while received.count(b"data: ") < 5:  # a few tokens: the request runs on the workers
            received += sock.recv(65536)
        assert b"200 OK" in received.split(b"\r\n", 1)[0]
        running = cluster.run(cluster.backend.pools.stats())
        assert not workers_idle(running)
    stats = cluster.wait_for_baseline(timeout_s=30)
    assert workers_idle(stats), stats
    deadline = time.monotonic() + 10
    while cluster.backend.streams and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not cluster.backend.streams


# --- metrics ---------------------------------------------------------------------------------
def scrape(cluster) -> dict:
    """{(sample name, labels as a sorted tuple): value} of /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = get(cluster.http_url.removesuffix("/v1") + "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_count_what_was_served_over_both_front_doors(cluster, client):
    assert workers_idle(cluster.wait_for_baseline())
    before = scrape(cluster)
    served = []  # (prompt tokens, completion tokens, finish reason)
    for i, prompt in enumerate(PROMPTS):
        whole = client.completions.create(model="", prompt=prompt, max_tokens=5 + i, **GREEDY)
        served.append((whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.choices[0].finish_reason))
    chunks = list(client.chat.completions.create(model="", messages=CHAT, max_tokens=7, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    served.append((chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens, "length"))
    # A stop token: the first token greedy decoding picks (asked over gRPC) ends the request at once.
    stop_id = _token_id(cluster, [7, 8, 9])
    served.append((3, 1, "length"))
    stopped = client.completions.create(model="", prompt=[7, 8, 9], max_tokens=5, temperature=0.0,
                                        extra_body={"stop_token_ids": [stop_id]})
    assert stopped.choices[0].finish_reason == "stop"
    served.append((stopped.usage.prompt_tokens, stopped.usage.completion_tokens, "stop"))
    text, usage, _ = grpc_answer(cluster, 4, prompt=PROMPTS[0])
    served.append((usage.prompt_tokens, usage.completion_tokens, "length"))
    after = scrape(cluster)

    assert delta(before, after, "pdserve:prompt_tokens_total") == sum(p for p, _, _ in served)
    assert delta(before, after, "pdserve:generation_tokens_total") == sum(c for _, c, _ in served)
    for reason in ("length", "stop"):
        expected = sum(1 for _, _, r in served if r == reason)
        assert delta(before, after, "pdserve:request_success_total", finished_reason=reason) == expected
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                      "request_queue_time_seconds"):
        assert delta(before, after, f"pdserve:{histogram}_count") == len(served), histogram
    assert delta(before, after, "pdserve:inter_token_latency_seconds_count") == sum(c - 1 for _, c, _ in served)
    assert delta(before, after, "pdserve:time_per_output_token_seconds_count") == sum(
        1 for _, c, _ in served if c > 1)
    workers = {(w.worker_id, w.role) for w in cluster.backend.view.workers.values()}
    assert {role for _, role in workers} == {"prefill", "decode"}
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        present = {(dict(labels)["worker"], dict(labels)["role"]) for name, labels in after
                   if name == f"pdserve:{gauge}"}
        assert present == workers, gauge
    assert delta(before, after, "pdserve:disaggregation_decisions_total", path="remote", reason="always") == len(
        served)
    # Worker counters arrive with the workers' next load reports (published every interval).
    deadline = time.monotonic() + 10
    while True:
        after = scrape(cluster)
        moved = {role: sum(v for (name, labels), v in after.items() if name == "pdserve:kv_transfer_bytes_total"
                           and dict(labels)["role"] == role) for role in ("prefill", "decode")}
        queried = sum(v for (name, _), v in after.items() if name == "pdserve:prefix_cache_queries_total")
        if (0 < moved["prefill"] == moved["decode"] and queried > 0) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert moved["prefill"] > 0 and moved["prefill"] == moved["decode"], moved
    assert queried > 0


def _token_id(cluster, prompt: list[int]) -> int:
    """The first token greedy decoding gives this prompt (over gRPC)."""
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling_params=pb.SamplingParams(
        max_tokens=1, temperature=0.0, ignore_eos=True))
    ids, _, _ = collect(cluster.stub().Generate(request))
    return ids[0]


def test_health_and_models(cluster):
    root = cluster.http_url.removesuffix("/v1")
    assert get(f"{root}/health")[0] == 200
    status, text = get(f"{cluster.http_url}/models")
    models = json.loads(text)
    assert status == 200 and [m["id"] for m in models["data"]] == cluster.backend.model_names()
    assert models["data"][0]["max_model_len"] == cluster.backend.max_model_len
    with pytest.raises(grpc.RpcError):  # gRPC still refuses what HTTP refuses
        collect(cluster.stub().Generate(pb.GenerateRequest(prompt="hi", model="gpt-4")))
