"""Tiny random-weight HF checkpoints (and a one-request ForwardContext) for tests.

`write_tiny_checkpoint` writes a complete HF model directory: config.json, safetensors weights
saved by transformers itself, and a byte-level BPE tokenizer with a chat template, so loaders,
tokenizers and the model can all be checked against transformers on the same files.
"""
from __future__ import annotations

import os

import torch

from engine.attention.base import AttentionMetadata, ForwardContext
from engine.attention.torch_backend import TorchAttentionBackend
from engine.model.config import ModelArchConfig

TINY_ARCHS = ("llama3", "mistral", "qwen2", "qwen3", "llama_tied", "llama_odd")
# Not in TINY_ARCHS: a still small, slower Llama with a long context, for cluster tests that
# need streams to run for seconds.
LONG_ARCH = "llama_long"
VOCAB_SIZE = 512
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)


def _hf_config(arch: str):
    import transformers as tf

    if arch == "llama3":
        rope = {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
        }
        return tf.LlamaConfig(**_COMMON, rope_parameters=rope, tie_word_embeddings=False)
    if arch == "llama_tied":
        # Multi-query attention too: one KV head shared by all four query heads.
        return tf.LlamaConfig(**{**_COMMON, "num_key_value_heads": 1}, tie_word_embeddings=True)
    if arch == "llama_odd":
        # Sizes that are not multiples of 8 (nor the intermediate size of 4): the native step's
        # padded weight layout and its partial blocks.
        odd = {**_COMMON, "hidden_size": 60, "intermediate_size": 90, "num_attention_heads": 3,
               "num_key_value_heads": 1}
        return tf.LlamaConfig(**odd, tie_word_embeddings=True)
    if arch == LONG_ARCH:
        long = {**_COMMON, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
                "max_position_embeddings": 8192}
        return tf.LlamaConfig(**long, tie_word_embeddings=True)
    if arch == "mistral":
        return tf.MistralConfig(**_COMMON, sliding_window=None, tie_word_embeddings=False)
    if arch == "qwen2":
        return tf.Qwen2Config(**_COMMON, tie_word_embeddings=False)
    if arch == "qwen3":
        # head_dim deliberately differs from hidden / heads (64 / 4 = 16).
        return tf.Qwen3Config(**_COMMON, head_dim=32, tie_word_embeddings=True)
    raise ValueError(f"unknown tiny arch {arch!r}; choose from {TINY_ARCHS}")


def _training_text() -> list[str]:
    words = (
        "the quick brown fox jumps over a lazy dog while seven wizards quietly box "
        "jackdaws and liquor jugs; prefill is compute bound, decode is bandwidth bound. "
        "Hello world! How are you today? 0123456789 tokens, blocks, caches and heads."
    ).split()
    lines = []
    for i in range(200):
        lines.append(" ".join(words[(i * 7 + j) % len(words)] for j in range(12)))
    return lines


def _write_tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def write_tiny_checkpoint(path: str, arch: str, sharded: bool = False, seed: int = 0) -> str:
    """Write a tiny random HF model dir for `arch` (see TINY_ARCHS) into `path`; returns `path`.

    sharded=True splits the weights over several safetensors files with an index.
    """
    from transformers import AutoModelForCausalLM

    config = _hf_config(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves norms at 1 and biases at 0; perturb every tensor so that a weight put
    # in the wrong place (or a missing norm / bias) changes the logits.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="100KB" if sharded else "5GB")
    _write_tokenizer(path)
    return path


def single_sequence_context(
    config: ModelArchConfig, num_tokens: int, block_size: int = 16, dtype: torch.dtype = torch.float32
) -> ForwardContext:
    """One request prefilling `num_tokens` tokens into a fresh cache, blocks 0..n-1 in order."""
    num_blocks = -(-num_tokens // block_size) + 1
    kv_caches = [
        torch.zeros(num_blocks, 2, block_size, config.num_kv_heads, config.head_dim, dtype=dtype)
        for _ in range(config.num_layers)
    ]
    table = list(range(num_blocks))
    metadata = AttentionMetadata(
        num_reqs=1,
        num_tokens=num_tokens,
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32),
        query_start_loc_cpu=[0, num_tokens],
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32),
        seq_lens_cpu=[num_tokens],
        block_table=torch.tensor([table], dtype=torch.int32),
        slot_mapping=torch.arange(num_tokens, dtype=torch.int64),
        max_query_len=num_tokens,
        max_seq_len=num_tokens,
    )
    return ForwardContext(metadata, kv_caches, TorchAttentionBackend())
