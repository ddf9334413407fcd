"""Models whose weights stay in their stored formats against the float32 path on the same files.

Tiny random GGUF checkpoints, one per format the CPU kernels read (and one mixing them as
llama.cpp's K-quant files do), run through the engine twice: as stored (the default) and
dequantized to float32 at load (dequantize=True, today's float32 path). Greedy tokens must be
identical over 32 to 41 tokens, and every sampled token's logprob within 1e-4.

Why 1e-4: both paths multiply the very same float32 weight values (the unpacking is exact, see
test_stored_kernels) and accumulate in float32; decode steps even run the same kernel in the
same order. Only prefill sums in another order (our GEMM against oneDNN's), which moves each
logit by a few float32 roundings of sums of up to 512 terms: ~1e-6 relative on logits of
magnitude ~10, so ~1e-5 on a logprob at worst. A weight unpacked wrongly moves them by ~1e-2.

An HF directory in bfloat16 or float16 runs in its stored dtype the same way, against HF
transformers loading the same files in float32.
"""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.model.stored import StoredEmbedding, StoredLinear
from tests.conftest import assert_no_leaked_blocks
from tests.stored_models import write_format_gguf
from tests.tiny_models import write_tiny_checkpoint

FORMATS = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16", "mixed")
OPTIONS = dict(device="cpu", num_blocks=64, block_size=4, max_num_batched_tokens=48)


def _generate(llm: LLM, prompts: list[list[int]], max_tokens: int):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=1)
    outs = llm.generate(prompts, params)
    assert_no_leaked_blocks(llm)
    return outs


def _sampled_logprobs(out) -> list[float]:
    return [step[token] for step, token in zip(out.logprobs, out.token_ids)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_stored_gguf_gives_the_float32_paths_tokens(tmp_path, fmt):
    path = write_format_gguf(str(tmp_path / f"{fmt}.gguf"), fmt, seed=FORMATS.index(fmt))
    stored = LLM(path, **OPTIONS)
    dense = LLM(path, dequantize=True, **OPTIONS)
    model = stored.engine.loaded.model
    assert isinstance(model.layers[0].self_attn.qkv_proj, StoredLinear)
    assert isinstance(model.embed_tokens, StoredEmbedding)
    assert stored.engine.runner.native_decode is not None
    assert not any(isinstance(m, (StoredLinear, StoredEmbedding)) for m in dense.engine.loaded.model.modules())
    gen = torch.Generator().manual_seed(11)
    # Mixed lengths: the 30-token prompt is prefilled in chunks (48-token budget).
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (1, 7, 30, 13, 2, 5, 9, 3, 4, 6)]
    max_tokens = [40, 33, 36, 34]
    got, want = [], []
    for prompt, n in zip(prompts, max_tokens):  # one at a time: batch-1 steps
        got += _generate(stored, [prompt], n)
        want += _generate(dense, [prompt], n)
    # All at once: decode steps of 10 requests (the tiled kernels) down to fewer, prefill with decode.
    params = [SamplingParams(max_tokens=32 + i, temperature=0.0, ignore_eos=True, logprobs=1) for i in range(10)]
    got += stored.generate(prompts, params)
    want += dense.generate(prompts, params)
    for ours, theirs in zip(got, want):
        assert ours.token_ids == theirs.token_ids, fmt
        torch.testing.assert_close(_sampled_logprobs(ours), _sampled_logprobs(theirs), rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_hf_dir_runs_as_stored_and_matches_hf(tmp_path, dtype):
    transformers = pytest.importorskip("transformers")
    from tests.test_engine_reference import hf_greedy

    path = write_tiny_checkpoint(str(tmp_path / "m"), "qwen2")  # qkv biases, an untied head
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.to(dtype).save_pretrained(path)  # the same directory, its weights now 16-bit
    llm = LLM(path, **OPTIONS)
    qkv = llm.engine.loaded.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, StoredLinear) and set(qkv.stored.formats) == {"BF16" if dtype == torch.bfloat16 else "F16"}
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # exact upcast
    gen = torch.Generator().manual_seed(12)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (5, 17, 30)]
    for prompt, out in zip(prompts, _generate(llm, prompts, 32)):
        assert out.token_ids == hf_greedy(hf, prompt, 32)
