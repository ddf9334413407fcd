"""Attention backends: write each step's K/V into the paged cache and attend over it.

`get_attention_backend` is the one place a backend is chosen; flash-attn is imported only when
it is picked, so CPU installs never need it.
"""
from __future__ import annotations

import importlib.util

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata, ForwardContext

BACKEND_NAMES = ("auto", "torch", "flash_attn")

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "BACKEND_NAMES",
    "ForwardContext",
    "get_attention_backend",
]


def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """"auto": flash_attn on CUDA when it is installed, else torch. An explicit choice that
    cannot run here is an error rather than a silent fallback."""
    device = torch.device(device)
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name == "auto":
        name = "flash_attn" if device.type == "cuda" and _flash_attn_installed() else "torch"
    if name == "torch":
        from engine.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if device.type != "cuda":
        raise ValueError(f"attention backend 'flash_attn' needs a CUDA device, got {device}")
    if not _flash_attn_installed():
        raise ValueError(
            "attention backend 'flash_attn' was chosen but the flash-attn package is not installed "
            "(pip install 'pdserve[gpu]', or use attention_backend='torch')"
        )
    from engine.attention.flash_backend import FlashAttentionBackend

    return FlashAttentionBackend()
