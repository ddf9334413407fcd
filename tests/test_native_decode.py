"""The native CPU decode step against the same engine decoding with torch ops.

Both engines run the same requests; the native one takes every step of one new token for up to
MAX_NATIVE_ROWS requests (lowered here, so that larger steps occur), the torch one none.
Outputs, logprobs and the KV written must agree.
"""
from __future__ import annotations

import random

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
import engine.model_runner
from engine.native import CpuDecodeStep, NativeBuildError
from engine.sampling_params import SamplingParams
from tests.tiny_models import write_tiny_checkpoint

ARCHS = ("llama3", "mistral", "qwen2", "qwen3", "llama_odd")
MAX_NATIVE_ROWS = 6


def _engine(path: str, decode_kernel: str, **options) -> LLMEngine:
    options = {"dtype": "float32", "device": "cpu", "num_blocks": 160, "block_size": 4,
               "decode_kernel": decode_kernel, **options}
    return LLMEngine(EngineConfig.from_options(path, **options), None, False)


def _run(engine: LLMEngine, prompts: list[list[int]], max_tokens: list[int], tag: str) -> dict[str, object]:
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens)):
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=3)
        engine.add_request(prompt, params, f"{tag}{i}")
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


def _count_native_steps(engine: LLMEngine) -> list[int]:
    """Wraps the engine's native step to record the batch size of every call."""
    sizes: list[int] = []
    step = engine.runner.native_decode

    def counted(token_ids, *args, **kwargs):
        sizes.append(len(token_ids))
        return step(token_ids, *args, **kwargs)
    engine.runner.native_decode = counted
    return sizes


@pytest.mark.parametrize("arch", ARCHS)
def test_native_steps_match_torch_ops(tiny_checkpoints, tmp_path, arch, monkeypatch):
    """Mixed prompt lengths (block boundaries crossed at block_size 4), decode batches shrinking
    from past MAX_NATIVE_ROWS to 1 as requests finish one after another: same tokens, logprobs
    within 1e-4, and the same K/V in the cache."""
    monkeypatch.setattr(engine.model_runner, "MAX_NATIVE_ROWS", MAX_NATIVE_ROWS)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(1, 23))]
               for _ in range(MAX_NATIVE_ROWS + 2)]
    path = tiny_checkpoints.get(arch) or write_tiny_checkpoint(str(tmp_path / arch), arch)
    torch_engine = _engine(path, "torch")
    native_engine = _engine(path, "native")
    assert torch_engine.runner.native_decode is None
    sizes = _count_native_steps(native_engine)
    # One request alone first (batch-1 steps), then all of them at once.
    expected = _run(torch_engine, prompts[:1], [9], "alone")
    got = _run(native_engine, prompts[:1], [9], "alone")
    assert sizes and set(sizes) == {1}
    expected_kv = torch_engine.runner.kv_cache.clone()
    assert torch.allclose(native_engine.runner.kv_cache, expected_kv, atol=1e-5, rtol=0)
    max_tokens = [3 + 2 * i for i in range(len(prompts))]
    expected.update(_run(torch_engine, prompts, max_tokens, "batch"))
    got.update(_run(native_engine, prompts, max_tokens, "batch"))
    # Every batch size up to the limit ran natively; larger decode batches went to torch ops.
    assert set(sizes) == set(range(1, MAX_NATIVE_ROWS + 1))
    for request_id, out in expected.items():
        assert got[request_id].token_ids == out.token_ids, request_id
        for mine, ref in zip(got[request_id].logprobs, out.logprobs):
            assert mine.keys() == ref.keys()
            assert max(abs(mine[t] - ref[t]) for t in ref) < 1e-4
    assert torch.allclose(native_engine.runner.kv_cache, torch_engine.runner.kv_cache, atol=1e-5, rtol=0)


def test_native_step_refuses_out_of_range_inputs(tiny_checkpoints):
    engine = _engine(tiny_checkpoints["llama3"], "native")
    step: CpuDecodeStep = engine.runner.native_decode
    ok = step([5], [[3, 4]], [6])
    assert ok.logits.shape == (1, 512) and torch.isfinite(ok.logits).all()
    with pytest.raises(RuntimeError, match="block id outside"):
        step([5], [[3, 160]], [6])
    with pytest.raises(RuntimeError, match="context length"):
        step([5], [[3, 4]], [9])
    with pytest.raises(RuntimeError, match="token id"):
        step([512], [[3, 4]], [6])
    with pytest.raises(ValueError, match="block tables"):
        step([5, 6], [[3, 4]], [6, 6])


def test_native_step_argmax_is_the_first_largest_logit(tiny_checkpoints):
    """The greedy token the step reports for each row is torch's argmax of the logits it wrote,
    whichever thread wrote which rows."""
    engine = _engine(tiny_checkpoints["qwen3"], "native")
    step: CpuDecodeStep = engine.runner.native_decode
    out = step([5, 77, 300, 5], [[1], [2, 3], [4, 5, 6], [7]], [1, 6, 9, 3])
    assert out.argmax == out.logits.argmax(dim=-1).tolist()
    # Rows of equal logits: the lowest index wins, as with torch.
    same = step([9, 9], [[8], [9]], [1, 1])
    assert torch.equal(same.logits[0], same.logits[1]) and same.argmax[0] == same.argmax[1]
    assert same.argmax == same.logits.argmax(dim=-1).tolist()


def test_decode_kernel_choice(tiny_checkpoints):
    path = tiny_checkpoints["qwen2"]
    with pytest.raises(NativeBuildError, match="float32"):
        _engine(path, "native", dtype="bfloat16")
    assert _engine(path, "auto", dtype="bfloat16").runner.native_decode is None
    assert _engine(path, "auto").runner.native_decode is not None
    with pytest.raises(ValueError, match="unknown decode kernel"):
        _engine(path, "fast")


def test_native_elementwise_ops_match_torch():
    """SwiGLU's gate and rotary embedding, native against the torch reference, over contiguous
    and strided inputs (q and k are a slice of the fused QKV output)."""
    from engine.model.ops import TorchOps
    from engine.model.rope import RotaryEmbedding
    from engine.native import NativeCpuOps, load_library

    native, reference = NativeCpuOps(load_library()), TorchOps()
    torch.manual_seed(0)
    gate_up = torch.randn(37, 2 * 100) * 4
    assert torch.allclose(native.silu_mul(gate_up), reference.silu_mul(gate_up), rtol=1e-5, atol=1e-6)
    rope = RotaryEmbedding(32, 256, 10000.0, None)
    positions = torch.randint(0, 256, (37,))
    qkv = torch.randn(37, 4 + 2 + 2, 32)  # (T, heads + 2 * kv_heads, head_dim)
    expected = reference.rope(qkv[:, :6].clone(), positions, rope)
    rotated = native.rope(qkv[:, :6], positions, rope)
    assert rotated.data_ptr() == qkv.data_ptr()  # in place, in the fused tensor
    assert torch.allclose(rotated, expected, rtol=1e-5, atol=1e-6)
    # Not float32: the torch reference takes over.
    half = qkv[:, :6].to(torch.bfloat16)
    assert torch.equal(native.rope(half, positions, rope), reference.rope(half, positions, rope))
