"""Int8 checkpoints: GGUF Q8_0 tensors read straight into int8, and the flaxlm
int8 safetensors format that `flaxlm quantize` writes and `load` reads back.

The int8 format is an HF-style directory (config.json, model.safetensors,
tokenizer files) whose tensors carry flaxlm parameter names and layouts
(int8 values, float32 scales beside them) and whose config.json says so:
`"quantization_config": {"quant_method": "flaxlm-int8", ...}`. transformers
does not know that method and refuses the directory instead of misreading it.
"""

from __future__ import annotations

import re

import gguf
import numpy as np

from flaxlm.model.config import ModelConfig
from flaxlm.model.errors import CheckpointError
from flaxlm.model.gguf_io import GGUFCheckpoint
from flaxlm.model.hf_weights import params_from_hf
from flaxlm.model.int8 import q8_0_to_int8

QUANT_METHOD = "flaxlm-int8"
QUANTIZATION_CONFIG = {
    "quant_method": QUANT_METHOD,
    "bits": 8,
    "symmetric": True,
    "layout": "flaxlm parameter names; int8 values output-major, float32 scales "
              "[outputs..., groups] under the same module path",
}

# HF names of the llama weights that load as int8 -> flaxlm paths of their values.
_LLAMA_INT8 = [
    (re.compile(r"model\.embed_tokens\.weight"), "embed.embedding"),
    (re.compile(r"lm_head\.weight"), "lm_head"),
    (re.compile(r"model\.layers\.(\d+)\.self_attn\.(\w_proj)\.weight"), r"layers.\1.attn.\2.kernel"),
    (re.compile(r"model\.layers\.(\d+)\.mlp\.(\w+_proj)\.weight"), r"layers.\1.mlp.\2.kernel"),
]


def is_int8_checkpoint(hf_config: dict, tensors: dict[str, np.ndarray]) -> bool:
    """A flaxlm int8 directory: the config.json marker, or int8 tensors."""
    method = (hf_config.get("quantization_config") or {}).get("quant_method")
    return method == QUANT_METHOD or any(np.asarray(t).dtype == np.int8 for t in tensors.values())


def int8_name(hf_name: str) -> str | None:
    """The flaxlm path of a llama HF weight that can be int8, else None."""
    for pattern, replacement in _LLAMA_INT8:
        if pattern.fullmatch(hf_name):
            return pattern.sub(replacement, hf_name)
    return None


def gguf_int8_params(config: ModelConfig, ckpt: GGUFCheckpoint, source: str, *, strict: bool
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Float-layout parameters and Q8_0 scales from a GGUF read with `dequantize=False`.

    Weights stored Q8_0 keep their int8 values and block scales (never converted
    to float); every other tensor arrives dequantized to float32. With `strict`
    (load's quantize="q8_0") a weight stored in another type is an error.
    """
    tensors, given = {}, {}
    for hf_name, data in ckpt.tensors.items():
        path, stored_q8_0 = int8_name(hf_name), hf_name in ckpt.q8_0_rows
        if path is not None and stored_q8_0:
            tensors[hf_name], given[path] = q8_0_to_int8(data, hf_name)
            continue
        if path is not None and strict:
            raise CheckpointError(
                f"{source}: tensor {hf_name} is stored as {ckpt.types[hf_name]}; quantize='q8_0' loads only "
                "Q8_0 weights as int8 (use quantize='int8' to quantize the others)")
        if stored_q8_0:  # a Q8_0 tensor that has no int8 parameter
            data = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q8_0)
        tensors[hf_name] = np.asarray(data, np.float32)
    return params_from_hf(config, tensors, source), given
