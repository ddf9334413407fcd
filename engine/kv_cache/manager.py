"""Per-request KV block tables on top of the block pool, with prefix caching.

The scheduler asks, per step and per request, for enough slots to hold the tokens it is about
to compute (`allocate_slots`), and after the step registers the blocks that became full
(`cache_full_blocks`) so later requests with the same prefix can reuse them. At admission,
`get_computed_blocks` finds the longest cached prefix of a request's tokens.

Invariants (checked by `KVCacheManager.check_invariants`):
- Each pool block's ref_count equals the number of request block tables holding it; a
  request holds a given block at most once.
- A request's block i covers token positions [i * block_size, (i + 1) * block_size).
- `_RequestState.block_hashes[i]` is the chained hash of the request's i-th full block of
  tokens; hashes are computed once, in order, and extended as tokens become full blocks.
- Blocks [0, num_cached_blocks) of a request were offered to the prefix-cache index; a cached
  one among them is indexed under exactly the request's hash for that position.
- With prefix caching disabled, nothing is hashed, looked up or indexed.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from engine.kv_cache.block_hash import hash_block_tokens
from engine.kv_cache.block_pool import BlockPool, KVBlock, _check
from engine.kv_cache.events import KVEventLog
from engine.request import Request


@dataclass(frozen=True)
class ComputedBlocks:
    """Result of a prefix lookup: cached blocks matching the start of a request's tokens."""

    block_ids: tuple[int, ...]
    num_computed_tokens: int  # len(block_ids) * block_size


@dataclass(frozen=True)
class PrefixCacheStats:
    queries: int  # tokens of the requests looked up
    hits: int  # of those, tokens found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


_NO_COMPUTED_BLOCKS = ComputedBlocks((), 0)


@dataclass
class _RequestState:
    """What the manager keeps per request id, from first lookup or allocation until `free`."""

    blocks: list[KVBlock] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)  # [b.block_id for b in blocks]
    block_hashes: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0


