"""Weight loading: turns a model reference ("demo", an HF directory or a .gguf file) into a ready
model, its architecture config and its tokenizer. This is where a worker's model comes from
before it serves any request.

The model is built on the meta device and materialised directly on the target device, so no
random initialisation is ever computed and weights are copied once. On the CPU with float32
activations (the default there), a GGUF file's weights stay in their block formats and an HF
directory's float16 / bfloat16 weights stay 16-bit (engine.loader.stored_checkpoint); the
native kernels unpack them as they compute. `dequantize=True` converts every weight to the
model dtype instead, as on CUDA.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch

from engine.loader.demo import DEMO_NAME, demo_gguf_path
from engine.loader.gguf_file import load_gguf, open_gguf, read_gguf_config
from engine.loader.hf_dir import is_hf_dir, iter_safetensors, read_hf_config, safetensors_files
from engine.loader.stored_checkpoint import hf_dir_is_half, read_gguf_stored, read_hf_stored
from engine.loader.stored_model import build_stored_model
from engine.memory import place_parameters_on_huge_pages
from engine.model.config import ModelArchConfig
from engine.model.llama import LlamaForCausalLM

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer

__all__ = ["LoadedModel", "build_model", "cache_dir", "load_model", "resolve_model_path"]


@dataclass(frozen=True)
class LoadedModel:
    name: str  # e.g. "SmolLM2-135M-Instruct" or the directory / file name
    path: str
    config: ModelArchConfig
    model: LlamaForCausalLM  # eval mode, on device, in dtype
    tokenizer: "Tokenizer"


def cache_dir() -> str:
    """$PDSERVE_CACHE_DIR, else $XDG_CACHE_HOME/pdserve, else ~/.cache/pdserve."""
    explicit = os.environ.get("PDSERVE_CACHE_DIR")
    if explicit:
        return explicit
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "pdserve")


def resolve_model_path(model: str) -> str:
    """"demo" -> the cached demo GGUF (fetched once); anything else must be an HF dir or a .gguf."""
    if model == "demo":
        return demo_gguf_path(cache_dir())
    path = os.path.expanduser(model)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"model {model!r} not found: pass 'demo', an HF model directory or a .gguf file"
        )
    if os.path.isdir(path):
        if not is_hf_dir(path):
            raise ValueError(f"{path} is a directory without config.json; not an HF model directory")
        return path
    if not path.endswith(".gguf"):
        raise ValueError(f"{path} is neither an HF model directory nor a .gguf file")
    return path


def keeps_stored_formats(dtype: torch.dtype, device: torch.device, dequantize: bool) -> bool:
    """Whether weights may stay as stored: on the CPU with float32 activations, unless asked to
    dequantize (the native kernels unpack them; elsewhere torch needs them in the model dtype)."""
    return not dequantize and torch.device(device).type == "cpu" and dtype == torch.float32


def build_model(
    path: str, dtype: torch.dtype, device: torch.device, dequantize: bool = False, gguf_reader=None,
) -> tuple[ModelArchConfig, LlamaForCausalLM]:
    """Config and loaded model (eval mode, no grads) for a resolved path. GGUF files and HF
    directories with 16-bit weights keep them as stored where keeps_stored_formats allows (a
    float32 HF directory is what the float32 path runs anyway). `gguf_reader`: the file already
    open (engine.loader.gguf_file.open_gguf), so that it is parsed once."""
    stored = keeps_stored_formats(dtype, device, dequantize)
    if path.endswith(".gguf"):
        if stored:
            reader = gguf_reader or open_gguf(path)
            config = read_gguf_config(reader)
            return config, build_stored_model(config, read_gguf_stored(reader, config))
        config, weights = load_gguf(path, cache_dir())
    else:
        config = read_hf_config(path)
        files = safetensors_files(path)
        if stored and hf_dir_is_half(files):
            return config, build_stored_model(config, read_hf_stored(files))
        weights = iter_safetensors(files)
    return config, _materialise(config, weights, dtype, torch.device(device))


def _materialise(
    config: ModelArchConfig,
    weights: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    device: torch.device,
) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).to_empty(device=device)  # storage only; load_weights fills every param
    if device.type == "cpu":
        place_parameters_on_huge_pages(model)  # still storage only: untouched pages cost nothing
    model.load_weights(weights)
    model.requires_grad_(False)
    return model.eval()


def load_model(model: str, dtype: torch.dtype, device: torch.device, dequantize: bool = False) -> LoadedModel:
    from engine.tokenizer import Tokenizer  # lazily: the model path has no tokenizer dependency

    path = resolve_model_path(model)
    # A GGUF file is parsed once, for the weights and the tokenizer (its vocabulary takes seconds).
    reader = open_gguf(path) if path.endswith(".gguf") else None
    config, module = build_model(path, dtype, device, dequantize, reader)
    if path.endswith(".gguf"):
        tokenizer = Tokenizer.from_gguf(path, reader)
        name = DEMO_NAME if model == "demo" else os.path.splitext(os.path.basename(path))[0]
    else:
        tokenizer = Tokenizer.from_hf_dir(path)
        name = os.path.basename(os.path.normpath(path))
    return LoadedModel(name=name, path=path, config=config, model=module, tokenizer=tokenizer)
