"""HF model directories: config.json plus one `model.safetensors` or shards listed in
`model.safetensors.index.json`. Tensors are read one at a time so peak memory stays near one
copy of the model."""
from __future__ import annotations

import json
import os
from typing import Iterator

import torch
from safetensors import safe_open

from engine.model.config import ModelArchConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def is_hf_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def read_hf_config(path: str) -> ModelArchConfig:
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc
    return ModelArchConfig.from_hf_config(raw)


def safetensors_files(path: str) -> list[str]:
    """The weight files of an HF dir, in a stable order."""
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"{INDEX_FILE} lists shards that are missing: {missing}")
        return files
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(
        f"{path} has a config.json but no {SINGLE_FILE} or {INDEX_FILE} (only safetensors "
        "checkpoints are supported)"
    )


def iter_safetensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def iter_hf_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF parameter name, tensor) for every tensor of the checkpoint."""
    return iter_safetensors(safetensors_files(path))
