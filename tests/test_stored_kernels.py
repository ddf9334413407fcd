"""The native kernels for stored-format weights against references nobody here wrote: the gguf
package's dequantization of every format, then a float64 matmul in torch.

Unpacking must be exact (bit for bit the gguf package's float32 values), the decode step's
projection right for every batch size from 1 to 64, the prefill GEMM right past that, on
shapes that are not multiples of anything (odd row counts, 16-bit rows of odd length,
matrices whose row segments are in different formats). Bad inputs are refused clearly.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.loader.stored_checkpoint import check_blocks
from engine.native.build import EXTRA_FLAGS_VAR, _cpu_flags
from engine.model.stored import FORMATS, StoredMatrix, StoredSegment, stored_linear, unpack_rows
from engine.native.stored_ops import kernels
from tests.stored_models import random_matrix, random_rows

pytestmark = pytest.mark.skipif(kernels() is None, reason="no C compiler: the native kernels cannot be built")


def gguf_dense(matrix: StoredMatrix) -> torch.Tensor:
    """The matrix dequantized by the gguf package, segment by segment, (rows, cols) float32."""
    import gguf

    parts = [gguf.quants.dequantize(s.data.numpy(), gguf.GGMLQuantizationType[s.format.name]) for s in matrix.segments]
    return torch.from_numpy(np.concatenate(parts).reshape(matrix.rows, matrix.cols).astype(np.float32))


def reference(x: torch.Tensor, matrix: StoredMatrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = x.double() @ gguf_dense(matrix).double().t()
    return out if bias is None else out + bias.double()


def assert_matches(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, matrix: StoredMatrix) -> None:
    """float32 sums of `cols` products against the float64 reference: the error bound of a
    float32 dot product, cols * eps * sum |x_k w_k|, with room for the summation order."""
    bound = matrix.cols * 2**-24 * (x.double().abs() @ gguf_dense(matrix).double().abs().t())
    assert got.dtype == torch.float32 and got.shape == want.shape
    excess = (got.double() - want).abs() - bound - 1e-30
    assert (excess <= 0).all(), f"max error over the bound: {excess.max().item()}"


# Odd on purpose: rows that are no multiple of 4 (the kernels' quads) nor of the thread split;
# 16-bit rows whose length is no multiple of 8 or 32 (the vector widths).
SHAPES = {"F32": (37, 67), "F16": (37, 67), "BF16": (37, 67), "Q4_0": (37, 96), "Q4_1": (37, 96),
          "Q8_0": (37, 96), "Q4_K": (21, 512), "Q5_K": (21, 512), "Q6_K": (21, 512)}


@pytest.mark.parametrize("name", list(FORMATS))
def test_unpacking_is_the_formats_dequantization_bit_for_bit(name):
    rows, cols = SHAPES[name]
    matrix = random_matrix((name,), (rows,), cols, seed=1)
    assert torch.equal(unpack_rows(matrix, 0, rows), gguf_dense(matrix))
    assert torch.equal(unpack_rows(matrix, 5, 9), gguf_dense(matrix)[5:9])
    ids = torch.tensor([3, 0, rows - 1, 3])
    assert torch.equal(kernels().gather_rows(matrix, ids), gguf_dense(matrix)[ids])


@pytest.mark.parametrize("name", list(FORMATS))
def test_projection_for_every_batch_size_up_to_64(name):
    rows, cols = SHAPES[name]
    matrix = random_matrix((name,), (rows,), cols, seed=2)
    x = torch.randn(64, cols, generator=torch.Generator().manual_seed(3))
    bias = torch.randn(rows)
    want = reference(x, matrix, bias)
    for n in range(1, 65):
        got = kernels().project(matrix, x[:n].contiguous(), bias)
        assert_matches(got, want[:n], x[:n], matrix)


@pytest.mark.parametrize("name,cols", [("Q4_1", 352), ("Q6_K", 768), ("F16", 301), ("F32", 259)])
def test_tiles_of_rows_longer_than_one_unpacked_piece(name, cols):
    """From 8 inputs on (and in the prefill GEMM) tiles are unpacked 256 columns at a time and
    transposed 8 x 8: rows that end in a partial piece, 16-bit rows whose last piece is no
    multiple of 8, row counts that leave a partial group of 8 rows in the last tile."""
    matrix = random_matrix((name,), (45,), cols, seed=7)
    x = torch.randn(80, cols, generator=torch.Generator().manual_seed(8))
    want = reference(x, matrix)
    for n in (8, 13, 64):
        assert_matches(kernels().project(matrix, x[:n].contiguous()), want[:n], x[:n], matrix)
    assert_matches(stored_linear(x, matrix, None), want, x, matrix)


def test_one_input_matches_its_float32_dequantization_bit_for_bit():
    """A stored row unpacks into the float32 kernel's exact accumulation order: the same bits as
    the same weights stored as float32, for one and two inputs as for many."""
    for name in ("Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q6_K", "BF16"):
        rows, cols = SHAPES[name]
        matrix = random_matrix((name,), (rows,), cols, seed=4)
        dense = gguf_dense(matrix)
        as_f32 = StoredMatrix((StoredSegment(FORMATS["F32"], dense.view(torch.uint8).reshape(rows, -1)),), cols)
        x = torch.randn(7, cols)
        for n in (1, 2, 7):
            assert torch.equal(kernels().project(matrix, x[:n].contiguous()),
                               kernels().project(as_f32, x[:n].contiguous())), (name, n)


def test_segments_in_different_formats_make_one_matrix():
    """A fused QKV stored as Q4_K, Q4_K, Q6_K (as llama.cpp's Q4_K_M files do) and a 16-bit one."""
    for formats, rows, cols in ((("Q4_K", "Q4_K", "Q6_K"), (9, 5, 5), 256), (("F16", "BF16", "F32"), (3, 6, 2), 45)):
        matrix = random_matrix(formats, rows, cols, seed=5)
        assert matrix.rows == sum(rows)
        x = torch.randn(64, cols)
        bias = torch.randn(matrix.rows)
        for n in (1, 2, 3, 64):
            assert_matches(kernels().project(matrix, x[:n].contiguous(), bias), reference(x[:n], matrix, bias),
                           x[:n], matrix)
        assert torch.equal(unpack_rows(matrix, 0, matrix.rows), gguf_dense(matrix))


@pytest.mark.parametrize("name", ["Q4_1", "Q8_0", "Q4_K", "Q6_K", "BF16"])
def test_prefill_gemm(name):
    """Past 64 rows stored_linear takes the blocked GEMM: row counts that leave partial row
    panels and weight row counts that leave partial tiles."""
    rows, cols = SHAPES[name]
    for formats, seg_rows in (((name,), (rows,)), ((name, "Q8_0" if name != "BF16" else "F16"), (rows, 32))):
        matrix = random_matrix(formats, seg_rows, cols, seed=6)
        x = torch.randn(203, cols)
        bias = torch.randn(matrix.rows)
        for t in (65, 203):
            assert_matches(stored_linear(x[:t], matrix, bias), reference(x[:t], matrix, bias), x[:t], matrix)


def test_without_the_kernels_the_reference_path_gives_the_same(monkeypatch):
    import engine.native.stored_ops as stored_ops

    matrix = random_matrix(("Q4_K", "Q6_K"), (30, 7), 256, seed=7)
    x = torch.randn(80, 256)
    native = [stored_linear(x[:n], matrix, None) for n in (1, 80)]
    monkeypatch.setattr(stored_ops, "kernels", lambda: None)
    assert torch.equal(unpack_rows(matrix, 0, matrix.rows), gguf_dense(matrix))
    for n, want in zip((1, 80), native):
        torch.testing.assert_close(stored_linear(x[:n], matrix, None), want, rtol=1e-5, atol=1e-5)


def test_rows_that_are_not_whole_blocks_are_refused():
    with pytest.raises(ValueError, match="not a whole number of Q4_K blocks of 256"):
        FORMATS["Q4_K"].row_bytes(300)
    with pytest.raises(ValueError, match=r"must be \(rows, 20\) uint8"):
        StoredMatrix((StoredSegment(FORMATS["Q4_1"], torch.zeros(4, 18, dtype=torch.uint8)),), 32)
    with pytest.raises(ValueError, match="contiguous float32 CPU tensor of shape"):
        kernels().project(random_matrix(("Q8_0",), (4,), 64), torch.randn(2, 32))


@pytest.mark.parametrize("name,offset", [("Q4_1", 2), ("Q6_K", 208), ("Q8_0", 0)])
def test_a_block_with_a_non_finite_scale_is_refused(name, offset):
    fmt = FORMATS[name]
    data = random_rows(fmt, 3, 2 * fmt.block, np.random.default_rng(8))
    check_blocks("ok", fmt, data)
    data[2, fmt.block_bytes + offset:fmt.block_bytes + offset + 2] = torch.tensor([0x00, 0x7C], dtype=torch.uint8)  # +inf
    with pytest.raises(ValueError, match=f"blk.0: {name} block 1 of row 2 has a non-finite scale"):
        check_blocks("blk.0", fmt, data)


@pytest.mark.skipif(not {"avx512f", "avx512bw", "avx512dq"} <= set(_cpu_flags().split()),
                    reason="no AVX-512 here: the tests above ran the AVX2 kernels")
def test_the_avx2_kernels_on_a_cpu_with_avx512():
    """The tests above ran the AVX-512 unpacking; the same tests, built without it."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not avx2_kernels"],
        env={**os.environ, EXTRA_FLAGS_VAR: "-mno-avx512f"}, cwd=Path(__file__).parent.parent,
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " skipped" not in done.stdout
