"""GGUF files (llama.cpp's format): architecture from the metadata, weights dequantized to float
and renamed/reshaped into HF's layout, so the model loads them like any HF checkpoint.

Dequantizing takes seconds, so the HF-layout float weights are cached as one safetensors file,
keyed by the GGUF file's absolute path, size and mtime (a changed file gets a new key).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from typing import Any, Iterator

import numpy as np
import torch

from engine.loader.hf_dir import iter_safetensors
from engine.model.config import ModelArchConfig

# GGUF architecture -> HF model_type. Mistral GGUFs are written with the "llama" architecture.
_ARCH_TO_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def open_gguf(path: str) -> Any:
    from engine.loader.gguf_reader import LeanGGUFReader

    try:
        return LeanGGUFReader(path)
    except Exception as exc:  # the reader raises assorted errors on a damaged file
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from exc


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_gguf_config(reader: Any) -> ModelArchConfig:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCH_TO_MODEL_TYPE:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {sorted(_ARCH_TO_MODEL_TYPE)}")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ValueError("GGUF files with per-frequency rope factors (rope_freqs) are not supported")
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    num_heads = int(_field(reader, f"{arch}.attention.head_count"))
    vocab = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelArchConfig(
        model_type=_ARCH_TO_MODEL_TYPE[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=num_heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // num_heads)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=None,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        # llama.cpp omits output.weight when the LM head is the embedding.
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def hf_name(gguf_name: str) -> str:
    """llama.cpp tensor name -> HF parameter name."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[stem]}.{suffix}"
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")
    layer, part, suffix = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order. For its interleaved rope, the converter reorders each
    head's rows from HF's (2, head_dim/2) halves to (head_dim/2, 2) pairs; swap them back."""
    rows = w.shape[0]
    per_head = w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])  # (heads, hd/2, 2, ...)
    return per_head.swapaxes(1, 2).reshape(w.shape)  # (heads, 2, hd/2, ...) -> (rows, ...)


def _float_array(tensor: Any) -> np.ndarray:
    """The tensor as a float array in its logical (rows, cols) shape; float types stay as stored."""
    import gguf

    if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.array(tensor.data)  # a copy: the reader's memmap is read-only
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)


def permuted_heads(reader: Any, config: ModelArchConfig, gguf_name: str) -> int | None:
    """The head count by which llama.cpp reordered this tensor's rows (Q and K of a llama-
    architecture file, see unpermute_rope_rows), or None when it is stored in HF's order."""
    # Only the llama architecture uses interleaved rope in llama.cpp; qwen2/3 are stored as in HF.
    if _field(reader, "general.architecture") != "llama":
        return None
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    heads_of = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}
    return None if match is None else heads_of.get(match.group(2))


def dequantize_to_hf(reader: Any, config: ModelArchConfig) -> dict[str, torch.Tensor]:
    """Every GGUF tensor, dequantized, under its HF name and in HF's row order."""
    weights: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        array = _float_array(tensor)
        heads = permuted_heads(reader, config, tensor.name)
        if heads is not None:
            array = unpermute_rope_rows(array, heads)
        weights[hf_name(tensor.name)] = torch.from_numpy(np.ascontiguousarray(array))
    return weights


def cache_path_for(gguf_path: str, cache_root: str) -> str:
    stat = os.stat(gguf_path)
    absolute = os.path.abspath(gguf_path)
    key = hashlib.sha256(f"{absolute}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    return os.path.join(cache_root, "gguf", f"{stem}-{key}.safetensors")


_CONFIG_KEY = "pdserve_arch_config"


def _save_atomically(weights: dict[str, torch.Tensor], config: ModelArchConfig, path: str) -> None:
    """The config rides in the file's metadata so a cache hit need not parse the GGUF at all
    (its tokenizer arrays make that take seconds)."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    try:
        save_file(weights, tmp, metadata={_CONFIG_KEY: json.dumps(dataclasses.asdict(config))})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # readers see either no file or the whole file
    except BaseException:
        os.unlink(tmp)
        raise


def load_gguf(path: str, cache_root: str) -> tuple[ModelArchConfig, Iterator[tuple[str, torch.Tensor]]]:
    """(config, HF-named weights) of a GGUF file, dequantizing only on a cache miss."""
    cached = cache_path_for(path, cache_root)
    if os.path.isfile(cached):
        return _cached_config(cached), iter_safetensors([cached])
    reader = open_gguf(path)
    config = read_gguf_config(reader)
    weights = dequantize_to_hf(reader, config)
    _save_atomically(weights, config, cached)
    return config, iter(weights.items())


def _cached_config(cached: str) -> ModelArchConfig:
    from safetensors import safe_open

    with safe_open(cached, framework="pt") as f:
        fields = json.loads(f.metadata()[_CONFIG_KEY])
    fields["eos_token_ids"] = tuple(fields["eos_token_ids"])
    return ModelArchConfig(**fields)
