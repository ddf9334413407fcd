"""KV cache manager: block tables, prefix caching, eviction, failure atomicity, no leaks."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import engine.kv_cache.manager as manager_module
from engine.kv_cache import ComputedBlocks, KVCacheManager, PrefixCacheStats
from engine.request import Request
from engine.sampling_params import SamplingParams

_ids = itertools.count()


def make_request(tokens: list[int], request_id: str | None = None) -> Request:
    return Request(request_id or f"req-{next(_ids)}", tokens, SamplingParams())


def admit(manager: KVCacheManager, request: Request, num_new: int | None = None) -> ComputedBlocks:
    """Scheduler-style admission: look up, allocate, compute, cache. Asserts it fits."""
    computed = manager.get_computed_blocks(request)
    if num_new is None:
        num_new = request.num_tokens - computed.num_computed_tokens
    assert manager.allocate_slots(request, num_new, computed)
    manager.record_admission(request, computed)
    request.num_computed_tokens = computed.num_computed_tokens + num_new
    manager.cache_full_blocks(request, request.num_computed_tokens)
    return computed


def decode_step(manager: KVCacheManager, request: Request, token: int) -> bool:
    request.append_output_token(token)
    if not manager.allocate_slots(request, 1):
        return False
    request.num_computed_tokens += 1
    manager.cache_full_blocks(request, request.num_computed_tokens)
    return True


def snapshot(manager: KVCacheManager, *requests: Request):
    pool = manager.pool
    return (
        [block.block_id for block in pool.free_queue],
        [(block.ref_count, block.block_hash) for block in pool.blocks],
        dict(pool.cached_blocks),
        [manager.get_block_ids(r.request_id) for r in requests],
    )


# --- allocation ---------------------------------------------------------------------------------
def test_allocation_extends_across_block_boundaries():
    manager = KVCacheManager(num_blocks=8, block_size=16)
    request = make_request(list(range(20)))
    admit(manager, request)
    assert manager.get_block_ids(request.request_id) == [0, 1]
    assert manager.num_free_blocks == 6
    for step in range(12):  # tokens 21..32 still fit in two blocks
        assert decode_step(manager, request, 1000 + step)
    assert len(manager.get_block_ids(request.request_id)) == 2
    assert decode_step(manager, request, 2000)  # token 33 opens a third block
    assert manager.get_block_ids(request.request_id) == [0, 1, 2]
    assert manager.num_free_blocks == 5
    assert manager.usage == pytest.approx(3 / 8)
    manager.check_invariants()
    manager.free(request)
    assert manager.num_free_blocks == 8 and manager.usage == 0.0
    manager.check_invariants()


def test_chunked_prefill_grows_the_table_chunk_by_chunk():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    request = make_request(list(range(10)))
    admit(manager, request, num_new=3)
    assert len(manager.get_block_ids(request.request_id)) == 1
    assert manager.allocate_slots(request, 7)
    assert len(manager.get_block_ids(request.request_id)) == 3
    manager.check_invariants()


# --- prefix caching -------------------------------------------------------------------------------
def test_second_request_reuses_a_shared_three_block_prefix():
    manager = KVCacheManager(num_blocks=16, block_size=16)
    prefix = list(range(48))
    first = make_request(prefix + [900, 901, 902])
    admit(manager, first)
    first_blocks = manager.get_block_ids(first.request_id)
    assert manager.stats() == PrefixCacheStats(queries=51, hits=0)

    second = make_request(prefix + [700] * 10)
    computed = admit(manager, second)
    assert computed == ComputedBlocks(tuple(first_blocks[:3]), 48)
    assert manager.prefix_cache_hits == 48
    assert manager.stats() == PrefixCacheStats(queries=51 + 58, hits=48)
    second_blocks = manager.get_block_ids(second.request_id)
    assert second_blocks[:3] == first_blocks[:3]
    assert set(second_blocks[3:]).isdisjoint(first_blocks)
    assert [manager.pool.blocks[b].ref_count for b in first_blocks[:3]] == [2, 2, 2]
    manager.check_invariants()


def test_lookup_leaves_the_last_token_to_compute():
    manager = KVCacheManager(num_blocks=16, block_size=16)
    admit(manager, make_request(list(range(64))))
    exactly_three_blocks = make_request(list(range(48)))
    assert manager.get_computed_blocks(exactly_three_blocks).num_computed_tokens == 32
    one_more_token = make_request(list(range(49)))
    assert manager.get_computed_blocks(one_more_token).num_computed_tokens == 48
    single_token = make_request([0])
    assert manager.get_computed_blocks(single_token).block_ids == ()


def test_blocks_filled_by_decode_are_cached():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    request = make_request([1, 2, 3])
    admit(manager, request)
    for token in [4, 5, 6, 7, 8]:
        assert decode_step(manager, request, token)
    # Computed: 1..7 plus 8 = 8 tokens, two full blocks.
    follower = make_request([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert manager.get_computed_blocks(follower).num_computed_tokens == 8


def test_lru_eviction_evicts_the_least_recently_freed_prefix_first():
    manager = KVCacheManager(num_blocks=3, block_size=4)
    older, newer = make_request([1, 1, 1, 1]), make_request([2, 2, 2, 2])
    admit(manager, older)
    admit(manager, newer)
    manager.free(older)
    manager.free(newer)
    # The never-cached block goes first, then the older cached one.
    admit(manager, make_request([3] * 8))
    assert manager.get_computed_blocks(make_request([1, 1, 1, 1, 0])).block_ids == ()
    assert manager.get_computed_blocks(make_request([2, 2, 2, 2, 0])).num_computed_tokens == 4
    manager.check_invariants()


def test_free_releases_tail_blocks_for_eviction_first():
    manager = KVCacheManager(num_blocks=4, block_size=2)
    request = make_request([1, 2, 3, 4, 5, 6, 7])  # 3 full blocks + 1 partial
    admit(manager, request)
    table = manager.get_block_ids(request.request_id)
    manager.free(request)
    # Partial block first (uncached), then full blocks from the tail back to the head.
    assert [b.block_id for b in manager.pool.free_queue] == [table[3], table[2], table[1], table[0]]


def test_a_hit_on_a_free_cached_block_revives_it():
    manager = KVCacheManager(num_blocks=4, block_size=4)
    donor = make_request([5, 6, 7, 8, 9])
    admit(manager, donor)
    cached_block = manager.get_block_ids(donor.request_id)[0]
    manager.free(donor)
    assert manager.num_free_blocks == 4
    taker = make_request([5, 6, 7, 8, 1])
    computed = admit(manager, taker)
    assert computed.block_ids == (cached_block,)
    assert manager.pool.blocks[cached_block].ref_count == 1
    assert manager.num_free_blocks == 2  # the revived block plus one new block
    # Filling the rest of the pool must not evict the revived block.
    admit(manager, make_request([0] * 8))
    assert manager.pool.blocks[cached_block].block_hash is not None
    assert manager.get_computed_blocks(make_request([5, 6, 7, 8, 2])).block_ids == (cached_block,)
    manager.check_invariants()


def test_duplicate_content_computed_twice_is_cached_once():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    a, b = make_request([1, 2, 3, 4, 5]), make_request([1, 2, 3, 4, 6])
    for request in (a, b):  # both admitted before either caches
        assert manager.allocate_slots(request, request.num_tokens, manager.get_computed_blocks(request))
    for request in (a, b):
        request.num_computed_tokens = request.num_tokens
        manager.cache_full_blocks(request, request.num_tokens)
    assert len(manager.pool.cached_blocks) == 1
    manager.check_invariants()
    manager.free(a)
    manager.free(b)
    assert manager.num_free_blocks == 8
    manager.check_invariants()


# --- failure, idempotence, misuse ---------------------------------------------------------------
def test_failed_allocation_changes_nothing():
    manager = KVCacheManager(num_blocks=3, block_size=4)
    donor = make_request(list(range(8)))
    admit(manager, donor)
    manager.free(donor)
    # 13 tokens: 2 hit blocks (both free) + 2 new blocks = 4 free blocks needed, 3 exist.
    # The 2 new blocks alone would fit; taking them could evict the hits.
    request = make_request(list(range(8)) + [50, 51, 52, 53, 54])
    computed = manager.get_computed_blocks(request)
    assert computed.num_computed_tokens == 8
    before = snapshot(manager, request)
    assert not manager.allocate_slots(request, 5, computed)
    assert snapshot(manager, request) == before
    manager.check_invariants()


def test_failed_extension_of_a_running_request_changes_nothing():
    manager = KVCacheManager(num_blocks=2, block_size=4)
    request = make_request([1, 2, 3, 4, 5, 6])
    admit(manager, request)
    before = snapshot(manager, request)
    assert not manager.allocate_slots(request, 3)  # 9 tokens need a third block
    assert snapshot(manager, request) == before


def test_free_is_idempotent():
    manager = KVCacheManager(num_blocks=4, block_size=4)
    shared = list(range(8))
    a, b = make_request(shared + [1]), make_request(shared + [2])
    admit(manager, a)
    admit(manager, b)
    manager.free(a)
    manager.free(a)
    assert manager.get_block_ids(a.request_id) == []
    # b still holds the two shared blocks plus its own.
    assert [manager.pool.blocks[i].ref_count for i in manager.get_block_ids(b.request_id)] == [1, 1, 1]
    manager.check_invariants()
    manager.free(b)
    manager.free(make_request([1]))  # never seen
    assert manager.num_free_blocks == 4
    manager.check_invariants()


def test_stale_computed_blocks_are_refused():
    manager = KVCacheManager(num_blocks=2, block_size=4)
    donor = make_request([1, 2, 3, 4, 5])
    admit(manager, donor)
    manager.free(donor)
    late = make_request([1, 2, 3, 4, 9])
    computed = manager.get_computed_blocks(late)
    admit(manager, make_request([7] * 8))  # evicts the cached block
    with pytest.raises(ValueError, match="stale"):
        manager.allocate_slots(late, 1, computed)
    assert manager.get_block_ids(late.request_id) == []
    manager.check_invariants()


def test_cache_full_blocks_is_idempotent():
    manager = KVCacheManager(num_blocks=4, block_size=4)
    request = make_request(list(range(9)))
    admit(manager, request)
    before = snapshot(manager, request)
    manager.cache_full_blocks(request, 9)
    manager.cache_full_blocks(request, 4)
    assert snapshot(manager, request) == before
    assert len(manager.pool.cached_blocks) == 2


def test_block_hashes_are_computed_once_per_block(monkeypatch):
    calls = []
    real_hash = manager_module.hash_block_tokens

    def counting_hash(parent, tokens):
        calls.append(tuple(tokens))
        return real_hash(parent, tokens)

    monkeypatch.setattr(manager_module, "hash_block_tokens", counting_hash)
    manager = KVCacheManager(num_blocks=16, block_size=4)
    request = make_request(list(range(10)))
    admit(manager, request)
    for token in range(30):
        assert decode_step(manager, request, token)
    # 10 prompt + 30 decoded tokens, all computed: 10 full blocks, each hashed exactly once.
    assert request.num_computed_tokens == 40
    assert len(calls) == 10 and len(set(calls)) == 10


def test_reset_prefix_cache():
    manager = KVCacheManager(num_blocks=4, block_size=4)
    request = make_request(list(range(9)))
    admit(manager, request)
    assert not manager.reset_prefix_cache()
    manager.free(request)
    assert manager.reset_prefix_cache()
    assert manager.get_computed_blocks(make_request(list(range(9)))).block_ids == ()
    manager.check_invariants()


def test_prefix_caching_disabled():
    manager = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    tokens = list(range(12))
    first = make_request(tokens)
    admit(manager, first)
    second = make_request(tokens)
    assert admit(manager, second) == ComputedBlocks((), 0)
    assert not manager.pool.cached_blocks
    assert manager.stats() == PrefixCacheStats(0, 0)
    assert set(manager.get_block_ids(first.request_id)).isdisjoint(manager.get_block_ids(second.request_id))
    manager.check_invariants()
    manager.free(first)
    manager.free(second)
    assert manager.num_free_blocks == 8
    assert all(block.block_hash is None for block in manager.pool.blocks)


# --- random interleavings ----------------------------------------------------------------------
# A few shared prompt starts over a 3-token alphabet, so prefixes (and duplicate blocks) are common.
_PROMPT_STARTS = ([], [0, 1, 2, 0, 1, 2, 0, 1], [2, 2, 1, 1, 0, 0, 2, 2, 1, 1, 0, 0])


class KVCacheMachine(RuleBasedStateMachine):
    """Scheduler-like op sequences on a small pool, with a shadow of what each KV slot holds.

    `slots[(block_id, offset)]` is the token prefix whose last token's K/V was written there.
    A prefix hit, or any block a running request still holds, must show that request's tokens.
    """

    @initialize(
        num_blocks=st.integers(8, 32),
        block_size=st.sampled_from([1, 2, 4]),
        caching=st.sampled_from([True, True, True, False]),
    )
    def create(self, num_blocks: int, block_size: int, caching: bool) -> None:
        self.manager = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}

    def slot(self, request: Request, pos: int) -> tuple[int, int]:
        size = self.manager.block_size
        return self.manager.get_block_ids(request.request_id)[pos // size], pos % size

    def compute(self, request: Request, num_new: int) -> None:
        for pos in range(request.num_computed_tokens, request.num_computed_tokens + num_new):
            block_id, offset = self.slot(request, pos)
            block = self.manager.pool.blocks[block_id]
            assert block.ref_count == 1 and block.block_hash is None, "write into a shared block"
            self.slots[block_id, offset] = tuple(request.all_token_ids[: pos + 1])
        request.num_computed_tokens += num_new

    @precondition(lambda self: len(self.waiting) + len(self.running) < 8)
    @rule(start=st.sampled_from(_PROMPT_STARTS), suffix=st.lists(st.integers(0, 2), min_size=1, max_size=12))
    def add_request(self, start: list[int], suffix: list[int]) -> None:
        self.waiting.append(make_request(start + suffix))

    @precondition(lambda self: self.waiting)
    @rule(index=st.integers(0, 7), chunk=st.integers(1, 40))
    def admit(self, index: int, chunk: int) -> None:
        request = self.waiting[index % len(self.waiting)]
        computed = self.manager.get_computed_blocks(request)
        size = self.manager.block_size
        for pos in range(computed.num_computed_tokens):
            slot = (computed.block_ids[pos // size], pos % size)
            assert self.slots[slot] == tuple(request.all_token_ids[: pos + 1]), "wrong prefix hit"
        num_new = min(chunk, request.num_tokens - computed.num_computed_tokens)
        before = snapshot(self.manager, request)
        if not self.manager.allocate_slots(request, num_new, computed):
            assert snapshot(self.manager, request) == before
            return
        self.waiting.remove(request)
        self.running.append(request)
        request.num_computed_tokens = computed.num_computed_tokens
        self.compute(request, num_new)

    @precondition(lambda self: self.running)
    @rule(index=st.integers(0, 7), chunk=st.integers(1, 40), token=st.integers(0, 2))
    def step(self, index: int, chunk: int, token: int) -> None:
        request = self.running[index % len(self.running)]
        if request.num_computed_tokens == request.num_tokens:
            request.append_output_token(token)
        num_new = min(chunk, request.num_tokens - request.num_computed_tokens)
        before = snapshot(self.manager, request)
        if self.manager.allocate_slots(request, num_new):
            self.compute(request, num_new)
            return
        assert snapshot(self.manager, request) == before
        self.manager.free(request)  # preempt by recompute
        request.num_computed_tokens = 0
        self.running.remove(request)
        self.waiting.append(request)

    @precondition(lambda self: self.running)
    @rule(index=st.integers(0, 7))
    def cache(self, index: int) -> None:
        request = self.running[index % len(self.running)]
        self.manager.cache_full_blocks(request, request.num_computed_tokens)

    @precondition(lambda self: self.running)
    @rule(index=st.integers(0, 7), twice=st.booleans())
    def finish(self, index: int, twice: bool) -> None:
        request = self.running.pop(index % len(self.running))
        self.manager.free(request)
        if twice:
            self.manager.free(request)

    @precondition(lambda self: self.waiting)
    @rule(index=st.integers(0, 7))
    def abort_waiting(self, index: int) -> None:
        self.manager.free(self.waiting.pop(index % len(self.waiting)))

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "manager"):
            return
        self.manager.check_invariants()
        for request in self.waiting:
            assert self.manager.get_block_ids(request.request_id) == []
        for request in self.running:
            for pos in range(request.num_computed_tokens):  # nobody overwrote its KV
                assert self.slots[self.slot(request, pos)] == tuple(request.all_token_ids[: pos + 1])

    def teardown(self) -> None:
        if not hasattr(self, "manager"):
            return
        for request in self.running + self.waiting:
            self.manager.free(request)
        self.manager.check_invariants()
        assert self.manager.num_free_blocks == self.manager.num_blocks


KVCacheMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
test_kv_cache_random_interleavings = KVCacheMachine.TestCase
