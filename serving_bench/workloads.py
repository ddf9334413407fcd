"""Workloads: the list of requests one benchmark run sends, the same for a given seed.

- random: input and output lengths uniform in [L * (1 - r), L * (1 + r)] (vLLM's random dataset).
- shared-prefix: `groups` long system prompts; each request is one of them (picked uniformly)
  followed by a short user question of its own. The prefix cache and KV-aware routing win here.
- sharegpt: lengths drawn from log-normal distributions shaped like ShareGPT conversations
  (default: input median 100 tokens, sigma 1.0, mean ~165; output median 200, sigma 1.0, mean
  ~330; the ShareGPT means reported in the vLLM and DistServe papers are ~160 and ~340), clipped
  to maxima. Generated here: nothing is downloaded.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from serving_bench.prompts import PromptMaker


@dataclass(frozen=True)
class BenchRequest:
    index: int
    prompt: str  # the user's text (after the system prompt, if any)
    prompt_len: int  # in the prompt maker's unit (tokens, or words without a tokenizer)
    output_len: int  # max_tokens sent; with ignore_eos the server generates exactly this many
    system_prompt: str = ""  # shared-prefix workload: the group's system prompt
    prefix_group: int | None = None


@dataclass(frozen=True)
class RandomLengths:
    input_len: int = 128
    output_len: int = 32
    range_ratio: float = 0.0

    def bounds(self, length: int) -> tuple[int, int]:
        return max(1, int(length * (1 - self.range_ratio))), max(1, int(length * (1 + self.range_ratio)))


@dataclass(frozen=True)
class SharedPrefix:
    groups: int = 4
    prefix_len: int = 512
    question_len: tuple[int, int] = (16, 64)
    output_len: int = 32


@dataclass(frozen=True)
class ShareGPTLike:
    input_median: float = 100.0
    output_median: float = 200.0
    sigma: float = 1.0
    max_input: int = 1024
    max_output: int = 512


def lognormal_length(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return min(high, max(low, round(rng.lognormvariate(math.log(median), sigma))))


def random_workload(spec: RandomLengths, n: int, maker: PromptMaker, rng: random.Random) -> list[BenchRequest]:
    requests = []
    for i in range(n):
        prompt_len = rng.randint(*spec.bounds(spec.input_len))
        output_len = rng.randint(*spec.bounds(spec.output_len))
        requests.append(BenchRequest(i, maker.text(rng, prompt_len), prompt_len, output_len))
    return requests


def shared_prefix_workload(spec: SharedPrefix, n: int, maker: PromptMaker, rng: random.Random) -> list[BenchRequest]:
    prefixes = [maker.text(rng, spec.prefix_len) for _ in range(spec.groups)]
    requests = []
    for i in range(n):
        group = rng.randrange(spec.groups)
        question_len = rng.randint(*spec.question_len)
        requests.append(BenchRequest(i, maker.text(rng, question_len), spec.prefix_len + question_len,
                                     spec.output_len, prefixes[group], group))
    return requests


def sharegpt_workload(spec: ShareGPTLike, n: int, maker: PromptMaker, rng: random.Random) -> list[BenchRequest]:
    requests = []
    for i in range(n):
        prompt_len = lognormal_length(rng, spec.input_median, spec.sigma, 4, spec.max_input)
        output_len = lognormal_length(rng, spec.output_median, spec.sigma, 1, spec.max_output)
        requests.append(BenchRequest(i, maker.text(rng, prompt_len), prompt_len, output_len))
    return requests


def build_workload(spec: RandomLengths | SharedPrefix | ShareGPTLike, n: int, maker: PromptMaker,
                   seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)
    if isinstance(spec, RandomLengths):
        return random_workload(spec, n, maker, rng)
    if isinstance(spec, SharedPrefix):
        return shared_prefix_workload(spec, n, maker, rng)
    return sharegpt_workload(spec, n, maker, rng)


def sweep_workloads(spec: RandomLengths | SharedPrefix | ShareGPTLike, n: int, maker: PromptMaker, seed: int,
                    runs: int) -> list[list[BenchRequest]]:
    """One workload per run of a sweep, run i from seed + i: the same distribution with fresh
    text, so no run finds the previous run's prompts in the server's prefix cache."""
    return [build_workload(spec, n, maker, seed + i) for i in range(runs)]
