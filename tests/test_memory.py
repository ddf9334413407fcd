"""Huge-page memory for CPU weights and KV caches (engine.memory)."""
from __future__ import annotations

import gc

import torch

from engine.memory import HUGE_PAGE, huge_page_bytes, huge_page_zeros, place_parameters_on_huge_pages


def test_huge_page_buffers_are_aligned_zeroed_and_outlive_their_maker():
    kv = huge_page_zeros((64, 2, 2, 16, 4, 64), torch.float32)  # 4 MiB
    assert kv.shape == (64, 2, 2, 16, 4, 64) and kv.is_contiguous()
    assert kv.data_ptr() % HUGE_PAGE == 0
    assert not kv.any()
    gc.collect()  # the mapping is held by the tensor, not by a local that is gone
    kv.fill_(1.5)
    assert float(kv.sum()) == 1.5 * kv.numel()
    small = huge_page_bytes(100)  # below a page: a plain allocation is enough
    assert small.shape == (100,) and not small.any()


def test_parameters_move_into_one_region_in_order():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(700, 900), torch.nn.Linear(900, 3000, bias=False))
    shapes = [p.shape for p in model.parameters()]
    place_parameters_on_huge_pages(model)
    params = list(model.parameters())
    assert [p.shape for p in params] == shapes
    assert params[0].data_ptr() % HUGE_PAGE == 0
    starts = [p.data_ptr() for p in params]
    assert starts == sorted(starts) and all(s % 64 == 0 for s in starts)
    # Storage only: the module still works once weights are written.
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn_like(p))
    x = torch.randn(2, 700)
    expected = torch.nn.functional.linear(torch.nn.functional.linear(x, params[0], params[1]), params[2])
    assert torch.allclose(model(x), expected)


def test_torch_decode_path_keeps_one_copy_of_the_weights(tiny_checkpoints):
    """Decoding with torch ops makes the projections column-major; that happens inside the
    parameters' shared region, which therefore holds the weights once, not twice."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    options = {"dtype": "float32", "device": "cpu", "num_blocks": 16, "decode_kernel": "torch"}
    engine = LLMEngine(EngineConfig.from_options(tiny_checkpoints["llama3"], **options), None, False)
    model = engine.loaded.model
    params = list(model.parameters())
    qkv = model.layers[0].self_attn.qkv_proj.weight
    assert qkv.stride() == (1, qkv.shape[0])  # column-major, as the torch path wants
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in params}
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    assert sum(storages.values()) <= param_bytes + 64 * len(params)
