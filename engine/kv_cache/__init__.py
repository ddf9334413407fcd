"""Paged KV cache bookkeeping: which fixed-size blocks each request's KV lives in.

Owns the "reserve" part of a request's life inside one engine: a block pool with reference
counts and an LRU of free cached blocks, prefix caching by chained block hashes (so a prompt
that starts like an earlier one reuses its KV), and per-request block tables that the
scheduler grows each step. Pure Python; the KV tensors live in the model runner.
"""
from engine.kv_cache.block_hash import hash_block_tokens, hash_request_blocks
from engine.kv_cache.block_pool import BlockPool, FreeBlockQueue, KVBlock
from engine.kv_cache.events import KVEventLog
from engine.kv_cache.manager import ComputedBlocks, KVCacheManager, PrefixCacheStats

__all__ = [
    "BlockPool",
    "ComputedBlocks",
    "FreeBlockQueue",
    "KVBlock",
    "KVCacheManager",
    "KVEventLog",
    "PrefixCacheStats",
    "hash_block_tokens",
    "hash_request_blocks",
]
