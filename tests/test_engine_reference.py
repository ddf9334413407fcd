"""Greedy decoding is token-for-token identical to HF transformers on the same weights."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.model.stored import StoredEmbedding, StoredLinear
from tests.conftest import assert_no_leaked_blocks

DEMO_PROMPTS = [
    "The capital of France is",
    "Write a haiku about the ocean.",
    "def fibonacci(n):",
    "Explain why the sky is blue in one paragraph.",
    "List three prime numbers greater than 100:",
    "Once upon a time, in a small village by the sea,",
    "Translate to French: I would like a cup of coffee, please.",
    "What is 17 multiplied by 23?",
]


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("chat", [False, True], ids=["raw", "chat"])
def test_demo_greedy_matches_hf(demo_llm, hf_demo, chat):
    """With the weights as the GGUF stores them (Q4_1 and Q8_0 blocks, the default on the CPU),
    which HF dequantizes to float32 at load."""
    hf_model, hf_tokenizer = hf_demo
    model = demo_llm.engine.loaded.model
    assert isinstance(model.layers[0].mlp.down_proj, StoredLinear) and isinstance(model.embed_tokens, StoredEmbedding)
    assert model.layers[0].mlp.down_proj.stored.formats == ("Q4_1",) and model.embed_tokens.stored.formats == ("Q8_0",)
    assert demo_llm.engine.runner.native_decode is not None
    prompts = []
    for text in DEMO_PROMPTS:
        if chat:
            messages = [{"role": "user", "content": text}]
            ours = demo_llm.chat_prompt(messages)
            theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
        else:
            ours = demo_llm.tokenizer.encode(text)
            theirs = hf_tokenizer(text).input_ids
        assert ours == list(theirs), f"tokenization differs for {text!r}"
        prompts.append(ours)
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    outputs = demo_llm.generate(prompts, params)
    for prompt_ids, out in zip(prompts, outputs):
        assert out.token_ids == hf_greedy(hf_model, prompt_ids, 64)
        assert out.finish_reason == "length"
    assert_no_leaked_blocks(demo_llm)


@pytest.mark.parametrize("arch", ["llama3", "mistral", "qwen2", "qwen3"])
def test_tiny_checkpoint_greedy_matches_hf(tiny_checkpoints, arch):
    transformers = pytest.importorskip("transformers")
    path = tiny_checkpoints[arch]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(path, dtype="float32", device="cpu", block_size=4, max_num_batched_tokens=32)
    gen = torch.Generator().manual_seed(7)
    vocab = llm.engine.loaded.config.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (5, 17, 30)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        assert out.token_ids == hf_greedy(hf_model, prompt, 24), arch
    assert_no_leaked_blocks(llm)
