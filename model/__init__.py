"""flaxlm.model: what a model is — config, decoder, KV cache, tokenizer, checkpoints."""

from flaxlm.model.cache import KVCache, LayerCache
from flaxlm.model.config import ModelConfig, RopeScaling, preset_names
from flaxlm.model.decoder import Decoder
from flaxlm.model.errors import CheckpointError, ConfigError, FlaxlmError
from flaxlm.model.loading import load, save_hf
from flaxlm.model.params import abstract_model, build_model, flat_params, param_stats
from flaxlm.model.quant import dequantize_model, quantize
from flaxlm.model.tokenizer import Tokenizer

__all__ = [
    "CheckpointError", "ConfigError", "Decoder", "FlaxlmError", "KVCache", "LayerCache",
    "ModelConfig", "RopeScaling", "Tokenizer", "abstract_model", "build_model", "flat_params",
    "load", "param_stats", "preset_names", "save_hf", "quantize", "dequantize_model",
]
