"""The native decode step (decode_step.c) bound to one loaded model and its KV cache.

`CpuDecodeStep.create(model, kv_cache)` gathers pointers to every weight once (float32, or a
stored format: engine.model.stored); each call then
runs one decode step (one new token for each of up to MAX_NATIVE_ROWS requests) in a single
native call and returns the logits with each row's argmax. The model's tensors are kept
referenced here, so the pointers stay valid for as long as this object lives.
"""
from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import NamedTuple

import torch

from engine.model.llama import LlamaForCausalLM
from engine.model.stored import StoredEmbedding, StoredLinear
from engine.native.build import NativeBuildError, load_library
from engine.native.stored_ops import Matrix, float_matrix_struct, matrix_struct

_f32p = ctypes.POINTER(ctypes.c_float)
_i32p = ctypes.POINTER(ctypes.c_int32)
_i64p = ctypes.POINTER(ctypes.c_int64)

# Decode steps of up to this many requests run natively. Measured on a 2-core AVX2 machine with
# the demo model, the native step beat torch ops (oneDNN matmuls, gathered-block attention) at
# every batch size up to 64, by 1.5-1.9x; beyond that oneDNN's blocked matmul may win on
# wider machines, and it is left to torch ops.
MAX_NATIVE_ROWS = 64


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _f32p), ("qkv", Matrix), ("qkv_bias", _f32p), ("q_norm", _f32p), ("k_norm", _f32p),
                ("o", Matrix), ("post_norm", _f32p), ("gate_up", Matrix), ("down", Matrix)]


