"""The torch attention backend against dense causal attention computed from scratch.

Each case builds requests with a context already in the cache (`cached`) and new tokens this
step (`new`); blocks are handed out shuffled so that block_table indirection is exercised.
"""
from __future__ import annotations

import math

import pytest
import torch

from engine.attention import get_attention_backend
from engine.attention.base import AttentionMetadata
from engine.attention.torch_backend import MAX_DECODE_GROUPS, TorchAttentionBackend, length_groups

BLOCK_SIZE = 4
HEAD_DIM = 8


def dense_reference(q, k, v, scale):
    """q: (L, H, d) at the last L positions of k/v: (S, KVH, d); naive causal softmax."""
    query_len, num_heads, _ = q.shape
    seq_len, kv_heads, _ = k.shape
    group = num_heads // kv_heads
    out = torch.empty_like(q)
    for h in range(num_heads):
        kh, vh = k[:, h // group], v[:, h // group]  # (S, d)
        scores = (q[:, h] @ kh.T) * scale  # (L, S)
        for i in range(query_len):
            visible = seq_len - query_len + i + 1
            weights = torch.softmax(scores[i, :visible], dim=-1)
            out[i, h] = weights @ vh[:visible]
    return out


def run_step(cached: list[int], new: list[int], num_heads: int, kv_heads: int, seed: int = 0):
    """Fill each request's cached context through the backend in earlier steps, then run one step
    with `new` tokens per request; return (backend output, reference output)."""
    gen = torch.Generator().manual_seed(seed)
    totals = [c + n for c, n in zip(cached, new)]
    blocks_per_req = [math.ceil(t / BLOCK_SIZE) for t in totals]
    num_blocks = sum(blocks_per_req) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, start = [], 0
    for n in blocks_per_req:
        tables.append(order[start : start + n])
        start += n
    # One layer of a three-layer block-major cache: the strided view the model runner passes.
    kv_cache = torch.zeros(num_blocks, 3, 2, BLOCK_SIZE, kv_heads, HEAD_DIM)[:, 1]
    full_k = [torch.randn(t, kv_heads, HEAD_DIM, generator=gen) for t in totals]
    full_v = [torch.randn(t, kv_heads, HEAD_DIM, generator=gen) for t in totals]
    full_q = [torch.randn(t, num_heads, HEAD_DIM, generator=gen) for t in totals]
    backend = TorchAttentionBackend()
    scale = HEAD_DIM**-0.5
    # Earlier step: the cached part, as a prefill of those requests that have any.
    warm = [i for i, c in enumerate(cached) if c > 0]
    if warm:
        md = make_metadata([(0, cached[i]) for i in warm], [tables[i] for i in warm])
        sel = lambda xs: torch.cat([xs[i][: cached[i]] for i in warm])  # noqa: E731
        backend.forward(sel(full_q), sel(full_k), sel(full_v), kv_cache, md, scale)
    md = make_metadata(list(zip(cached, new)), tables)
    cat = lambda xs: torch.cat([x[c:] for x, c in zip(xs, cached)])  # noqa: E731
    out = backend.forward(cat(full_q), cat(full_k), cat(full_v), kv_cache, md, scale)
    ref = torch.cat([
        dense_reference(full_q[i][cached[i]:], full_k[i], full_v[i], scale) for i in range(len(new))
    ])
    return out, ref


def make_metadata(spans: list[tuple[int, int]], tables: list[list[int]]) -> AttentionMetadata:
    """spans: (num_cached, num_new) per request."""
    query_start, seq_lens, slots = [0], [], []
    for (cached, new), table in zip(spans, tables):
        query_start.append(query_start[-1] + new)
        seq_lens.append(cached + new)
        slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(cached, cached + new)]
    width = max(len(t) for t in tables)
    return AttentionMetadata(
        num_reqs=len(spans),
        num_tokens=query_start[-1],
        query_start_loc=torch.tensor(query_start, dtype=torch.int32),
        query_start_loc_cpu=query_start,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        seq_lens_cpu=seq_lens,
        block_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_query_len=max(n for _, n in spans),
        max_seq_len=max(seq_lens),
    )


@pytest.mark.parametrize("num_heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_pure_prefill_of_several_requests(num_heads, kv_heads):
    out, ref = run_step(cached=[0, 0, 0], new=[5, 9, 1], num_heads=num_heads, kv_heads=kv_heads)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_heads,kv_heads", [(4, 4), (4, 2)])
def test_chunked_prefill_attends_to_cached_context(num_heads, kv_heads):
    # Request 0 continues a prompt mid-block, request 1 starts fresh, request 2 decodes.
    out, ref = run_step(cached=[6, 0, 11], new=[7, 3, 1], num_heads=num_heads, kv_heads=kv_heads)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_heads,kv_heads", [(4, 4), (4, 2), (8, 1)])
def test_decode_batch_of_mixed_lengths(num_heads, kv_heads):
    out, ref = run_step(cached=[1, 12, 5, 30], new=[1, 1, 1, 1], num_heads=num_heads, kv_heads=kv_heads)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_decode_of_a_single_request():
    out, ref = run_step(cached=[17], new=[1], num_heads=6, kv_heads=2, seed=3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_new_kv_lands_in_the_mapped_slots():
    md = make_metadata([(0, 3)], [[2, 0]])
    # Layer 1 of a two-layer block-major cache: a strided view, as the model runner hands it.
    full_cache = torch.zeros(3, 2, 2, BLOCK_SIZE, 1, HEAD_DIM)
    kv_cache = full_cache[:, 1]
    k = torch.randn(3, 1, HEAD_DIM)
    v = torch.randn(3, 1, HEAD_DIM)
    TorchAttentionBackend().forward(torch.randn(3, 2, HEAD_DIM), k, v, kv_cache, md, 0.3)
    torch.testing.assert_close(full_cache[2, 1, 0, :3], k)
    torch.testing.assert_close(full_cache[2, 1, 1, :3], v)
    full_cache[2, 1, :, :3] = 0
    assert full_cache.abs().sum() == 0, "bytes landed outside the mapped slots"


def test_backend_choice():
    assert get_attention_backend("auto", torch.device("cpu")).name == "torch"
    assert get_attention_backend("torch", torch.device("cpu")).name == "torch"
    with pytest.raises(ValueError, match="CUDA"):
        get_attention_backend("flash_attn", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attention_backend("xformers", torch.device("cpu"))


def test_length_groups_split_only_where_padding_costs_more_than_a_group():
    assert length_groups([40, 41, 39, 42]) == [[2, 0, 1, 3]]  # similar lengths: one group
    assert length_groups([300, 5, 290, 8, 6, 310], group_cost=0, max_groups=2) == [[1, 4, 3], [2, 0, 5]]
    groups = length_groups([300, 5, 290, 8, 6, 310, 150, 160])
    assert sorted(i for g in groups for i in g) == list(range(8)) and 1 < len(groups) <= MAX_DECODE_GROUPS
    assert length_groups([7]) == [[0]]


def test_decode_batch_split_into_length_groups_matches_dense_reference():
    # Contexts from 3 to 200 tokens: the backend splits them into several groups.
    cached = [2, 199, 150, 7, 180, 3, 90, 120]
    assert len(length_groups([c + 1 for c in cached])) > 1
    out, ref = run_step(cached=cached, new=[1] * len(cached), num_heads=6, kv_heads=2, seed=5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
