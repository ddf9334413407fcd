"""Batching, chunked prefill, prefix caching and preemption never change greedy outputs."""
from __future__ import annotations

import random

import pytest

from engine import LLM, SamplingParams
from tests.conftest import assert_no_leaked_blocks

WORDS = ("river stone lantern orbit velvet quartz meadow signal harbor cipher ember "
         "summit willow circuit falcon prism glacier thunder copper").split()


def mixed_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 120))) for _ in range(n)]


def test_batch_of_32_with_chunked_prefill_matches_alone(demo_gguf_path):
    # A small token budget forces long prompts to be split into chunks that share steps
    # with other requests' decodes.
    llm = LLM(demo_gguf_path, dtype="float32", device="cpu", max_num_batched_tokens=96,
              enable_prefix_caching=False)
    prompts = mixed_prompts(32)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    batched = llm.generate(prompts, params)
    assert llm.engine.scheduler.stats.num_steps < 32 * 12  # requests really shared steps
    for prompt, out in zip(prompts, batched):
        alone = llm.generate([prompt], params)[0]
        assert out.token_ids == alone.token_ids, prompt
    assert_no_leaked_blocks(llm)


def test_shared_prefix_hits_cache_and_keeps_output(demo_gguf_path):
    cached = LLM(demo_gguf_path, dtype="float32", device="cpu", block_size=16)
    uncached = LLM(demo_gguf_path, dtype="float32", device="cpu", block_size=16,
                   enable_prefix_caching=False)
    prefix = cached.tokenizer.encode(" ".join(WORDS * 3))[:48]  # exactly 3 blocks
    first = prefix + cached.tokenizer.encode(" and then the first question")
    second = prefix + cached.tokenizer.encode(" but a different ending here")
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    cached.generate([first], params)
    hits_before = cached.engine.kv_manager.stats().hits
    out = cached.generate([second], params)[0]
    assert out.num_cached_tokens == 48
    assert cached.engine.kv_manager.stats().hits - hits_before == 48
    reference = uncached.generate([second], params)[0]
    assert reference.num_cached_tokens == 0
    assert out.token_ids == reference.token_ids
    assert_no_leaked_blocks(cached)


def test_preemption_under_tiny_block_budget_keeps_outputs(demo_gguf_path):
    prompts = mixed_prompts(8, seed=3)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    roomy = LLM(demo_gguf_path, dtype="float32", device="cpu")
    # 14 blocks of 16 tokens cannot hold 8 prompts of up to ~200 tokens at once.
    tight = LLM(demo_gguf_path, dtype="float32", device="cpu", num_blocks=14,
                max_num_batched_tokens=128)
    expected = roomy.generate(prompts, params)
    got = tight.generate(prompts, params)
    assert tight.engine.scheduler.stats.num_preemptions > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert_no_leaked_blocks(tight)
