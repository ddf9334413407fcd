"""The elementwise operations of engine.model.ops in native code (elementwise.c), for float32
CPU tensors: SwiGLU's gate and rotary embedding in one pass each. Anything else (another
dtype or device, an unusual memory layout) goes to the torch reference."""
from __future__ import annotations

import ctypes

import torch

from engine.model.ops import TorchOps
from engine.model.rope import RotaryEmbedding
from engine.native.cpu_decode import _f32p, _i64p


def _is_cpu_f32(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32


class NativeCpuOps(TorchOps):
    def __init__(self, library: ctypes.CDLL) -> None:
        self.library = library
        library.pd_silu_mul.restype = None
        library.pd_silu_mul.argtypes = [_f32p, ctypes.c_int64, ctypes.c_int, _f32p, ctypes.c_int]
        library.pd_rope.restype = None
        library.pd_rope.argtypes = [_f32p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                                    _i64p, _f32p, ctypes.c_int]

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if not (_is_cpu_f32(gate_up) and gate_up.dim() == 2 and gate_up.is_contiguous()):
            return super().silu_mul(gate_up)
        rows, width = gate_up.shape
        out = torch.empty((rows, width // 2), dtype=torch.float32)
        self.library.pd_silu_mul(ctypes.cast(gate_up.data_ptr(), _f32p), rows, width // 2,
                                 ctypes.cast(out.data_ptr(), _f32p), torch.get_num_threads())
        return out

    def rope(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
        """Rotates x (T, heads, head_dim) in place when its heads are contiguous rows."""
        rows, heads, head_dim = x.shape
        if not (_is_cpu_f32(x) and x.stride(2) == 1 and x.stride(1) == head_dim
                and positions.dtype == torch.int64 and positions.is_contiguous()
                and positions.device.type == "cpu"):
            return super().rope(x, positions, rope)
        table = rope.table(x.device, torch.float32)  # (max_positions, 2, head_dim)
        self.library.pd_rope(ctypes.cast(x.data_ptr(), _f32p), rows, x.stride(0), heads, head_dim,
                             ctypes.cast(positions.data_ptr(), _i64p), ctypes.cast(table.data_ptr(), _f32p),
                             torch.get_num_threads())
        return x
