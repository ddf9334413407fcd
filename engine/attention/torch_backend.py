"""Paged attention in plain PyTorch (CPU, or CUDA without flash-attn).

Each step: scatter the new K/V into their slots, then attend. Decode-only batches run one batched
SDPA over the gathered blocks; batches with prefill chunks run one SDPA per request, whose queries
sit at the end of its context (query i of a chunk of length L in a context of length S is at
absolute position S - L + i and sees keys 0..S - L + i).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend, AttentionMetadata


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store this step's K/V (T, kv_heads, hd) at their flat slots (block * block_size + offset)
    of one layer's cache (num_blocks, 2, block_size, kv_heads, hd)."""
    block_size = kv_cache.shape[2]
    index = (slot_mapping // block_size, slot_mapping % block_size)
    kv_cache[:, 0].index_put_(index, k.to(kv_cache.dtype))
    kv_cache[:, 1].index_put_(index, v.to(kv_cache.dtype))


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """cache: (num_blocks, bs, kv_heads, hd), strided on blocks; block_ids: (..., nblk)
    -> (..., length, kv_heads, hd)."""
    # index_select on the flattened ids: several times cheaper on CPU than advanced indexing.
    blocks = cache.index_select(0, block_ids.reshape(-1))  # (B * nblk, bs, kv_heads, hd)
    blocks = blocks.view(*block_ids.shape, *cache.shape[1:])  # (..., nblk, bs, kv_heads, hd)
    tokens = blocks.flatten(-4, -3)  # (..., nblk * bs, kv_heads, hd)
    return tokens[..., :length, :, :]


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

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
        if metadata.is_all_decode:
            return self._decode(q, kv_cache, metadata, scale)
        return self._prefill(q, kv_cache, metadata, scale)

    def _decode(
        self, q: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """One query per request. GQA without copying K/V: the group's query heads take the
        place of the query-length axis, so q is (B, kv_heads, group, hd) against
        K/V (B, kv_heads, S, hd); no causal mask is needed as every key is in the past."""
        num_reqs, num_heads, head_dim = q.shape
        kv_heads = kv_cache.shape[3]
        block_size = kv_cache.shape[2]
        max_len = md.max_seq_len
        nblk = -(-max_len // block_size)
        block_ids = md.block_table[:, :nblk]  # (B, nblk)
        keys = gather_blocks(kv_cache[:, 0], block_ids, max_len).transpose(1, 2)  # (B, kv_heads, S, hd)
        values = gather_blocks(kv_cache[:, 1], block_ids, max_len).transpose(1, 2)
        grouped_q = q.view(num_reqs, kv_heads, num_heads // kv_heads, head_dim)  # (B, kv_heads, G, hd)
        mask = None
        if num_reqs > 1:
            # Rows are padded to the longest context; hide each request's tail beyond its length.
            key_pos = torch.arange(max_len, device=q.device)
            mask = (key_pos[None, :] < md.seq_lens[:, None]).view(num_reqs, 1, 1, max_len)
        out = F.scaled_dot_product_attention(
            grouped_q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, scale=scale
        )  # (B, kv_heads, G, hd)
        return out.reshape(num_reqs, num_heads, head_dim)

    def _prefill(
        self, q: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        out = torch.empty_like(q)  # (T, heads, hd)
        for i in range(md.num_reqs):
            start, end = md.query_start_loc_cpu[i], md.query_start_loc_cpu[i + 1]
            out[start:end] = self._attend_one(q[start:end], kv_cache, md, i, scale)
        return out

    def _attend_one(
        self, q: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata, req: int, scale: float
    ) -> torch.Tensor:
        """q: (L, heads, hd) of one request -> (L, heads, hd)."""
        query_len = q.shape[0]
        seq_len = md.seq_lens_cpu[req]
        nblk = -(-seq_len // kv_cache.shape[2])
        block_ids = md.block_table[req, :nblk]  # (nblk,)
        keys = gather_blocks(kv_cache[:, 0], block_ids, seq_len).transpose(0, 1)  # (kv_heads, S, hd)
        values = gather_blocks(kv_cache[:, 1], block_ids, seq_len).transpose(0, 1)
        queries = q.transpose(0, 1)  # (heads, L, hd)
        if query_len == seq_len:
            mask, causal = None, True  # a fresh prefill: plain lower-triangular
        else:
            offset = seq_len - query_len
            q_pos = torch.arange(offset, seq_len, device=q.device)
            k_pos = torch.arange(seq_len, device=q.device)
            mask, causal = k_pos[None, :] <= q_pos[:, None], False  # (L, S)
        out = F.scaled_dot_product_attention(
            queries.unsqueeze(0),
            keys.to(q.dtype).unsqueeze(0),
            values.to(q.dtype).unsqueeze(0),
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=True,
        )  # (1, heads, L, hd)
        return out[0].transpose(0, 1)  # (L, heads, hd)
