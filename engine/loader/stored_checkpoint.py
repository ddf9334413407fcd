"""Checkpoints read with their weights in the formats they are stored in, for CPU inference with
float32 activations (the default there): a GGUF file's block formats as they are in the file, an
HF directory's float16 / bfloat16 tensors as they are.

Every 2-D weight is copied once, byte for byte, into one region on huge pages (engine.memory),
in its rows' HF order (llama.cpp's Q/K row order is undone by moving whole rows, which holds
their blocks). Nothing is dequantized to float32 but the 1-D norms and biases. Every block's
scales are checked on the way in: a damaged or truncated file is refused, naming the tensor.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.loader.gguf_file import hf_name, permuted_heads, unpermute_rope_rows
from engine.memory import huge_page_bytes
from engine.model.config import ModelArchConfig
from engine.model.stored import FORMATS, TORCH_FORMATS, StoredFormat, StoredSegment

_ALIGN = 64  # each tensor starts on its own cache line

# Byte offsets of each block's float16 scales: a block whose scale is inf or NaN is damage.
_SCALE_OFFSETS = {"Q4_0": (0,), "Q8_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


@dataclass(frozen=True)
class StoredCheckpoint:
    segments: dict[str, StoredSegment]  # HF name -> a 2-D weight in its stored format, HF row order
    floats: dict[str, torch.Tensor]  # HF name -> a 1-D tensor (norm, bias) in float32
    nbytes: int  # bytes of the region that holds every segment


@dataclass(frozen=True)
class _Planned:
    name: str  # HF name
    format: StoredFormat
    rows: int
    cols: int
    source: Any  # what _copy_into reads the bytes from


def _pack(planned: list[_Planned], fill) -> dict[str, StoredSegment]:
    """One huge-page region for every planned weight; fill(plan, dest uint8 (rows, row_bytes))."""
    offsets, total = [], 0
    for p in planned:
        offsets.append(total)
        total += -(-p.rows * p.format.row_bytes(p.cols) // _ALIGN) * _ALIGN
    region = huge_page_bytes(max(total, 1))
    segments = {}
    for p, offset in zip(planned, offsets):
        row_bytes = p.format.row_bytes(p.cols)
        dest = region[offset:offset + p.rows * row_bytes].view(p.rows, row_bytes)
        fill(p, dest)
        check_blocks(p.name, p.format, dest)
        segments[p.name] = StoredSegment(p.format, dest)
    return segments


def check_blocks(name: str, fmt: StoredFormat, data: torch.Tensor) -> None:
    """Refuses a weight with a block whose scale is not a finite number."""
    offsets = _SCALE_OFFSETS.get(fmt.name)
    if not offsets:
        return
    blocks = data.numpy().reshape(-1, fmt.block_bytes)
    for offset in offsets:
        scales = np.ascontiguousarray(blocks[:, offset:offset + 2]).view(np.float16)[:, 0]
        bad = np.flatnonzero(~np.isfinite(scales))
        if bad.size:
            per_row = blocks.shape[0] // data.shape[0]
            row, block = divmod(int(bad[0]), per_row)
            raise ValueError(f"{name}: {fmt.name} block {block} of row {row} has a non-finite scale "
                             f"({scales[bad[0]]}); the file is damaged")


# --- GGUF -------------------------------------------------------------------------------------

def _gguf_format(tensor: Any) -> StoredFormat:
    name = tensor.tensor_type.name
    if name not in FORMATS:
        raise ValueError(f"{tensor.name} is stored as {name}, which the CPU kernels do not read as stored "
                         f"(they read {', '.join(FORMATS)}); load it with dequantize=True (--dequantize)")
    return FORMATS[name]


def _gguf_bytes(tensor: Any, fmt: StoredFormat, rows: int, cols: int) -> np.ndarray:
    """The tensor's bytes as (rows, row_bytes) uint8, refusing a size that does not add up."""
    data = np.asarray(tensor.data)
    expected = rows * fmt.row_bytes(cols)
    if data.nbytes != expected or int(tensor.n_bytes) != expected:
        raise ValueError(f"{tensor.name}: {data.nbytes} bytes in the file for a {fmt.name} ({rows}, {cols}) "
                         f"tensor of {expected} bytes; the file is truncated or damaged")
    return data.reshape(-1).view(np.uint8).reshape(rows, -1)


def read_gguf_stored(reader: Any, config: ModelArchConfig) -> StoredCheckpoint:
    """Every tensor of an open GGUF file under its HF name: 2-D ones as stored, 1-D as float32."""
    import gguf

    planned, floats = [], {}
    for tensor in reader.tensors:
        shape = [int(d) for d in tensor.shape]  # GGUF lists the fastest axis first: (cols, rows)
        name = hf_name(tensor.name)
        if len(shape) == 1:
            floats[name] = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type),
                                                     dtype=np.float32).reshape(-1))
            continue
        fmt = _gguf_format(tensor)
        cols, rows = shape
        planned.append(_Planned(name, fmt, rows, cols, (tensor, permuted_heads(reader, config, tensor.name))))

    def fill(p: _Planned, dest: torch.Tensor) -> None:
        tensor, heads = p.source
        data = _gguf_bytes(tensor, p.format, p.rows, p.cols)
        if heads is not None:
            data = unpermute_rope_rows(data, heads)  # whole rows move: their blocks stay intact
        dest.numpy()[...] = data

    planned.sort(key=lambda p: _use_order(p.name))
    segments = _pack(planned, fill)
    return StoredCheckpoint(segments, floats, sum(s.data.numel() for s in segments.values()))


_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")
_PART_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _use_order(name: str) -> tuple[int, int]:
    """Where a decode step reads the weight: the embedding, then layer by layer, then the head."""
    match = _LAYER_NAME.match(name)
    if match is None:
        return (-1, 0) if "embed" in name else (1 << 30, 0)
    part = next((k for k, p in enumerate(_PART_ORDER) if f".{p}." in name), len(_PART_ORDER))
    return int(match.group(1)), part


# --- HF directories ---------------------------------------------------------------------------

def hf_dir_is_half(files: list[str]) -> bool:
    """Whether an HF checkpoint stores any 2-D weight as float16 or bfloat16."""
    from safetensors import safe_open

    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                if len(piece.get_shape()) == 2 and piece.get_dtype() in ("F16", "BF16"):
                    return True
    return False


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_hf_stored(files: list[str]) -> StoredCheckpoint:
    """An HF checkpoint with its 2-D float16 / bfloat16 / float32 weights as stored."""
    from safetensors import safe_open

    planned, floats = [], {}
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                shape, dtype = piece.get_shape(), piece.get_dtype()
                if len(shape) != 2:
                    floats[name] = f.get_tensor(name).float().reshape(-1)
                    continue
                if dtype not in _SAFETENSORS_DTYPES:
                    raise ValueError(f"{name} is stored as {dtype}; the CPU kernels read F32, F16 and BF16")
                fmt = TORCH_FORMATS[_SAFETENSORS_DTYPES[dtype]]
                planned.append(_Planned(name, fmt, shape[0], shape[1], (file, name)))

    def fill(p: _Planned, dest: torch.Tensor) -> None:
        file, name = p.source
        with safe_open(file, framework="pt", device="cpu") as f:
            dest.copy_(f.get_tensor(name).contiguous().view(torch.uint8).view(p.rows, -1))

    planned.sort(key=lambda p: _use_order(p.name))
    segments = _pack(planned, fill)
    return StoredCheckpoint(segments, floats, sum(s.data.numel() for s in segments.values()))