class KVCacheManager:
    """Block tables of all live requests in one KV cache of `num_blocks` x `block_size` tokens."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 events: KVEventLog | None = None) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, events)
        self._requests: dict[str, _RequestState] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # --- sizes ------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (free cached blocks count as unused)."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self.prefix_cache_queries, self.prefix_cache_hits)

    def cached_block_hashes(self) -> set[int]:
        """Every block hash the prefix cache holds now (what the KV block index should show)."""
        return set(self.pool.cached_blocks)

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table (a copy); empty for a request that holds no blocks."""
        state = self._requests.get(request_id)
        return list(state.block_ids) if state is not None else []

    # --- admission --------------------------------------------------------------------
    def get_computed_blocks(self, request: Request) -> ComputedBlocks:
        """Longest run of cached full blocks matching the start of request.all_token_ids.

        Capped at (num_tokens - 1) // block_size blocks so at least one token is left to
        compute: the last token's logits are needed to sample. Takes no refs; hand the
        result to `allocate_slots` before any other allocation can evict those blocks.
        """
        if not self.enable_prefix_caching:
            return _NO_COMPUTED_BLOCKS
        state = self._requests.setdefault(request.request_id, _RequestState())
        max_blocks = (request.num_tokens - 1) // self.block_size
        hit_ids: list[int] = []
        for index in range(max_blocks):
            block = self.pool.lookup(self._block_hash(state, request, index))
            if block is None:
                break
            hit_ids.append(block.block_id)
        if not hit_ids:
            return _NO_COMPUTED_BLOCKS
        return ComputedBlocks(tuple(hit_ids), len(hit_ids) * self.block_size)

    def record_admission(self, request: Request, computed: ComputedBlocks) -> None:
        """Count a request's prefix-cache lookup in the stats, once, when it is admitted.

        Lookups themselves are not counted: a queue head that cannot be admitted yet is looked
        up again every step, which would inflate both counts.
        """
        if self.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += computed.num_computed_tokens

    # --- per step -----------------------------------------------------------------------
    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed: ComputedBlocks | None = None
    ) -> bool:
        """Grow the request's block table to cover its computed, hit and new tokens.

        Covers request.num_computed_tokens + computed.num_computed_tokens + num_new_tokens
        tokens. `computed` (admission only, while the request holds no blocks) is taken
        first. Returns False, changing nothing, when the free pool is too small; reviving a
        free cached hit block uses up one free block just like a new one.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        state = self._requests.get(request.request_id)
        num_held = len(state.blocks) if state is not None else 0
        hit_blocks = self._resolve_computed(request, state, computed)
        num_tokens = request.num_computed_tokens + num_new_tokens
        if hit_blocks:
            num_tokens += len(hit_blocks) * self.block_size
        num_required = -(-num_tokens // self.block_size)
        num_new_blocks = num_required - num_held - len(hit_blocks)
        if num_new_blocks <= 0 and not hit_blocks:
            return True  # the decode fast path: the last block still has room
        num_new_blocks = max(num_new_blocks, 0)
        num_revived = sum(1 for block in hit_blocks if block.ref_count == 0)
        if num_new_blocks + num_revived > self.pool.num_free_blocks:
            return False
        if state is None:
            state = self._requests[request.request_id] = _RequestState()
        # Hits first: allocating new blocks could otherwise evict a free hit block.
        if hit_blocks:
            self.pool.touch(hit_blocks)
            self._append_blocks(state, hit_blocks)
            state.num_cached_blocks = len(hit_blocks)  # already in the index
        self._append_blocks(state, self.pool.allocate(num_new_blocks))
        return True

    def cache_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Index the request's blocks that `num_computed_tokens` tokens fill completely.

        Call after a step with the request's new num_computed_tokens; blocks already offered
        to the index are skipped, so calling again with the same count does nothing.
        """
        if not self.enable_prefix_caching:
            return
        state = self._requests.get(request.request_id)
        if state is None:
            return
        num_full = min(num_computed_tokens // self.block_size, len(state.blocks))
        if num_full <= state.num_cached_blocks:
            return
        if num_computed_tokens > request.num_tokens:
            raise ValueError(
                f"request {request.request_id}: {num_computed_tokens} computed tokens, "
                f"but it has only {request.num_tokens}"
            )
        for index in range(state.num_cached_blocks, num_full):
            self.pool.cache_block(state.blocks[index], self._block_hash(state, request, index))
        state.num_cached_blocks = num_full

    def free(self, request: Request) -> None:
        """Release all the request's blocks and forget it. Calling it again does nothing.

        Released tail first, so a request's later blocks are evicted before its earlier
        ones: an earlier block is a prefix of more possible future prompts.
        """
        state = self._requests.pop(request.request_id, None)
        if state is not None:
            self.pool.release(reversed(state.blocks))

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block hash. Refused (False) while any request holds blocks."""
        return self.pool.reset_prefix_cache()

    # --- helpers --------------------------------------------------------------------------
    def _resolve_computed(
        self, request: Request, state: _RequestState | None, computed: ComputedBlocks | None
    ) -> list[KVBlock]:
        """The pool blocks behind `computed`, checked to still hold the request's prefix."""
        if computed is None or not computed.block_ids:
            return []
        if state is None or state.blocks:
            raise ValueError(
                f"request {request.request_id}: computed blocks are only taken at admission, "
                "right after get_computed_blocks"
            )
        if computed.num_computed_tokens != len(computed.block_ids) * self.block_size:
            raise ValueError(f"inconsistent {computed}")
        blocks = [self.pool.blocks[block_id] for block_id in computed.block_ids]
        for index, block in enumerate(blocks):
            # A stale lookup (its block evicted and reused since) would attend over foreign KV.
            if index >= len(state.block_hashes) or block.block_hash != state.block_hashes[index]:
                raise ValueError(f"request {request.request_id}: computed block {block} is stale")
        return blocks

    def _append_blocks(self, state: _RequestState, blocks: list[KVBlock]) -> None:
        state.blocks.extend(blocks)
        state.block_ids.extend(block.block_id for block in blocks)

    def _block_hash(self, state: _RequestState, request: Request, index: int) -> int:
        """Hash of the request's block `index` (a full block), computing missing ones in order."""
        hashes = state.block_hashes
        tokens = request.all_token_ids
        size = self.block_size
        while len(hashes) <= index:
            start = len(hashes) * size
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent, tokens[start:start + size]))
        return hashes[index]

    # --- self check -----------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError if ref counts, block tables or the index disagree."""
        self.pool.check_invariants()
        holders: Counter[int] = Counter()
        for request_id, state in self._requests.items():
            ids = [block.block_id for block in state.blocks]
            _check(ids == state.block_ids, f"{request_id}: block_ids out of sync")
            _check(len(set(ids)) == len(ids), f"{request_id}: holds a block twice")
            holders.update(ids)
            _check(state.num_cached_blocks <= len(state.blocks), f"{request_id}: cached > held")
            if not self.enable_prefix_caching:
                _check(not state.block_hashes, f"{request_id}: hashed with caching disabled")
                continue
            _check(state.num_cached_blocks <= len(state.block_hashes), f"{request_id}: unhashed")
            for index, block in enumerate(state.blocks):
                if index >= state.num_cached_blocks:  # not offered yet, so never indexed
                    _check(block.block_hash is None, f"{request_id}: {block} cached too early")
                elif block.block_hash is not None:
                    _check(block.block_hash == state.block_hashes[index], f"{request_id}: {block} hash")
        for block in self.pool.blocks:
            _check(block.ref_count == holders[block.block_id], f"{block} held {holders[block.block_id]}x")
        if not self.enable_prefix_caching:
            _check(not self.pool.cached_blocks, "blocks indexed with prefix caching disabled")
