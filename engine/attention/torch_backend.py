"""Paged attention in plain PyTorch (CPU, or CUDA without flash-attn).

Each step: scatter the new K/V into their slots, then attend. Decode-only batches run batched SDPA
over the gathered blocks, padded to the longest context of the batch; requests are split into up
to MAX_DECODE_GROUPS groups of similar context length so that short requests are not padded to the
longest one (gathering and attending over padding was most of a mixed batch's attention time).
Batches with prefill chunks run one SDPA per request, whose queries sit at the end of its context
(query i of a chunk of length L in a context of length S is at absolute position S - L + i and
sees keys 0..S - L + i).
"""
from __future__ import annotations

from dataclasses import dataclass

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


MAX_DECODE_GROUPS = 4
# The fixed cost of one more group (its gathers and SDPA call in every layer), in padded key
# positions: measured on CPU at roughly 50-80 us per group and layer, ~0.5 us per position.
GROUP_COST_POSITIONS = 128


def length_groups(
    seq_lens: list[int], max_groups: int = MAX_DECODE_GROUPS, group_cost: int = GROUP_COST_POSITIONS
) -> list[list[int]]:
    """Split request indices into at most `max_groups` groups that minimise the padded work,
    sum(len(group) * max length in group) + group_cost per group. Groups are runs of the
    requests sorted by length, so an exact dynamic programme over split points is
    O(max_groups * n^2): tiny per step."""
    order = sorted(range(len(seq_lens)), key=seq_lens.__getitem__)
    lens = [seq_lens[i] for i in order]
    n = len(lens)
    inf = float("inf")
    # cost[g][j]: least padded work covering the j shortest requests with g groups
    cost = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    split = [[0] * (n + 1) for _ in range(max_groups + 1)]
    cost[0][0] = 0
    for g in range(1, max_groups + 1):
        for j in range(1, n + 1):
            for i in range(g - 1, j):
                c = cost[g - 1][i] + (j - i) * lens[j - 1]
                if c < cost[g][j]:
                    cost[g][j], split[g][j] = c, i
    g = min(range(1, min(max_groups, n) + 1), key=lambda k: (cost[k][n] + k * group_cost, k))
    groups, j = [], n
    while j > 0:
        i = split[g][j]
        groups.append(order[i:j])
        j, g = i, g - 1
    return groups[::-1]


@dataclass(frozen=True)
class _DecodeGroup:
    rows: torch.Tensor | None  # (b,) indices into the batch; None: the whole batch, in order
    block_ids: torch.Tensor  # (b, nblk) blocks covering the longest context of the group
    max_len: int
    mask: torch.Tensor | None  # (b, 1, 1, max_len) True where a key is inside the context


def _decode_groups(md: AttentionMetadata, block_size: int) -> list[_DecodeGroup]:
    groups = []
    whole = length_groups(md.seq_lens_cpu)
    for members in whole:
        rows = None if len(whole) == 1 else torch.tensor(members, device=md.block_table.device)
        max_len = max(md.seq_lens_cpu[i] for i in members)
        table = md.block_table if rows is None else md.block_table.index_select(0, rows)
        lens = md.seq_lens if rows is None else md.seq_lens.index_select(0, rows)
        mask = None
        if len(members) > 1:
            # Rows are padded to the longest context; hide each request's tail beyond its length.
            key_pos = torch.arange(max_len, device=md.seq_lens.device)
            mask = (key_pos[None, :] < lens[:, None]).view(len(members), 1, 1, max_len)
        groups.append(_DecodeGroup(rows, table[:, : -(-max_len // block_size)], max_len, mask))
    return groups


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
        """One query per request, batched per group of similar context lengths."""
        groups = md.backend_cache.get("torch_decode_groups")
        if groups is None:
            groups = md.backend_cache["torch_decode_groups"] = _decode_groups(md, kv_cache.shape[2])
        if len(groups) == 1:
            return self._decode_group(q, kv_cache, groups[0], scale)
        out = torch.empty_like(q)
        for group in groups:
            out[group.rows] = self._decode_group(q.index_select(0, group.rows), kv_cache, group, scale)
        return out

    def _decode_group(
        self, q: torch.Tensor, kv_cache: torch.Tensor, group: _DecodeGroup, scale: float
    ) -> torch.Tensor:
        """q: (b, heads, hd) -> (b, heads, hd). GQA without copying K/V: the group's query heads
        take the place of the query-length axis, so q is (b, kv_heads, G, hd) against
        K/V (b, kv_heads, S, hd); no causal mask is needed as every key is in the past."""
        num_reqs, num_heads, head_dim = q.shape
        kv_heads = kv_cache.shape[3]
        keys = gather_blocks(kv_cache[:, 0], group.block_ids, group.max_len).transpose(1, 2)  # (b, kv_heads, S, hd)
        values = gather_blocks(kv_cache[:, 1], group.block_ids, group.max_len).transpose(1, 2)
        grouped_q = q.view(num_reqs, kv_heads, num_heads // kv_heads, head_dim)  # (b, kv_heads, G, hd)
        out = F.scaled_dot_product_attention(
            grouped_q, keys.to(q.dtype), values.to(q.dtype), attn_mask=group.mask, scale=scale
        )  # (b, kv_heads, G, hd)
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
