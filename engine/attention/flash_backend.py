"""Paged attention on CUDA with flash-attn 2.

flash-attn's causal mask is aligned to the bottom-right when a request has fewer queries than
keys, which is exactly "a chunk at the end of its context". Its paged-KV path (block_table)
requires block_size to be a multiple of 256; with smaller blocks the context is gathered into a
packed varlen layout first, which is still one kernel launch per step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.attention.torch_backend import write_kv

# flash-attn 2 asserts page_block_size % 256 == 0 for block_table inputs.
_PAGED_BLOCK_MULTIPLE = 256


class FlashAttentionBackend(AttentionBackend):
    name = "flash_attn"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        write_kv(k, v, kv_cache, metadata.slot_mapping)
        md = metadata
        block_size = kv_cache.shape[2]
        paged = block_size % _PAGED_BLOCK_MULTIPLE == 0
        block_table = md.block_table.to(torch.int32)
        if md.is_all_decode and paged:
            out = flash_attn_with_kvcache(
                q.unsqueeze(1),  # (B, 1, heads, hd)
                kv_cache[:, 0],  # (num_blocks, bs, kv_heads, hd), strided on blocks
                kv_cache[:, 1],
                cache_seqlens=md.seq_lens.to(torch.int32),
                block_table=block_table,
                softmax_scale=scale,
                causal=True,
            )  # (B, 1, heads, hd)
            return out.squeeze(1)
        cu_seqlens_k = F.pad(md.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))  # (B + 1,)
        common = dict(
            cu_seqlens_q=md.query_start_loc.to(torch.int32),
            cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=md.max_query_len,
            max_seqlen_k=md.max_seq_len,
            softmax_scale=scale,
            causal=True,
        )
        if paged:
            return flash_attn_varlen_func(q, kv_cache[:, 0], kv_cache[:, 1], block_table=block_table, **common)
        slots = _context_slots(md, cu_seqlens_k, block_size)  # (sum(seq_lens),)
        index = (slots // block_size, slots % block_size)
        return flash_attn_varlen_func(q, kv_cache[:, 0][index], kv_cache[:, 1][index], **common)


def _context_slots(md: AttentionMetadata, cu_seqlens_k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat cache slot of every context token of every request, request after request."""
    device = md.seq_lens.device
    total = sum(md.seq_lens_cpu)
    req_ids = torch.repeat_interleave(
        torch.arange(md.num_reqs, device=device), md.seq_lens.long(), output_size=total
    )  # (total,)
    pos = torch.arange(total, device=device) - cu_seqlens_k[req_ids]  # position within request
    block_ids = md.block_table[req_ids, pos // block_size].long()  # (total,)
    return block_ids * block_size + pos % block_size
