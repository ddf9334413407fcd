"""Puts a stored checkpoint (engine.loader.stored_checkpoint) into the model: every projection
and the embedding become stored modules over the checkpoint's own bytes, the fused ones (QKV,
gate/up) as a matrix of row segments, so nothing is copied or converted again; the norms and
biases load as float32 parameters the usual way."""
from __future__ import annotations

import torch

from engine.loader.stored_checkpoint import StoredCheckpoint
from engine.memory import place_parameters_on_huge_pages
from engine.model.config import ModelArchConfig
from engine.model.llama import LlamaForCausalLM
from engine.model.stored import StoredEmbedding, StoredLinear, StoredMatrix


def _matrix(checkpoint: StoredCheckpoint, names: list[str], rows: list[int], cols: int) -> StoredMatrix:
    missing = [n for n in names if n not in checkpoint.segments]
    if missing:
        raise ValueError(f"checkpoint is missing weights for: {missing}")
    segments = tuple(checkpoint.segments.pop(n) for n in names)
    for name, segment, expected in zip(names, segments, rows):
        if segment.rows != expected:
            raise ValueError(f"{name}: checkpoint shape ({segment.rows}, ...) != expected ({expected}, {cols})")
    return StoredMatrix(segments, cols)


def build_stored_model(config: ModelArchConfig, checkpoint: StoredCheckpoint) -> LlamaForCausalLM:
    """The model over a stored checkpoint, eval mode, no grads, on the CPU."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    hidden, inter = config.hidden_size, config.intermediate_size
    q, kv = config.q_size, config.kv_size
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        qkv = _matrix(checkpoint, [prefix + f"self_attn.{p}_proj.weight" for p in "qkv"], [q, kv, kv], hidden)
        attn.qkv_proj = StoredLinear(qkv, bias=config.attention_bias)
        attn.o_proj = StoredLinear(_matrix(checkpoint, [prefix + "self_attn.o_proj.weight"], [hidden], q), False)
        gate_up = _matrix(checkpoint, [prefix + f"mlp.{p}_proj.weight" for p in ("gate", "up")], [inter, inter], hidden)
        mlp.gate_up_proj = StoredLinear(gate_up, False)
        mlp.down_proj = StoredLinear(_matrix(checkpoint, [prefix + "mlp.down_proj.weight"], [hidden], inter), False)
    vocab = config.vocab_size
    model.embed_tokens = StoredEmbedding(_matrix(checkpoint, ["model.embed_tokens.weight"], [vocab], hidden))
    if model.lm_head is not None:
        model.lm_head = StoredLinear(_matrix(checkpoint, ["lm_head.weight"], [vocab], hidden), False)
    checkpoint.segments.pop("lm_head.weight", None)  # a tied checkpoint's copy of the embedding
    if checkpoint.segments:
        raise KeyError(f"checkpoint tensors with no place in this model: {sorted(checkpoint.segments)[:8]}")
    model = model.to_empty(device="cpu")  # the norms and biases: storage only, filled below
    place_parameters_on_huge_pages(model)
    model.load_weights(checkpoint.floats.items())
    model.requires_grad_(False)
    return model.eval()
