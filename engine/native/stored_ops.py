"""The native kernels for stored-format weights (stored_ops.c), and their reference without them.

`kernels()` gives the compiled operations, or None where they cannot be built (no C compiler):
then `reference_unpack_rows` and `reference_gather_rows` dequantize with the gguf package, which
implements every format from its definition in numpy.
"""
from __future__ import annotations

import ctypes
import logging
import threading

import numpy as np
import torch

from engine.model.stored import StoredMatrix
from engine.native.build import NativeBuildError, load_library

logger = logging.getLogger(__name__)

_f32p = ctypes.POINTER(ctypes.c_float)
_i64p = ctypes.POINTER(ctypes.c_int64)


class Segment(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("row_bytes", ctypes.c_int64), ("rows", ctypes.c_int32),
                ("type", ctypes.c_int32)]


MAX_SEGMENTS = 3


class Matrix(ctypes.Structure):
    _fields_ = [("rows", ctypes.c_int32), ("cols", ctypes.c_int32), ("num_segments", ctypes.c_int32),
                ("segments", Segment * MAX_SEGMENTS)]


def matrix_struct(matrix: StoredMatrix) -> Matrix:
    """The kernels' view of a stored matrix, made once and kept on it (its tensors outlive it)."""
    if matrix.native is None:
        struct = Matrix(rows=matrix.rows, cols=matrix.cols, num_segments=len(matrix.segments))
        for k, s in enumerate(matrix.segments):
            struct.segments[k] = Segment(s.data.data_ptr(), s.data.shape[1], s.rows, s.format.type_id)
        matrix.native = struct
    return matrix.native


def float_matrix_struct(weight: torch.Tensor) -> Matrix:
    """A contiguous float32 (rows, cols) tensor as a one-segment matrix; the caller keeps `weight`."""
    rows, cols = weight.shape
    struct = Matrix(rows=rows, cols=cols, num_segments=1)
    struct.segments[0] = Segment(weight.data_ptr(), cols * 4, rows, 0)
    return struct


class StoredKernels:
    def __init__(self, library: ctypes.CDLL) -> None:
        self.library = library
        matrix_p = ctypes.POINTER(Matrix)
        for name, args in {
            "pd_unpack_rows": [matrix_p, ctypes.c_int64, ctypes.c_int64, _f32p, ctypes.c_int],
            "pd_gather_rows": [matrix_p, _i64p, ctypes.c_int64, _f32p, ctypes.c_int],
            "pd_project": [matrix_p, _f32p, ctypes.c_int, _f32p, _f32p, ctypes.c_int],
            "pd_stored_gemm": [matrix_p, _f32p, ctypes.c_int64, _f32p, _f32p, ctypes.c_int],
        }.items():
            getattr(library, name).restype = ctypes.c_int
            getattr(library, name).argtypes = args

    def unpack_rows(self, matrix: StoredMatrix, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        _check_out(out, (r1 - r0, matrix.cols))
        status = self.library.pd_unpack_rows(ctypes.byref(matrix_struct(matrix)), r0, r1, _ptr(out),
                                             torch.get_num_threads())
        if status:
            raise IndexError(f"rows [{r0}, {r1}) outside a matrix of {matrix.rows} rows")
        return out

    def gather_rows(self, matrix: StoredMatrix, ids: torch.Tensor) -> torch.Tensor:
        out = torch.empty((ids.shape[0], matrix.cols), dtype=torch.float32)
        status = self.library.pd_gather_rows(ctypes.byref(matrix_struct(matrix)), ctypes.cast(ids.data_ptr(), _i64p),
                                             ids.shape[0], _ptr(out), torch.get_num_threads())
        if status:
            raise IndexError(f"a row id outside a matrix of {matrix.rows} rows")
        return out

    def project(self, matrix: StoredMatrix, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (n, cols) contiguous float32 -> x @ matrix.T + bias, (n, rows), with the decode step's
        kernels: each weight unpacked once in registers for all n rows."""
        return self._matmul(self.library.pd_project, matrix, x, bias)

    def gemm(self, matrix: StoredMatrix, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The same product with the blocked GEMM (stored_gemm.c), for many rows."""
        return self._matmul(self.library.pd_stored_gemm, matrix, x, bias)

    def _matmul(self, function, matrix: StoredMatrix, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        _check_out(x, (x.shape[0], matrix.cols))
        if bias is not None:
            _check_out(bias, (matrix.rows,))
        out = torch.empty((x.shape[0], matrix.rows), dtype=torch.float32)
        status = function(ctypes.byref(matrix_struct(matrix)), _ptr(x), x.shape[0],
                          None if bias is None else _ptr(bias), _ptr(out), torch.get_num_threads())
        if status:
            raise MemoryError("out of memory for the product's scratch buffers")
        return out


def _ptr(t: torch.Tensor):
    return ctypes.cast(t.data_ptr(), _f32p)


def _check_out(t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape or t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"expected a contiguous float32 CPU tensor of shape {shape}, got {tuple(t.shape)} {t.dtype}")


_lock = threading.Lock()
_kernels: StoredKernels | None = None
_unavailable = False


def kernels() -> StoredKernels | None:
    """The compiled kernels, or None (with one warning) where they cannot be built here."""
    global _kernels, _unavailable
    if _kernels is None and not _unavailable:
        with _lock:
            if _kernels is None and not _unavailable:
                try:
                    _kernels = StoredKernels(load_library())
                except NativeBuildError as err:
                    logger.warning("stored-format weights run through numpy dequantization (slow): %s", err)
                    _unavailable = True
    return _kernels


def _segment_floats(matrix: StoredMatrix, rows: range) -> np.ndarray:
    """Rows (global indices, ascending) of the matrix dequantized by the gguf package."""
    import gguf

    parts, base = [], 0
    for s in matrix.segments:
        local = [r - base for r in rows if base <= r < base + s.rows]
        if local:
            raw = s.data[local[0]:local[-1] + 1].numpy()
            qtype = gguf.GGMLQuantizationType[s.format.name]
            parts.append(gguf.quants.dequantize(raw, qtype).reshape(len(local), matrix.cols))
        base += s.rows
    return np.concatenate(parts).astype(np.float32, copy=False)


def reference_unpack_rows(matrix: StoredMatrix, r0: int, r1: int) -> torch.Tensor:
    return torch.from_numpy(_segment_floats(matrix, range(r0, r1)).copy())


def reference_gather_rows(matrix: StoredMatrix, ids: torch.Tensor) -> torch.Tensor:
    return torch.stack([reference_unpack_rows(matrix, i, i + 1)[0] for i in ids.tolist()]) if len(ids) else \
        torch.empty((0, matrix.cols))
