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


# Fused HF weights (Phi-3) that flaxlm splits by rows: module -> parts and their row counts.
_FUSED = {
    "self_attn.qkv_proj": lambda c: (("attn.q_proj", c.num_heads * c.head_dim),
                                     ("attn.k_proj", c.num_kv_heads * c.head_dim),
                                     ("attn.v_proj", c.num_kv_heads * c.head_dim)),
    "mlp.gate_up_proj": lambda c: (("mlp.gate_proj", c.mlp_dim), ("mlp.up_proj", c.mlp_dim)),
}
_FUSED_NAME = re.compile(r"model\.layers\.(\d+)\.(self_attn\.qkv_proj|mlp\.gate_up_proj)\.weight")


def int8_parts(config: ModelConfig, hf_name: str) -> list[tuple[str, slice]]:
    """The flaxlm int8 kernel paths an HF weight's rows become, with their row ranges ([] if none)."""
    fused = _FUSED_NAME.fullmatch(hf_name)
    if fused is None:
        path = int8_name(hf_name)
        return [] if path is None else [(path, slice(None))]
    parts, start = [], 0
    for module, rows in _FUSED[fused[2]](config):
        parts.append((f"layers.{fused[1]}.{module}.kernel", slice(start, start + rows)))
        start += rows
    return parts


def gguf_int8_params(config: ModelConfig, ckpt: GGUFCheckpoint, source: str, *, strict: bool
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Float-layout parameters and Q8_0 scales from a GGUF read with `dequantize=False`.

    Weights stored Q8_0 keep their int8 values and block scales (never converted
    to float); every other tensor arrives dequantized to float32. A fused weight's
    rows (and scales) are split as flaxlm splits the float weight. With `strict`
    (load's quantize="q8_0") a weight stored in another type is an error.
    """
    tensors, given = {}, {}
    for hf_name, data in ckpt.tensors.items():
        parts, stored_q8_0 = int8_parts(config, hf_name), hf_name in ckpt.q8_0_rows
        if parts and stored_q8_0:
            tensors[hf_name], scale = q8_0_to_int8(data, hf_name)
            given |= {path: scale[rows] for path, rows in parts}
            continue
        path = parts[0][0] if parts else None
        if path is not None and strict:
            raise CheckpointError(
                f"{source}: tensor {hf_name} is stored as {ckpt.types[hf_name]}; quantize='q8_0' loads only "
                "Q8_0 weights as int8 (use quantize='int8' to quantize the others)")
        if stored_q8_0:  # a Q8_0 tensor that has no int8 parameter
            data = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q8_0)
        tensors[hf_name] = np.asarray(data, np.float32)
    return params_from_hf(config, tensors, source), given
