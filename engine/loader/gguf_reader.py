"""A lean reader of GGUF files (llama.cpp's format, versions 2 and 3): metadata as plain Python
values, tensors as numpy views of one read-only memory map.

The gguf package's GGUFReader keeps a numpy array per part of every metadata value: for a 50k
token vocabulary with its merges that is hundreds of thousands of small arrays, about 150 MB and
7 seconds for the demo model. This reader decodes each value once into a Python list, in a
fraction of the time and memory, and checks that every tensor lies inside the file (a truncated
file is refused, naming the tensor). It offers the part of GGUFReader's interface the engine
uses: `fields[key].contents()` and `tensors` (name, tensor_type, shape, n_bytes, data).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# Value types of GGUF metadata: id -> struct format (None: string, array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


@dataclass(frozen=True)
class Field:
    name: str
    value: Any  # a Python scalar, a str, or a list of them

    @property
    def data(self) -> Any:
        return self.value

    def contents(self) -> Any:
        return self.value


@dataclass(frozen=True)
class Tensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # fastest axis first, as GGUF lists it: (cols, rows) for a matrix
    n_bytes: int
    data: np.ndarray  # a view of the file: uint8 (rows, row_bytes) for block formats, else (rows, cols)


class _Cursor:
    def __init__(self, buffer: memoryview, path: str) -> None:
        self.buffer, self.path, self.offset = buffer, path, 0

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.offset + size > len(self.buffer):
            raise ValueError(f"{self.path}: the header runs past the end of the file")
        value = struct.unpack_from("<" + fmt, self.buffer, self.offset)
        self.offset += size
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        length = self.unpack("Q")
        if self.offset + length > len(self.buffer):
            raise ValueError(f"{self.path}: a string runs past the end of the file")
        text = bytes(self.buffer[self.offset:self.offset + length]).decode("utf-8", errors="replace")
        self.offset += length
        return text

    def value(self, value_type: int) -> Any:
        if value_type in _SCALARS:
            return self.unpack(_SCALARS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.unpack("I"), self.unpack("Q")
            if item_type in _NUMPY:  # numbers: one vectorised read
                dtype = np.dtype(_NUMPY[item_type]).newbyteorder("<")
                end = self.offset + count * dtype.itemsize
                if end > len(self.buffer):
                    raise ValueError(f"{self.path}: an array runs past the end of the file")
                items = np.frombuffer(self.buffer, dtype, count, self.offset).tolist()
                self.offset = end
                return items
            return [self.value(item_type) for _ in range(count)]
        raise ValueError(f"{self.path}: unknown GGUF value type {value_type}")


class LeanGGUFReader:
    def __init__(self, path: str) -> None:
        import gguf

        self.path = path
        self._map = np.memmap(path, dtype=np.uint8, mode="r")
        cursor = _Cursor(memoryview(self._map), path)
        if bytes(self._map[:4]) != GGUF_MAGIC:
            raise ValueError(f"{path}: no GGUF magic at the start of the file")
        cursor.offset = 4
        version, tensor_count, kv_count = cursor.unpack("I"), cursor.unpack("Q"), cursor.unpack("Q")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        self.fields: dict[str, Field] = {}
        for _ in range(kv_count):
            key = cursor.string()
            self.fields[key] = Field(key, cursor.value(cursor.unpack("I")))
        infos = []
        for _ in range(tensor_count):
            name = cursor.string()
            dims = tuple(cursor.unpack("Q") for _ in range(cursor.unpack("I")))
            infos.append((name, dims, cursor.unpack("I"), cursor.unpack("Q")))
        alignment = int(self.fields["general.alignment"].value) if "general.alignment" in self.fields else DEFAULT_ALIGNMENT
        self.data_offset = -(-cursor.offset // alignment) * alignment
        self.tensors = [self._tensor(gguf, *info) for info in infos]

    def _tensor(self, gguf: Any, name: str, dims: tuple[int, ...], type_id: int, offset: int) -> Tensor:
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
        except ValueError:
            raise ValueError(f"{self.path}: tensor {name} has unknown type id {type_id}") from None
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        rows = int(np.prod(dims[1:], dtype=np.int64))
        if dims[0] % block:
            raise ValueError(f"{self.path}: tensor {name} has rows of {dims[0]} weights, not whole "
                             f"{qtype.name} blocks of {block}")
        n_bytes = rows * dims[0] // block * block_bytes
        start = self.data_offset + offset
        if start + n_bytes > self._map.size:
            raise ValueError(f"{self.path}: tensor {name} ({n_bytes} bytes at {start}) runs past the end of the "
                             f"file ({self._map.size} bytes): the file is truncated")
        raw = self._map[start:start + n_bytes]
        if block == 1:  # float formats: elements of their own dtype
            dtype = {"F32": np.float32, "F16": np.float16, "F64": np.float64}.get(qtype.name)
            data = raw.view(dtype).reshape(rows, dims[0]) if dtype else raw.reshape(rows, -1)
        else:
            data = raw.reshape(rows, -1)
        if len(dims) == 1:
            data = data.reshape(-1)
        return Tensor(name, qtype, dims, n_bytes, data)