class _Model(ctypes.Structure):
    _fields_ = [
        *[(name, ctypes.c_int32) for name in (
            "num_layers", "hidden", "num_heads", "num_kv_heads", "head_dim", "intermediate",
            "vocab", "block_size", "max_positions")],
        ("num_blocks", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("embed", Matrix), ("final_norm", _f32p), ("lm_head", Matrix), ("rope", _f32p),
        ("layers", ctypes.POINTER(_Layer)),
    ]


_ERRORS = {1: "a block id outside the KV cache",
           2: "a context length beyond its block table or the model's positions",
           3: "out of memory for the step's scratch buffers", 4: "a token id outside the vocabulary"}


def unsupported_reason(model: LlamaForCausalLM, kv_cache: torch.Tensor) -> str | None:
    """Why the native step cannot run this model and cache, or None when it can."""
    if kv_cache.device.type != "cpu":
        return f"it runs on the CPU, the KV cache is on {kv_cache.device}"
    if kv_cache.dtype != torch.float32 or not kv_cache.is_contiguous():
        return "it needs a contiguous float32 KV cache"
    bad = [name for name, p in model.named_parameters() if p.dtype != torch.float32]
    if bad:
        return f"it needs float32 weights ({bad[0]} is {model.get_parameter(bad[0]).dtype})"
    return None


class DecodeStepOutput(NamedTuple):
    logits: torch.Tensor  # (n, vocab) float32
    argmax: list[int]  # each row's first largest logit: the greedy token


class CpuDecodeStep:
    def __init__(self, library: ctypes.CDLL, struct: _Model, kv_cache: torch.Tensor, keep_alive: list,
                 weights: list[torch.Tensor], vocab: int) -> None:
        self.library = library
        self.struct = struct
        self.kv_cache = kv_cache  # (num_blocks, layers, 2, block_size, kv_heads, head_dim): the struct's bounds
        self._keep_alive = keep_alive  # every tensor and ctypes array the struct points into
        self.weights = weights  # what a step reads in full, in the order it reads them
        self.vocab = vocab

    @classmethod
    def create(cls, model: LlamaForCausalLM, kv_cache: torch.Tensor) -> "CpuDecodeStep":
        """Raises NativeBuildError when the kernels cannot be built or cannot run this model."""
        reason = unsupported_reason(model, kv_cache)
        if reason is not None:
            raise NativeBuildError(f"the native decode step cannot run here: {reason}")
        library = load_library()
        library.pd_decode_step.restype = ctypes.c_int
        library.pd_decode_step.argtypes = [ctypes.POINTER(_Model), ctypes.c_int, _i64p, _i32p, ctypes.c_int,
                                           _i32p, ctypes.c_void_p, ctypes.c_void_p, _i32p, ctypes.c_int]
        keep: list = []
        weights: list[torch.Tensor] = []

        def ptr(tensor: torch.Tensor | None):
            if tensor is None:
                return None
            tensor = tensor.detach().contiguous()  # a no-op for the model's norms and biases
            keep.append(tensor)
            return ctypes.cast(tensor.data_ptr(), _f32p)

        def matrix(module: torch.nn.Module, streamed: bool = True) -> Matrix:
            """A projection's weight as the kernels read it: stored as loaded, or float32 row-major."""
            if isinstance(module, (StoredLinear, StoredEmbedding)):
                tensors, struct = [s.data for s in module.stored.segments], matrix_struct(module.stored)
            else:
                tensors = [module.weight.detach().contiguous()]
                struct = float_matrix_struct(tensors[0])
            (weights if streamed else keep).extend(tensors)
            return struct

        cfg = model.config
        layers = (_Layer * cfg.num_layers)()
        for layer, module in zip(layers, model.layers):
            attn, mlp = module.self_attn, module.mlp
            layer.input_norm = ptr(module.input_layernorm.weight)
            layer.qkv = matrix(attn.qkv_proj)
            layer.qkv_bias = ptr(attn.qkv_proj.bias)
            layer.q_norm = ptr(attn.q_norm.weight if attn.q_norm is not None else None)
            layer.k_norm = ptr(attn.k_norm.weight if attn.k_norm is not None else None)
            layer.o = matrix(attn.o_proj)
            layer.post_norm = ptr(module.post_attention_layernorm.weight)
            layer.gate_up = matrix(mlp.gate_up_proj)
            layer.down = matrix(mlp.down_proj)
        keep.append(layers)
        rope = model.rope.table(torch.device("cpu"), torch.float32)  # (max_positions, 2, head_dim)
        final_norm = ptr(model.norm.weight)
        # One embedding row per request is read; a tied LM head streams the whole table.
        embed = matrix(model.embed_tokens, streamed=model.lm_head is None)
        lm_head = embed if model.lm_head is None else matrix(model.lm_head)
        struct = _Model(
            num_layers=cfg.num_layers, hidden=cfg.hidden_size, num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            intermediate=cfg.intermediate_size, vocab=cfg.vocab_size,
            block_size=kv_cache.shape[3], max_positions=rope.shape[0],
            num_blocks=kv_cache.shape[0], eps=cfg.rms_norm_eps,
            embed=embed, final_norm=final_norm, lm_head=lm_head, rope=ptr(rope),
            layers=layers,
        )
        return cls(library, struct, kv_cache, keep + weights, weights, cfg.vocab_size)

    def __call__(self, token_ids: Sequence[int], block_tables: Sequence[Sequence[int]], seq_lens: Sequence[int],
                 logits: torch.Tensor | None = None) -> DecodeStepOutput:
        """One new token for each of n requests: token_ids (n), their block tables, and seq_lens (n)
        with the new token included. Writes the new tokens' K/V into the KV cache and the logits
        into `logits` (a contiguous float32 (n, vocab) tensor, allocated when not given).

        Takes plain lists: a small model's step takes a few tens of milliseconds, and building
        tensors for its inputs would add a measurable share to it."""
        n = len(token_ids)
        if logits is None:
            logits = torch.empty((n, self.vocab), dtype=torch.float32)
        elif logits.shape != (n, self.vocab) or logits.dtype != torch.float32 or not logits.is_contiguous():
            raise ValueError(f"logits must be a contiguous float32 ({n}, {self.vocab}) tensor")
        if len(block_tables) != n or len(seq_lens) != n:
            raise ValueError(f"{n} token ids, but {len(block_tables)} block tables and {len(seq_lens)} lengths")
        max_blocks = max(map(len, block_tables))
        table = (ctypes.c_int32 * (n * max_blocks))()
        for i, blocks in enumerate(block_tables):  # rows padded with block 0, never read
            table[i * max_blocks:i * max_blocks + len(blocks)] = blocks
        argmax = (ctypes.c_int32 * n)()
        status = self.library.pd_decode_step(
            ctypes.byref(self.struct), n, (ctypes.c_int64 * n)(*token_ids), table, max_blocks,
            (ctypes.c_int32 * n)(*seq_lens), self.kv_cache.data_ptr(), logits.data_ptr(), argmax,
            torch.get_num_threads(),
        )
        if status != 0:
            raise RuntimeError(f"native decode step refused its inputs: {_ERRORS.get(status, status)}")
        return DecodeStepOutput(logits, list(argmax))


def stream_read(buffers: Sequence[torch.Tensor]) -> int:
    """Reads contiguous CPU tensors of any dtype front to back with the native step's streaming
    loads and thread split (the benchmark's bandwidth probe for the native path); returns a
    checksum of their 32-bit words."""
    for buffer in buffers:
        if not buffer.is_contiguous() or buffer.device.type != "cpu":
            raise ValueError("stream_read needs contiguous CPU tensors")
    library = load_library()
    library.pd_stream_read.restype = ctypes.c_uint64
    library.pd_stream_read.argtypes = [ctypes.POINTER(ctypes.c_void_p), _i64p, ctypes.c_int, ctypes.c_int]
    pointers = (ctypes.c_void_p * len(buffers))(*(b.data_ptr() for b in buffers))
    sizes = (ctypes.c_int64 * len(buffers))(*(b.numel() * b.element_size() for b in buffers))
    return library.pd_stream_read(pointers, sizes, len(buffers), torch.get_num_threads())
