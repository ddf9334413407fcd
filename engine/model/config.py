"""The architecture of a Llama-family model, read from an HF `config.json` (or built from GGUF
metadata by the loader). Frozen: one model, one shape, shared by the model, the KV cache sizing
and the KV-layout handshake between prefill and decode workers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# model_type values whose checkpoints share the Llama block (RMSNorm, rotary attention, SwiGLU).
# SmolLM/SmolLM2 checkpoints declare model_type "llama"; "smollm*" is accepted for hand-written
# configs that name the family instead.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_SUPPORTED_PREFIXES = ("smollm",)

# rope_scaling types this engine implements; anything else would silently change positions.
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class ModelArchConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    # Qwen3 (and some Mistral variants) set head_dim explicitly and it need not equal
    # hidden_size / num_heads; everyone else derives it.
    head_dim: int
    # 1e-6 is the value Llama 2, Mistral and Qwen ship; Llama 3 / SmolLM use 1e-5 and say so.
    rms_norm_eps: float = 1e-6
    # 10000 is the original RoPE base and HF's default when a config omits it.
    rope_theta: float = 10000.0
    # None for plain RoPE; for "llama3": factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings (the frequency-dependent stretch of Llama 3.1+).
    rope_scaling: dict[str, Any] | None = None
    # 2048 is HF LlamaConfig's default; it sizes the rope cache and bounds max_model_len.
    max_position_embeddings: int = 2048
    # Small models (SmolLM2, Qwen 0.5B, Llama 3.2 1B) reuse the embedding as the LM head.
    tie_word_embeddings: bool = False
    # Q/K/V projections with bias: Qwen2 always, others only when the config says so.
    attention_bias: bool = False
    # Qwen3 applies a per-head RMSNorm to q and k before rope.
    qk_norm: bool = False
    bos_token_id: int | None = None
    # HF allows an int or a list (Llama 3 instruct lists <|eot_id|> and <|end_of_text|>).
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {self.head_dim}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> "ModelArchConfig":
        """Build from the dict of an HF config.json (transformers 4.x or 5.x spelling)."""
        model_type = str(d.get("model_type", ""))
        if model_type not in SUPPORTED_MODEL_TYPES and not model_type.startswith(_SUPPORTED_PREFIXES):
            raise ValueError(
                f"unsupported model_type {model_type!r}; this engine runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} and SmolLM checkpoints"
            )
        hidden = int(d["hidden_size"])
        num_heads = int(d["num_attention_heads"])
        head_dim = d.get("head_dim") or hidden // num_heads
        rope_theta, rope_scaling = _read_rope(d)
        return cls(
            model_type=model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=num_heads,
            # Absent means multi-head attention (one KV head per query head).
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(d.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_as_id_tuple(d.get("eos_token_id")),
        )


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _read_rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling or None) from either spelling.

    transformers 5.x writes `rope_parameters: {rope_type, rope_theta, ...}`; 4.x writes a top-level
    `rope_theta` and a `rope_scaling` dict whose type key is `rope_type` or, older, `type`.
    """
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope scaling {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return float(theta), None
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = rope_type
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if key not in scaling:
            raise ValueError(f"llama3 rope scaling needs {key!r}, got {sorted(scaling)}")
    return float(theta), scaling
