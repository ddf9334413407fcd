"""End to end over real gRPC against a local Ray cluster: disaggregated prefill and decode."""
from __future__ import annotations

import math
import random
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from protos.pdserve.v1 import generation_pb2 as pb
from router.cluster_backend import RoutingConfig
from router.pools import PoolConfig
from router.serve import ServeConfig, load_tokenizer
from router.embedded import EmbeddedCluster, workers_idle
from tests.cluster_helpers import collect, greedy_request

pytestmark = pytest.mark.slow

# Small KV caches and a modest step budget keep four model copies within a CI machine.
ENGINE_OPTIONS = dict(dtype="float32", device="cpu", kv_cache_memory_gb=0.25, max_num_batched_tokens=256)
WORDS = ("amber falcon harbor quartz meadow signal copper lantern velvet summit prism "
         "glacier thunder willow circuit orbit cipher ember river stone").split()


def engine_config(model: str, **overrides) -> EngineConfig:
    return EngineConfig.from_options(model, **{**ENGINE_OPTIONS, **overrides})


def mixed_workload(model: str, n: int = 32, seed: int = 0):
    """n prompts of 5-150 tokens (a quarter share a 3-block prefix) and 4-24 new tokens each."""
    tokenizer = load_tokenizer(model)
    rng = random.Random(seed)
    shared = tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(80)))[:48]
    prompts = []
    for i in range(n):
        words = tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 120))))
        prompt = (shared + words) if i % 4 == 0 else words
        prompts.append(prompt[:150])
    max_tokens = [rng.randint(4, 24) for _ in range(n)]
    return prompts, max_tokens


@pytest.fixture(scope="module")
def workload(demo_gguf_path):
    prompts, max_tokens = mixed_workload(demo_gguf_path)
    llm = LLM(demo_gguf_path, **ENGINE_OPTIONS)
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens]
    expected = [out.token_ids for out in llm.generate(prompts, params)]
    return prompts, max_tokens, expected


@pytest.fixture(scope="module")
def disaggregated(demo_gguf_path, ray_local):
    # Every prompt through a prefill worker: this module checks the KV transfer path.
    config = ServeConfig(engine=engine_config(demo_gguf_path),
                         pools=PoolConfig(mode="disaggregated", lease_ttl_s=10.0),
                         routing=RoutingConfig(disaggregation="always"))
    with EmbeddedCluster(config) as server:
        yield server


def run_concurrently(server: EmbeddedCluster, prompts, max_tokens):
    stub = server.stub()
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(lambda p=p, m=m: collect(stub.Generate(greedy_request(p, m))))
                   for p, m in zip(prompts, max_tokens)]
        return [f.result(timeout=600) for f in futures]


def test_32_concurrent_streams_match_single_process_and_count_kv_bytes(
        disaggregated, workload, demo_gguf_path):
    prompts, max_tokens, expected = workload
    before = disaggregated.run(disaggregated.backend.pools.stats())
    results = run_concurrently(disaggregated, prompts, max_tokens)
    for (ids, text, last), want in zip(results, expected):
        assert ids == want
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert last.usage.completion_tokens == len(want)
    # A second wave shares the first wave's 3-block prefix, now cached on the decode worker.
    shared = prompts[0][:48]
    tokenizer = load_tokenizer(demo_gguf_path)
    wave2 = [shared + tokenizer.encode(f" then question number {i} follows") for i in range(4)]
    results2 = run_concurrently(disaggregated, wave2, [6] * 4)
    assert all(last.usage.cached_prompt_tokens == 48 for _, _, last in results2)
    reference = LLM(demo_gguf_path, **ENGINE_OPTIONS).generate(
        wave2, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert [ids for ids, _, _ in results2] == [out.token_ids for out in reference]

    # The KV that had to move: every prompt block past the decode worker's cached prefix.
    layout = disaggregated.backend.pools.decode[0].info["layout"]
    block_size = layout["block_size"]
    bytes_per_block = (layout["num_layers"] * 2 * block_size * layout["num_kv_heads"]
                       * layout["head_dim"] * 4)
    needed_blocks = [math.ceil(len(p) / block_size) - last.usage.cached_prompt_tokens // block_size
                     for p, (_, _, last) in zip(prompts + wave2, results + results2)]
    after = disaggregated.wait_for_baseline()
    assert workers_idle(after)
    moved = after["decode"][0].transfer_bytes - before["decode"][0].transfer_bytes
    assert moved == sum(needed_blocks) * bytes_per_block
    assert after["prefill"][0]["transfer_bytes"] - before["prefill"][0]["transfer_bytes"] == moved
    assert after["decode"][0].transfers - before["decode"][0].transfers == len(prompts) + len(wave2)


def test_seeded_sampling_through_the_cluster_matches_single_process(disaggregated, workload, demo_gguf_path):
    """The first token is sampled on the prefill worker, the rest on the decode worker; seeded
    output must still be what one engine samples."""
    prompts = workload[0][:4]
    stub = disaggregated.stub()
    got = []
    for i, prompt in enumerate(prompts):
        request = pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=prompt),
            sampling_params=pb.SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=100 + i,
                                              ignore_eos=True))
        got.append(collect(stub.Generate(request))[0])
    llm = LLM(demo_gguf_path, **ENGINE_OPTIONS)
    params = [SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=100 + i, ignore_eos=True)
              for i in range(len(prompts))]
    assert got == [out.token_ids for out in llm.generate(prompts, params)]


def test_client_cancel_mid_stream_frees_blocks_on_both_workers(disaggregated, demo_gguf_path):
    prompt = load_tokenizer(demo_gguf_path).encode("Count slowly from one to one thousand:")
    # 2000 tokens take over a minute to decode here: only an abort frees the blocks in 10 s.
    responses = disaggregated.stub().Generate(greedy_request(prompt, 2000))
    received = [next(responses) for _ in range(3)]
    assert all(r.token_ids for r in received)
    busy = disaggregated.run(disaggregated.backend.pools.stats())
    assert not workers_idle(busy)  # the request really holds blocks mid-stream
    responses.cancel()
    assert workers_idle(disaggregated.wait_for_baseline(timeout_s=10))
    assert not disaggregated.backend.streams


def test_deadline_mid_stream_frees_blocks_on_both_workers(disaggregated, demo_gguf_path):
    prompt = load_tokenizer(demo_gguf_path).encode("Write a very long essay about rivers.")
    tokens = []
    with pytest.raises(grpc.RpcError) as err:
        for response in disaggregated.stub().Generate(greedy_request(prompt, 2000), timeout=3.0):
            tokens.extend(response.token_ids)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert tokens, "the deadline should hit mid-stream, after some tokens"
    assert workers_idle(disaggregated.wait_for_baseline(timeout_s=10))
