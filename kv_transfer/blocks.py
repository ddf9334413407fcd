"""Gathering blocks out of a KV cache tensor and scattering them into one.

A cache is (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim). A chunk of blocks is
either all layers, (n, num_layers, 2, block_size, num_kv_heads, head_dim), where each block is one
contiguous piece of memory, or one layer, (n, 2, block_size, num_kv_heads, head_dim), where
n = len(block_ids).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from kv_transfer.layout import KVLayout


def chunk_shape(layout: KVLayout, num_blocks: int, layer: int | None) -> tuple[int, ...]:
    per_layer = (2, *layout.block_shape)  # (2, block_size, kv_heads, head_dim)
    return (num_blocks, *per_layer) if layer is not None else (num_blocks, layout.num_layers, *per_layer)


def chunk_nbytes(layout: KVLayout, num_blocks: int, layer: int | None) -> int:
    per_layer = layout.bytes_per_block // layout.num_layers
    return num_blocks * (per_layer if layer is not None else layout.bytes_per_block)


def check_chunk(layout: KVLayout, blocks: torch.Tensor, num_blocks: int, layer: int | None) -> None:
    """Refuse a chunk whose shape or dtype does not match the layout: it would land garbled."""
    expected = chunk_shape(layout, num_blocks, layer)
    if tuple(blocks.shape) != expected:
        raise ValueError(f"chunk shape {tuple(blocks.shape)} != expected {expected}")
    if blocks.dtype != layout.torch_dtype:
        raise ValueError(f"chunk dtype {blocks.dtype} != layout dtype {layout.torch_dtype}")
    if layer is not None and not 0 <= layer < layout.num_layers:
        raise ValueError(f"layer {layer} out of range [0, {layout.num_layers})")


def block_runs(block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive ids as (chunk offset, first block id, length).

    [7, 8, 9, 2, 3] -> [(0, 7, 3), (3, 2, 2)]. Each run is one copy (contiguous when all layers
    move); measured faster than index_copy_/index_select, which copy row by row.
    """
    runs: list[tuple[int, int, int]] = []
    for offset, block in enumerate(block_ids):
        if runs and runs[-1][1] + runs[-1][2] == block:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((offset, int(block), 1))
    return runs


def _blocks_view(cache: torch.Tensor, layer: int | None) -> torch.Tensor:
    """The cache, or one layer of it (strided); either way blocks are dim 0."""
    return cache if layer is None else cache[:, layer]


def gather_blocks(cache: torch.Tensor, block_ids: Sequence[int], layer: int | None = None) -> torch.Tensor:
    """A new contiguous chunk holding `block_ids` of `cache` (all layers, or one layer)."""
    view = _blocks_view(cache, layer)
    chunk = torch.empty((len(block_ids), *view.shape[1:]), dtype=cache.dtype, device=cache.device)
    for offset, first, length in block_runs(block_ids):
        chunk[offset : offset + length].copy_(view[first : first + length])
    return chunk


def scatter_blocks(
    cache: torch.Tensor, block_ids: Sequence[int], blocks: torch.Tensor, layer: int | None = None
) -> None:
    """Write chunk `blocks` into `cache` at `block_ids`, in place (cache may be shared memory)."""
    view = _blocks_view(cache, layer)
    blocks = blocks.to(cache.device, non_blocking=True)
    for offset, first, length in block_runs(block_ids):
        view[first : first + length].copy_(blocks[offset : offset + length])
