"""Elementwise operations of the forward pass that a faster implementation may take over.

The model calls them through its forward context. `TorchOps` is the reference, in torch; on the
CPU the model runner passes the native kernels' version (engine.native.NativeCpuOps), which
computes the same values in one pass over memory where torch makes several.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.model.rope import RotaryEmbedding, apply_rope


class TorchOps:
    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """(T, 2 * I) with rows [gate | up] -> (T, I): silu(gate) * up, SwiGLU's gate."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
        """x (T, heads, head_dim) rotated by each token's position; may rotate x in place."""
        cos, sin = rope.cos_sin(positions, x.dtype)  # (T, 1, head_dim) each
        return apply_rope(x, cos, sin)


TORCH_OPS = TorchOps()
