"""Weight loading: turns a model reference ("demo", an HF directory or a .gguf file) into a ready
model, its architecture config and its tokenizer. This is where a worker's model comes from
before it serves any request.

The model is built on the meta device and materialised directly on the target device, so no
random initialisation is ever computed and weights are copied once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch

from engine.loader.demo import DEMO_NAME, demo_gguf_path
from engine.loader.gguf_file import load_gguf
from engine.loader.hf_dir import is_hf_dir, iter_hf_weights, read_hf_config
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


def build_model(
    path: str, dtype: torch.dtype, device: torch.device
) -> tuple[ModelArchConfig, LlamaForCausalLM]:
    """Config and loaded model (eval mode, no grads) for a resolved path."""
    if path.endswith(".gguf"):
        config, weights = load_gguf(path, cache_dir())
    else:
        config = read_hf_config(path)
        weights = iter_hf_weights(path)
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


def load_model(model: str, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    from engine.tokenizer import Tokenizer  # lazily: the model path has no tokenizer dependency

    path = resolve_model_path(model)
    config, module = build_model(path, dtype, device)
    if path.endswith(".gguf"):
        tokenizer = Tokenizer.from_gguf(path)
        name = DEMO_NAME if model == "demo" else os.path.splitext(os.path.basename(path))[0]
    else:
        tokenizer = Tokenizer.from_hf_dir(path)
        name = os.path.basename(os.path.normpath(path))
    return LoadedModel(name=name, path=path, config=config, model=module, tokenizer=tokenizer)
