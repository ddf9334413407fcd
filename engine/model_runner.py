"""Turns a scheduled step into one forward pass over the paged KV cache, then samples.

The KV cache is one tensor (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim):
block-major, so each block (all layers, K and V) is one contiguous piece of memory that a KV
transfer moves with a single copy. Layer l's strided view kv_cache[:, l], of shape
(num_blocks, 2, block_size, num_kv_heads, head_dim), is what the attention backend reads and
writes. Workers of the disaggregated path move blocks of this same tensor.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.attention import get_attention_backend
from engine.attention.base import AttentionMetadata, ForwardContext
from engine.memory import huge_page_zeros
from engine.model.config import ModelArchConfig
from engine.native import (MAX_NATIVE_ROWS, CpuDecodeStep, DecodeStepOutput, NativeBuildError, NativeCpuOps,
                           unsupported_reason)
from engine.sampler import Sampler
from engine.scheduler import ScheduledRequest

logger = logging.getLogger(__name__)

DECODE_KERNELS = ("auto", "native", "torch")


@dataclass(frozen=True)
class KVCacheShape:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * elem

    @classmethod
    def for_budget(
        cls, arch: ModelArchConfig, block_size: int, dtype: torch.dtype, budget_bytes: float
    ) -> "KVCacheShape":
        probe = cls(arch.num_layers, 1, block_size, arch.num_kv_heads, arch.head_dim, dtype)
        num_blocks = max(1, int(budget_bytes // probe.bytes_per_block))
        return cls(arch.num_layers, num_blocks, block_size, arch.num_kv_heads, arch.head_dim, dtype)


@dataclass(frozen=True)
class StepResult:
    # request id -> (sampled token id, logprobs or None), for requests that sampled this step
    sampled: dict[str, tuple[int, dict[int, float] | None]]


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_shape: KVCacheShape,
        device: torch.device,
        attention_backend: str = "auto",
        kv_cache: torch.Tensor | None = None,
        decode_kernel: str = "auto",
    ) -> None:
        self.model = model
        self.kv_shape = kv_shape
        self.device = device
        self.backend = get_attention_backend(attention_backend, device)
        self.sampler = Sampler()
        shape = (kv_shape.num_blocks, kv_shape.num_layers, 2, kv_shape.block_size,
                 kv_shape.num_kv_heads, kv_shape.head_dim)
        if kv_cache is None:
            kv_cache = (huge_page_zeros(shape, kv_shape.dtype) if device.type == "cpu"
                        else torch.zeros(shape, dtype=kv_shape.dtype, device=device))
        elif tuple(kv_cache.shape) != shape or kv_cache.dtype != kv_shape.dtype:
            raise ValueError(f"KV cache tensor is {tuple(kv_cache.shape)} {kv_cache.dtype}, "
                             f"expected {shape} {kv_shape.dtype}")
        # A tensor handed in (shared memory a KV receiver writes into) is used in place.
        self.kv_cache = kv_cache
        self.kv_caches = list(self.kv_cache.unbind(1))  # per layer: (blocks, 2, bs, kv_heads, hd)
        self.native_decode = self._native_decode_step(decode_kernel)
        self._logits_buffer: torch.Tensor | None = None  # the native step's output, reused
        self.ops = None  # engine.model.ops.TorchOps
        if self.native_decode is None:
            model.use_column_major_weights()
        else:
            self.ops = NativeCpuOps(self.native_decode.library)

    def _native_decode_step(self, decode_kernel: str) -> CpuDecodeStep | None:
        """The native CPU decode step (engine.native) when `decode_kernel` asks for it and it can
        run here: "native" insists (an error says why not), "auto" falls back to torch ops."""
        if decode_kernel not in DECODE_KERNELS:
            raise ValueError(f"unknown decode kernel {decode_kernel!r}; choose one of {', '.join(DECODE_KERNELS)}")
        if decode_kernel == "torch":
            return None
        if decode_kernel == "auto" and unsupported_reason(self.model, self.kv_cache) is not None:
            return None  # not a float32 CPU model: nothing to warn about
        try:
            return CpuDecodeStep.create(self.model, self.kv_cache)
        except NativeBuildError as err:
            if decode_kernel == "native":
                raise
            logger.warning("decoding with torch ops: %s", err)
            return None

    @torch.inference_mode()
    def execute(
        self, scheduled: tuple[ScheduledRequest, ...], block_tables: list[list[int]],
        after_layer: Callable[[int], None] | None = None,
    ) -> StepResult:
        rows = [i for i, s in enumerate(scheduled) if s.samples]
        argmax = None
        if self._runs_natively(scheduled, after_layer):
            logits, argmax = self._native_step(scheduled, block_tables)  # (num_reqs, vocab)
            if len(rows) < len(scheduled):  # a one-token prefill chunk not ending its prompt samples nothing
                logits, argmax = logits[rows], [argmax[i] for i in rows]
        else:
            input_ids, positions, metadata = self.prepare_inputs(scheduled, block_tables)
            ctx = ForwardContext(metadata, self.kv_caches, self.backend, after_layer, self.ops)
            hidden = self.model(input_ids, positions, ctx)  # (num_tokens, hidden)
            last_token_index = [metadata.query_start_loc_cpu[i + 1] - 1 for i in rows]
            index = torch.tensor(last_token_index, device=self.device)
            logits = self.model.compute_logits(hidden.index_select(0, index)) if rows else None  # (rows, vocab)
        if not rows:
            return StepResult({})
        requests = [scheduled[i].request for i in rows]
        out = self.sampler(logits, requests, argmax)
        return StepResult({
            r.request_id: (tok, lp) for r, tok, lp in zip(requests, out.token_ids, out.logprobs)
        })

    def _runs_natively(
        self, scheduled: tuple[ScheduledRequest, ...], after_layer: Callable[[int], None] | None
    ) -> bool:
        """Steps of one new token per request, for up to MAX_NATIVE_ROWS requests, without per-layer hooks."""
        return (self.native_decode is not None and after_layer is None and len(scheduled) <= MAX_NATIVE_ROWS
                and all(s.num_new_tokens == 1 for s in scheduled))

    def _native_step(self, scheduled: tuple[ScheduledRequest, ...], block_tables: list[list[int]]) -> DecodeStepOutput:
        """One native decode step, fed straight from the requests (a steady decode step of a
        small model takes tens of milliseconds; the Python around it is kept to a few percent)."""
        token_ids, seq_lens = [], []
        for item in scheduled:
            request = item.request
            token_ids.append(request.all_token_ids[request.num_computed_tokens])
            seq_lens.append(request.num_computed_tokens + 1)
        n = len(scheduled)
        if self._logits_buffer is None or self._logits_buffer.shape[0] < n:
            vocab = self.model.config.vocab_size
            self._logits_buffer = torch.empty((max(n, MAX_NATIVE_ROWS), vocab), dtype=torch.float32)
        # The buffer is reused step after step: the sampler reads it before the next step runs.
        return self.native_decode(token_ids, block_tables, seq_lens, self._logits_buffer[:n])

    def prepare_inputs(
        self, scheduled: tuple[ScheduledRequest, ...], block_tables: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        block_size = self.kv_shape.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        for item, table in zip(scheduled, block_tables):
            start = item.request.num_computed_tokens
            end = start + item.num_new_tokens
            token_ids.extend(item.request.all_token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
            query_start.append(query_start[-1] + item.num_new_tokens)
            seq_lens.append(end)
        max_blocks = max(len(t) for t in block_tables)
        padded = [t + [0] * (max_blocks - len(t)) for t in block_tables]
        dev = self.device
        metadata = AttentionMetadata(
            num_reqs=len(scheduled),
            num_tokens=len(token_ids),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=dev),
            query_start_loc_cpu=query_start,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            seq_lens_cpu=seq_lens,
            block_table=torch.tensor(padded, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            max_query_len=max(s.num_new_tokens for s in scheduled),
            max_seq_len=max(seq_lens),
        )
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=dev)
        position_ids = torch.tensor(positions, dtype=torch.long, device=dev)
        return input_ids, position_ids, metadata
