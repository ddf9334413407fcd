"""Chained content hashes of full KV blocks, the keys of the prefix cache.

A block's hash covers its own tokens and, through the parent hash, every token before it,
so equal hashes mean equal prefixes (up to a 2**-64 collision chance, which we accept).
The value is published to other processes (the router's KV-aware index), so it must not
depend on the interpreter: it is sha256 over a fixed little-endian byte encoding, truncated
to 64 bits, never Python's salted `hash()`.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

# Leading byte of the encoding: a first block (no parent) and a child block can never
# encode to the same bytes, whatever the parent hash is.
_ROOT_TAG = b"\x00"
_CHILD_TAG = b"\x01"


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Hash of one full block: sha256(tag, parent hash, token ids) truncated to 64 bits.

    parent_hash is None for a sequence's first block. Token ids are encoded as signed
    64-bit little-endian integers, which covers every vocabulary.
    """
    if parent_hash is None:
        head = _ROOT_TAG
    else:
        head = _CHILD_TAG + parent_hash.to_bytes(8, "little")
    body = struct.pack(f"<{len(token_ids)}q", *token_ids)
    digest = hashlib.sha256(head + body).digest()
    return int.from_bytes(digest[:8], "little")


def hash_request_blocks(
    token_ids: Sequence[int], block_size: int, parent_hash: int | None = None
) -> list[int]:
    """Chained hashes of every full block of `token_ids` (a trailing partial block is skipped)."""
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block_tokens(parent_hash, token_ids[start:start + block_size])
        hashes.append(parent_hash)
    return hashes
