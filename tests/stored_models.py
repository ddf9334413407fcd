"""Random weights in every stored format, and tiny GGUF checkpoints made of them.

`random_rows` writes valid blocks of a format from its definition: random quants, and scales
picked so that the weights come out zero-mean with a spread near 0.05, as trained weights have
(random scale bytes would give weights of any size, or NaN). `write_format_gguf` writes a tiny
llama-architecture GGUF whose every matrix is in one format (or a mix, as llama.cpp's K-quant
files have), with a byte-level BPE tokenizer in its metadata, so the whole engine loads it.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from engine.model.stored import FORMATS, StoredFormat, StoredMatrix, StoredSegment

# Matrices of the tiny GGUF models: rows of 256 and 512 weights, whole blocks of every format.
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, LAYERS, VOCAB = 256, 512, 4, 2, 2, 512


def _halves(values: np.ndarray) -> np.ndarray:
    """float values -> their float16 bytes, (..., 2)."""
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape, 2)


def _kquant_scale_bytes(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per block -> the 12 bytes that hold them (Q4_K / Q5_K)."""
    out = np.zeros((*scales.shape[:-1], 12), dtype=np.uint8)
    for j in range(4):
        out[..., j] = (scales[..., j] & 63) | ((scales[..., j + 4] >> 4) << 6)
        out[..., j + 4] = (mins[..., j] & 63) | ((mins[..., j + 4] >> 4) << 6)
        out[..., j + 8] = (scales[..., j + 4] & 15) | ((mins[..., j + 4] & 15) << 4)
    return out


def random_rows(fmt: StoredFormat, rows: int, cols: int, rng: np.random.Generator) -> torch.Tensor:
    """(rows, row_bytes) uint8: random weights of spread ~0.05 in `fmt`."""
    if fmt.block == 1:
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[fmt.name]
        dense = torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32) * 0.05)
        return dense.to(dtype).view(torch.uint8).reshape(rows, -1).contiguous()
    n = rows * cols // fmt.block
    blocks = rng.integers(0, 256, size=(n, fmt.block_bytes), dtype=np.uint8)
    if fmt.name == "Q4_0":  # d * (q - 8), q - 8 in [-8, 7]
        blocks[:, 0:2] = _halves(rng.uniform(0.008, 0.012, n))
    elif fmt.name == "Q8_0":  # q * d, q in [-128, 127]
        blocks[:, 0:2] = _halves(rng.uniform(0.0005, 0.0009, n))
    elif fmt.name == "Q4_1":  # d * q + m, q in [0, 15]
        d = rng.uniform(0.008, 0.012, n)
        blocks[:, 0:2], blocks[:, 2:4] = _halves(d), _halves(-7.5 * d)
    elif fmt.name in ("Q4_K", "Q5_K"):  # (d * scale) * q - dmin * min, q in [0, 15] or [0, 31]
        mid = 7.5 if fmt.name == "Q4_K" else 15.5
        scales = rng.integers(8, 64, size=(n, 8))
        mins = np.minimum(63, np.round(scales * mid / 16)).astype(np.int64)  # dmin = 16 d: zero mean
        d = rng.uniform(0.7, 1.3, n) * 0.1 / (mid * 36)
        blocks[:, 0:2], blocks[:, 2:4] = _halves(d), _halves(16 * d)
        blocks[:, 4:16] = _kquant_scale_bytes(scales, mins)
    elif fmt.name == "Q6_K":  # (d * scale) * (q - 32), scale int8
        scales = rng.integers(-64, 64, size=(n, 16)).astype(np.int8)
        blocks[:, 192:208] = scales.view(np.uint8)
        blocks[:, 208:210] = _halves(rng.uniform(0.7, 1.3, n) * 0.1 / (18 * 32))
    return torch.from_numpy(blocks.reshape(rows, -1))


def random_matrix(formats: tuple[str, ...], rows: tuple[int, ...], cols: int, seed: int = 0) -> StoredMatrix:
    rng = np.random.default_rng(seed)
    return StoredMatrix(tuple(StoredSegment(FORMATS[f], random_rows(FORMATS[f], r, cols, rng))
                              for f, r in zip(formats, rows)), cols)


def _tokenizer_fields(writer) -> None:
    """The tiny byte-level BPE tokenizer of tests.tiny_models, as GGUF metadata."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tests.tiny_models import SPECIAL_TOKENS, _training_text

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_training_text(), trainer)
    state = json.loads(backend.to_str())
    tokens = [t for t, _ in sorted(state["model"]["vocab"].items(), key=lambda item: item[1])]
    tokens += [f"<unused{i}>" for i in range(VOCAB - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]])
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


# Per tensor role, the format of a "mixed" file: as llama.cpp's Q4_K_M mixes them.
MIXED = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K", "ffn_gate": "Q5_K",
         "ffn_up": "Q4_K", "ffn_down": "Q6_K", "token_embd": "Q8_0", "output": "Q6_K"}


def write_format_gguf(path: str, fmt: str, seed: int = 0, tied: bool = True) -> str:
    """A tiny random llama GGUF with every matrix in `fmt` ("mixed": per MIXED, untied head)."""
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, arch="llama")
    for add, value in ((writer.add_block_count, LAYERS), (writer.add_context_length, 256),
                       (writer.add_embedding_length, HIDDEN), (writer.add_feed_forward_length, INTERMEDIATE),
                       (writer.add_head_count, HEADS), (writer.add_head_count_kv, KV_HEADS),
                       (writer.add_vocab_size, VOCAB)):
        add(value)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    _tokenizer_fields(writer)
    head_dim = HIDDEN // HEADS
    shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (KV_HEADS * head_dim, HIDDEN),
              "attn_v": (KV_HEADS * head_dim, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
              "ffn_gate": (INTERMEDIATE, HIDDEN), "ffn_up": (INTERMEDIATE, HIDDEN), "ffn_down": (HIDDEN, INTERMEDIATE)}

    def add_matrix(name: str, role: str, rows: int, cols: int) -> None:
        chosen = FORMATS[MIXED[role] if fmt == "mixed" else fmt]
        raw = random_rows(chosen, rows, cols, rng).numpy()
        qtype = gguf.GGMLQuantizationType[chosen.name]
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)

    def add_norm(name: str) -> None:
        writer.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))

    add_matrix("token_embd.weight", "token_embd", VOCAB, HIDDEN)
    for layer in range(LAYERS):
        add_norm(f"blk.{layer}.attn_norm.weight")
        add_norm(f"blk.{layer}.ffn_norm.weight")
        for role, (rows, cols) in shapes.items():
            add_matrix(f"blk.{layer}.{role}.weight", role, rows, cols)
    add_norm("output_norm.weight")
    if fmt == "mixed" or not tied:
        add_matrix("output.weight", "output", VOCAB, HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
