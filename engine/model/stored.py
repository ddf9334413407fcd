"""Weights kept in the format their checkpoint stores them in: GGUF's block formats (Q4_0, Q4_1,
Q8_0, Q4_K, Q5_K, Q6_K), float16 and bfloat16, next to plain float32.

A `StoredMatrix` is a projection's (rows, cols) weight as one to three row segments (a fused
QKV whose parts a GGUF file stores in different formats), each a uint8 tensor of whole rows in
the format's own bytes. `StoredLinear` and `StoredEmbedding` are the model's modules over such
a matrix. Nothing here ever holds a float32 copy of a whole matrix: the native kernels
(engine.native.stored_ops) unpack weights in registers, or a tile at a time into a small buffer
for prefill's matmul.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class StoredFormat:
    name: str
    type_id: int  # GGML's type id, as written in GGUF files and read by the native kernels
    block: int  # weights per block
    block_bytes: int

    def row_bytes(self, cols: int) -> int:
        """Bytes of a row of `cols` weights; rows are whole blocks."""
        if cols % self.block:
            raise ValueError(f"a row of {cols} weights is not a whole number of {self.name} blocks of {self.block}")
        return cols // self.block * self.block_bytes

    @property
    def bytes_per_weight(self) -> float:
        return self.block_bytes / self.block


FORMATS = {f.name: f for f in (
    StoredFormat("F32", 0, 1, 4), StoredFormat("F16", 1, 1, 2), StoredFormat("BF16", 30, 1, 2),
    StoredFormat("Q4_0", 2, 32, 18), StoredFormat("Q4_1", 3, 32, 20), StoredFormat("Q8_0", 8, 32, 34),
    StoredFormat("Q4_K", 12, 256, 144), StoredFormat("Q5_K", 13, 256, 176), StoredFormat("Q6_K", 14, 256, 210),
)}
TORCH_FORMATS = {torch.float32: FORMATS["F32"], torch.float16: FORMATS["F16"], torch.bfloat16: FORMATS["BF16"]}


@dataclass(frozen=True)
class StoredSegment:
    format: StoredFormat
    data: torch.Tensor  # (rows, row_bytes) uint8, C-contiguous

    @property
    def rows(self) -> int:
        return self.data.shape[0]


class StoredMatrix:
    """A (rows, cols) weight made of row segments, one after another."""

    def __init__(self, segments: tuple[StoredSegment, ...], cols: int) -> None:
        if not 1 <= len(segments) <= 3:
            raise ValueError(f"a stored matrix has 1 to 3 segments, got {len(segments)}")
        for s in segments:
            expected = s.format.row_bytes(cols)
            if s.data.dtype != torch.uint8 or s.data.dim() != 2 or s.data.shape[1] != expected:
                raise ValueError(f"a {s.format.name} segment of {cols} columns must be (rows, {expected}) uint8, "
                                 f"got {tuple(s.data.shape)} {s.data.dtype}")
            if not s.data.is_contiguous():
                raise ValueError("stored segments must be contiguous")
        self.segments = segments
        self.cols = cols
        self.rows = sum(s.rows for s in segments)
        self.native = None  # the kernels' view of it (engine.native.stored_ops), made on first use

    @property
    def nbytes(self) -> int:
        return sum(s.data.numel() for s in self.segments)

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(s.format.name for s in self.segments)

    def __repr__(self) -> str:
        return f"StoredMatrix({self.rows}, {self.cols}, {'+'.join(self.formats)})"


# Up to this many rows the native kernels run the product as a decode step does (each weight
# unpacked in registers once for all rows); for more, a blocked GEMM that unpacks a tile of
# weight rows into a small buffer and reuses it for every row (engine/native/stored_gemm.c).
NATIVE_MAX_ROWS = 64
# Without the native kernels: tiles of this many weights (1 MiB in float32), dequantized by the
# gguf package, each multiplied with torch's matmul.
TILE_WEIGHTS = 2**18


def stored_linear(x: torch.Tensor, matrix: StoredMatrix, bias: torch.Tensor | None) -> torch.Tensor:
    """x (T, cols) float32 @ matrix.T (+ bias) -> (T, rows) float32."""
    from engine.native.stored_ops import kernels

    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"stored weights take float32 CPU activations, got {x.dtype} on {x.device}")
    x = x.contiguous()
    ops = kernels()
    if ops is not None:
        return ops.project(matrix, x, bias) if x.shape[0] <= NATIVE_MAX_ROWS else ops.gemm(matrix, x, bias)
    out = torch.empty((x.shape[0], matrix.rows), dtype=torch.float32)
    tile_rows = max(16, TILE_WEIGHTS // matrix.cols)
    for r0 in range(0, matrix.rows, tile_rows):
        r1 = min(matrix.rows, r0 + tile_rows)
        torch.mm(x, unpack_rows(matrix, r0, r1).t(), out=out[:, r0:r1])  # BLAS writes the column slice in place
    return out if bias is None else out.add_(bias)


def unpack_rows(matrix: StoredMatrix, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) of the matrix as float32 (r1 - r0, cols): their exact dequantization."""
    from engine.native.stored_ops import kernels, reference_unpack_rows

    ops = kernels()
    if ops is None:
        return reference_unpack_rows(matrix, r0, r1)
    return ops.unpack_rows(matrix, r0, r1, torch.empty((r1 - r0, matrix.cols), dtype=torch.float32))


class StoredLinear(nn.Module):
    """A projection over a stored matrix; its bias, if any, is a float32 parameter."""

    def __init__(self, matrix: StoredMatrix, bias: bool) -> None:
        super().__init__()
        self.stored = matrix
        self.in_features, self.out_features = matrix.cols, matrix.rows
        self.bias = nn.Parameter(torch.empty(matrix.rows)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stored_linear(x, self.stored, self.bias)  # (T, in) -> (T, out)


class StoredEmbedding(nn.Module):
    """The token embedding over a stored matrix: each token's row is unpacked on lookup."""

    def __init__(self, matrix: StoredMatrix) -> None:
        super().__init__()
        self.stored = matrix

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        from engine.native.stored_ops import kernels, reference_gather_rows

        ids = input_ids.to(torch.int64).contiguous()  # (T,)
        bad = (ids < 0) | (ids >= self.stored.rows)
        if bool(bad.any()):
            raise ValueError(f"token id {int(ids[bad][0])} outside the vocabulary of {self.stored.rows}")
        ops = kernels()
        if ops is None:
            return reference_gather_rows(self.stored, ids)
        return ops.gather_rows(self.stored, ids)  # (T, hidden)
