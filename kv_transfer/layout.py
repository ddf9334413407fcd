"""The KV cache layout both sides of a transfer must share, and the handshake check over it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from kv_transfer.errors import KVLayoutMismatch


@dataclass(frozen=True)
class KVLayout:
    """What a KV cache tensor means, independent of how many blocks it has or where it lives.

    The cache tensor has shape (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim),
    index 0 of dim 2 holding K and index 1 holding V. Block-major: one block of every layer is one
    contiguous piece of memory, so moving a block is one copy. `dtype` is kept as a name ("bfloat16") so
    the layout pickles and prints the same in every process.
    """

    model: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if isinstance(self.dtype, torch.dtype):
            object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {self.dtype!r}")
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """Shape of one block of one layer's K (or V): (block_size, num_kv_heads, head_dim)."""
        return (self.block_size, self.num_kv_heads, self.head_dim)

    def cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        # (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)
        return (num_blocks, self.num_layers, 2, *self.block_shape)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers, K and V."""
        elems = self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim
        return elems * self.torch_dtype.itemsize

    def allocate(self, num_blocks: int, device: str | torch.device = "cpu") -> torch.Tensor:
        return torch.zeros(self.cache_shape(num_blocks), dtype=self.torch_dtype, device=device)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> KVLayout:
        return cls(**fields)


def layout_differences(sender: KVLayout, receiver: KVLayout) -> list[str]:
    """One line per differing field, e.g. 'block_size differs: sender 16, receiver 32'."""
    return [
        f"{f.name} differs: sender {getattr(sender, f.name)}, receiver {getattr(receiver, f.name)}"
        for f in dataclasses.fields(KVLayout)
        if getattr(sender, f.name) != getattr(receiver, f.name)
    ]


def check_layouts(sender: KVLayout, receiver: KVLayout) -> None:
    """Raise KVLayoutMismatch naming every differing field; return quietly when they agree."""
    diffs = layout_differences(sender, receiver)
    if diffs:
        raise KVLayoutMismatch("; ".join(diffs))
