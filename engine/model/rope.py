"""Rotary position embedding with a cos/sin table indexed by absolute positions.

HF's Llama layout ("rotate half"): the first and second halves of each head are the two
coordinates of a rotated pair, so x' = x * cos + rotate_half(x) * sin with the table holding each
frequency twice ([f0..f(d/2-1), f0..f(d/2-1)]).
"""
from __future__ import annotations

import math
from typing import Any

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """(head_dim // 2,) float32 inverse frequencies, on the CPU."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "llama3":
        return _llama3_scale(inv_freq, scaling)
    raise ValueError(f"unsupported rope scaling {scaling['rope_type']!r}")


def _llama3_scale(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's context extension: long wavelengths are slowed by `factor`, short ones kept,
    and the band between is interpolated smoothly in 1/wavelength."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    original_ctx = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = original_ctx / low_freq_factor
    high_freq_wavelen = original_ctx / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding:
    """Holds the cos/sin table; not an nn.Module so that building the model on the meta device
    and moving it with `to_empty` never leaves the table uninitialised. The table is built on
    first use for each (device, dtype) and kept."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        # Every layer of one forward pass asks for the same positions tensor: the rows looked
        # up for it are kept until a different tensor (the next step's) is asked for.
        self._last: tuple[torch.Tensor, torch.dtype, tuple[torch.Tensor, torch.Tensor]] | None = None

    def table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(max_positions, 2, head_dim): [:, 0] is cos, [:, 1] is sin."""
        key = (device, dtype)
        if key not in self._tables:
            positions = torch.arange(self.max_positions, dtype=torch.float32)
            freqs = torch.outer(positions, self.inv_freq)  # (max_positions, head_dim // 2)
            angles = torch.cat((freqs, freqs), dim=-1)  # (max_positions, head_dim)
            cos_sin = torch.stack((angles.cos(), angles.sin()), dim=1)  # (max_positions, 2, head_dim)
            self._tables[key] = cos_sin.to(device=device, dtype=dtype)
        return self._tables[key]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (T, 1, head_dim), broadcastable over heads."""
        last = self._last
        if last is not None and last[0] is positions and last[1] == dtype:
            return last[2]
        rows = self.table(positions.device, dtype)[positions]  # (T, 2, head_dim)
        cos_sin = (rows[:, 0:1], rows[:, 1:2])
        self._last = (positions, dtype, cos_sin)
        return cos_sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, heads, head_dim); cos/sin: (T, 1, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (T, heads, head_dim)
    return x * cos + rotated * sin
