"""Hugging Face model directories: read config + safetensors, write them back."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from flaxlm.model.errors import CheckpointError


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: file not found") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of an HF directory, following `model.safetensors.index.json`."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: has no 'weight_map'")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index}: names shard {f.name}, which does not exist")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors weights found "
                              "(flaxlm reads safetensors only, never pickle)")
    return files


def read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="numpy") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({e})") from e
    return tensors


def read_hf_dir(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json dict, {tensor name: array}) of an HF model directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    config = read_json(directory / "config.json")
    return config, read_safetensors(safetensors_files(directory))


def write_hf_dir(directory: str | os.PathLike, config: dict[str, Any],
                 tensors: dict[str, np.ndarray], generation_config: dict[str, Any]) -> None:
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        with open(directory / "generation_config.json", "w", encoding="utf-8") as f:
            json.dump(generation_config, f, indent=2)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                  str(directory / "model.safetensors"), metadata={"format": "pt"})
    except OSError as e:
        raise CheckpointError(f"{directory}: cannot write ({e})") from e
