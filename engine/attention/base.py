"""The contract between the model, the attention backends and the model runner.

Tokens of all scheduled requests are laid out flat, request after request; each request
contributes `query_len` new tokens whose K/V are written into its paged blocks before
attention runs. The KV cache of one layer is a strided view of shape
(num_blocks, 2, block_size, num_kv_heads, head_dim) into the block-major cache of all layers:
index 0 of dim 1 holds K, index 1 holds V.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    num_reqs: int
    num_tokens: int
    # (num_reqs + 1,) int32: request i's queries are rows query_start_loc[i]:query_start_loc[i+1]
    query_start_loc: torch.Tensor
    query_start_loc_cpu: list[int]
    # (num_reqs,) int32: context length of each request *including* this step's tokens
    seq_lens: torch.Tensor
    seq_lens_cpu: list[int]
    # (num_reqs, max_blocks) int32, rows padded with 0; block j holds positions j*bs:(j+1)*bs
    block_table: torch.Tensor
    # (num_tokens,) int64: flat slot (block_id * block_size + offset) each new token's K/V goes to
    slot_mapping: torch.Tensor
    max_query_len: int
    max_seq_len: int
    # Per-step scratch a backend fills on the first layer and reuses for the others (e.g.
    # index tensors derived from the fields above).
    backend_cache: dict = field(default_factory=dict)

    @property
    def is_all_decode(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(ABC):
    """Writes this step's K/V into the paged cache, then attends causally over the context."""

    name: str = "base"

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # (num_tokens, num_heads, head_dim)
        k: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
        v: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim)
        kv_cache: torch.Tensor,  # (num_blocks, 2, block_size, num_kv_heads, head_dim), strided
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # (num_tokens, num_heads, head_dim)
        ...


@dataclass
class ForwardContext:
    """What one forward pass needs besides token ids and positions."""

    metadata: AttentionMetadata
    kv_caches: list[torch.Tensor]  # one (num_blocks, 2, block_size, kv_heads, head_dim) per layer
    backend: AttentionBackend
    # Called with a layer's index once that layer has run, i.e. once this step's K/V of that
    # layer are in the cache (a prefill worker pushes them while the next layers compute).
    after_layer: Callable[[int], None] | None = None
    # The elementwise operations (SwiGLU gate, rotary embedding): an engine.model.ops.TorchOps
    # or a faster equivalent; None means TorchOps.
    ops: Any = None

    def attention(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        return self.backend.forward(q, k, v, self.kv_caches[layer_idx], self.metadata, scale)
