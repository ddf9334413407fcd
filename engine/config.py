"""One frozen config dataclass per concern, gathered in EngineConfig.

Unknown options are an error: `EngineConfig.from_options` refuses keys it does not know.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CacheConfig:
    # 16 tokens per block: small enough that a half-used last block wastes little,
    # large enough that block tables stay short (vLLM and SGLang use the same default).
    block_size: int = 16
    # Explicit block count; None sizes the cache from kv_cache_memory_gb.
    num_blocks: int | None = None
    # KV budget when num_blocks is None. 1 GiB holds ~23k tokens of the demo model in fp32.
    kv_cache_memory_gb: float = 1.0
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be positive, got {self.kv_cache_memory_gb}")


@dataclass(frozen=True)
class SchedulerConfig:
    # Requests in the running batch at once.
    max_num_seqs: int = 64
    # Tokens computed in one step across all requests (prefill chunks plus decode tokens).
    # 512 keeps a CPU step short enough that decodes are not stalled by a long prompt.
    max_num_batched_tokens: int = 512
    # None: the model's max_position_embeddings.
    max_model_len: int | None = None
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")


@dataclass(frozen=True)
class EngineConfig:
    model: str = "demo"  # "demo", an HF model directory, or a .gguf file
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: cuda when available, else cpu
    attention_backend: str = "auto"  # auto | torch | flash_attn
    # auto | native | torch. Steps of one new token per request (up to 64) on the CPU run as one
    # compiled call (engine.native) when a C compiler is present; auto falls back to torch ops
    # without one, native makes that an error, torch never compiles anything.
    decode_kernel: str = "auto"
    # On the CPU with float32 activations, weights stay in their stored formats (GGUF blocks,
    # an HF directory's float16 / bfloat16) and are unpacked as they are used: a fraction of the
    # memory and of the bytes a decode step reads. True converts them to the model dtype at load
    # instead (float32 on the CPU: the same logits to float rounding, several times the memory).
    dequantize: bool = False
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @classmethod
    def from_options(cls, model: str = "demo", **options: Any) -> "EngineConfig":
        """Build from flat keyword options (`block_size=32, max_num_seqs=8, ...`)."""
        sections = {"cache": CacheConfig, "scheduler": SchedulerConfig}
        top = {f.name for f in dataclasses.fields(cls)} - set(sections)
        chosen: dict[str, dict[str, Any]] = {name: {} for name in sections}
        top_kwargs: dict[str, Any] = {}
        for key, value in options.items():
            if key in top:
                top_kwargs[key] = value
                continue
            owner = [s for s, c in sections.items() if key in {f.name for f in dataclasses.fields(c)}]
            if not owner:
                raise TypeError(f"unknown engine option {key!r}")
            chosen[owner[0]][key] = value
        return cls(
            model=model,
            cache=CacheConfig(**chosen["cache"]),
            scheduler=SchedulerConfig(**chosen["scheduler"]),
            **top_kwargs,
        )
