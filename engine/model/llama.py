"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2) as a plain nn.Module.

Tokens of all scheduled requests arrive flat, (T,), with their absolute positions; attention is
delegated to `ctx.attention`, which writes K/V into the paged cache and attends over each
request's context. Q/K/V and gate/up projections are fused into one matmul each, because batch-1
decode is bound by reading weights and by per-op overhead, not by FLOPs.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention.base import ForwardContext
from engine.model.config import ModelArchConfig
from engine.model.ops import TORCH_OPS, TorchOps
from engine.model.rope import RotaryEmbedding
from engine.model.stored import StoredEmbedding, StoredLinear, StoredMatrix, stored_linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One fused op; the same arithmetic as below, where both casts are no-ops.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in float32 as HF does, so bf16 models match the reference.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return normed * self.weight


# At this many rows and more, a oneDNN matmul over a pre-packed weight beats BLAS on the plain
# one (about 2x at 4-32 rows, on par at prefill sizes: BLAS re-packs the weight on every call).
# Below it, with one intra-op thread, BLAS's matrix-vector path on a column-major weight streams
# fastest; with more threads oneDNN's splits the work better and wins again (measured on
# AVX-512 with MKL and oneDNN as shipped with torch).
_PACKED_MIN_ROWS = 3


def pack_weight_for_cpu(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of an (out, in) fp32 weight, or None where oneDNN cannot pack it."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 32)
    except (RuntimeError, AttributeError):
        return None


def packed_linear(
    x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (T, in) @ weight.T (+ bias) -> (T, out), through the packed copy when it pays."""
    if packed is not None and (x.shape[0] >= _PACKED_MIN_ROWS or torch.get_num_threads() > 1):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear that, once `pack()` ran, uses a packed copy of its weight for larger batches."""

    packed: torch.Tensor | None = None

    def pack(self) -> None:
        self.packed = pack_weight_for_cpu(self.weight.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.weight, self.packed, self.bias)


class VocabEmbedding(nn.Module):
    """Token embedding without nn.Embedding's random init: every weight comes from a checkpoint,
    and initialising 50k x hidden values (even on the meta device) costs seconds at load."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)  # (T,) -> (T, hidden)


class Attention(nn.Module):
    def __init__(self, config: ModelArchConfig, layer_idx: int, rope: RotaryEmbedding):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.rope = rope
        qkv_out = config.q_size + 2 * config.kv_size
        # Rows [0, q_size) are Q, then K, then V: the order load_weights fills them in.
        self.qkv_proj = Linear(config.hidden_size, qkv_out, bias=config.attention_bias)
        self.o_proj = Linear(config.q_size, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x).view(num_tokens, -1, self.head_dim)  # (T, heads + 2*kv_heads, hd)
        split = (self.num_heads, self.num_kv_heads, self.num_kv_heads)
        q, k, v = qkv.split(split, dim=1)  # (T, heads, hd), (T, kv_heads, hd), (T, kv_heads, hd)
        ops = ctx.ops or TORCH_OPS
        if self.q_norm is not None:
            q = ops.rope(self.q_norm(q), positions, self.rope)
            k = ops.rope(self.k_norm(k), positions, self.rope)
        else:
            # Q and K are adjacent in qkv: rotate both with one call.
            qk = ops.rope(qkv[:, : self.num_heads + self.num_kv_heads], positions, self.rope)
            q, k = qk.split((self.num_heads, self.num_kv_heads), dim=1)
        out = ctx.attention(self.layer_idx, q, k, v, self.scale)  # (T, heads, hd)
        return self.o_proj(out.reshape(num_tokens, -1))  # (T, heads * hd) -> (T, hidden)


class MLP(nn.Module):
    def __init__(self, config: ModelArchConfig):
        super().__init__()
        # Rows [0, I) are the gate projection, [I, 2I) the up projection.
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ops: TorchOps = TORCH_OPS) -> torch.Tensor:
        return self.down_proj(ops.silu_mul(self.gate_up_proj(x)))  # (T, 2I) -> (T, I) -> (T, hidden)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelArchConfig, layer_idx: int, rope: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, rope)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx.ops or TORCH_OPS)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelArchConfig):
        super().__init__()
        self.config = config
        # One table shared by all layers; built lazily per device/dtype (see RotaryEmbedding).
        self.rope = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, self.rope) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        # The LM head's weight as compute_logits reads it (a StoredMatrix for stored weights); set
        # by load_weights (see _lay_out_for_device), None until the weights are loaded.
        self._head_weight: torch.Tensor | StoredMatrix | None = None
        self._head_packed: torch.Tensor | None = None

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """input_ids, positions: (T,) -> final-normed hidden states (T, hidden).

        The final norm is applied here so the caller can pick the rows it needs logits for
        (last token of each request) before the large vocabulary projection.
        """
        x = self.embed_tokens(input_ids)  # (T, hidden)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, ctx)
            if ctx.after_layer is not None:
                ctx.after_layer(i)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) float32."""
        weight = self._head_weight
        if isinstance(weight, StoredMatrix):
            return stored_linear(hidden.float(), weight, None)
        if weight is None:
            weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return packed_linear(hidden, weight, self._head_packed, None).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the (fused) parameters; every parameter must be covered."""
        params = dict(self.named_parameters())
        remaining = set(params)
        for hf_name, tensor in weights:
            target = self._map_hf_name(hf_name)
            if target is None:
                continue
            name, row_slice = target
            if name not in params:
                raise KeyError(f"checkpoint tensor {hf_name!r} has no place in this model ({name})")
            dest = params[name].data if row_slice is None else params[name].data[row_slice]
            if dest.shape != tensor.shape:
                raise ValueError(
                    f"{hf_name}: checkpoint shape {tuple(tensor.shape)} != expected {tuple(dest.shape)}"
                )
            with torch.no_grad():
                dest.copy_(tensor)
            remaining.discard(name)
        if remaining:
            raise ValueError(f"checkpoint is missing weights for: {sorted(remaining)[:8]}")
        self._lay_out_for_device()

    def _lay_out_for_device(self) -> None:
        """Points the LM head at its weight (the embedding's when tied). On the CPU, gives each
        float32 projection oneDNN's packed copy for batches of 3 rows and more (see
        packed_linear), beside the row-major weight that the native decode step streams. This
        trades memory (about twice the weights) for speed, and must run again if the weights
        change. Stored weights (engine.model.stored) need no second copy: their kernels unpack
        tiles as they go. On CUDA, nothing changes."""
        head_module = self.embed_tokens if self.lm_head is None else self.lm_head
        if isinstance(head_module, (StoredLinear, StoredEmbedding)):
            self._head_weight = head_module.stored
            return
        head = self._head_weight = head_module.weight.detach()  # a plain tensor: a Parameter would register
        if head.device.type != "cpu":
            return
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, Linear):
                    module.pack()
            self._head_packed = self.lm_head.packed if self.lm_head is not None else pack_weight_for_cpu(head)

    def use_column_major_weights(self) -> None:
        """For decode through torch ops on the CPU (no native step): each projection's weight
        becomes column-major, the same (out, in) shape and values with `in` as the slow axis,
        because BLAS streams such a weight about twice as fast as a row-major one for 1-2 rows.
        A tied LM head gets its own copy, as the embedding lookup keeps the row-major table."""
        if not isinstance(self._head_weight, torch.Tensor) or self._head_weight.device.type != "cpu":
            return
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    # In place, in the weight's own memory: the loader puts every parameter in one
                    # region (engine.memory), which a fresh copy would leave allocated beside it.
                    weight = module.weight.data
                    column_major = weight.as_strided(weight.shape, (1, weight.shape[0]))
                    column_major.copy_(weight.clone())
                    module.weight.data = column_major
            if self.lm_head is None:
                self._head_weight = self.embed_tokens.weight.t().contiguous().t()
            else:
                self._head_weight = self.lm_head.weight.detach()

    def _map_hf_name(self, hf_name: str) -> tuple[str, slice | None] | None:
        """HF parameter name -> (our parameter name, row slice within it) or None to skip."""
        if hf_name.endswith("rotary_emb.inv_freq"):
            return None  # recomputed from the config
        if hf_name == "lm_head.weight":
            # Some tied checkpoints still store a copy of the embedding; the tie wins.
            return None if self.lm_head is None else ("lm_head.weight", None)
        name = hf_name.removeprefix("model.")
        cfg = self.config
        q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
        fused = {
            "self_attn.q_proj.": ("self_attn.qkv_proj.", slice(0, q)),
            "self_attn.k_proj.": ("self_attn.qkv_proj.", slice(q, q + kv)),
            "self_attn.v_proj.": ("self_attn.qkv_proj.", slice(q + kv, q + 2 * kv)),
            "mlp.gate_proj.": ("mlp.gate_up_proj.", slice(0, inter)),
            "mlp.up_proj.": ("mlp.gate_up_proj.", slice(inter, 2 * inter)),
        }
        for part, (fused_part, rows) in fused.items():
            if part in name:
                return name.replace(part, fused_part), rows
        return name, None
