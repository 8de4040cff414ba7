"""What each GGUF architecture is in Hugging Face terms: config.json keys and tensor names.

llama.cpp's convert_hf_to_gguf writes an HF checkpoint as `{arch}.*` metadata
and `blk.N.*` tensors, and some architectures' model code in llama.cpp hard-codes
what the metadata leaves out (Gemma's local/global layer pattern and query
scale, SmolLM3's layers without RoPE). Each `GGUFArch` below inverts one
converter: a transformers config.json dict of the family's `model_type`, HF
tensor names, and the tensor transforms to undo (rows of q/k permuted for
llama-style RoPE, `1 +` folded into Gemma's norm weights).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from flaxlm.model.errors import CheckpointError

# GGUF layer tensor kind -> HF module path inside `model.layers.N.`
_ATTN = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj"}
_MLP = {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_LLAMA_LAYER = {"attn_norm": "input_layernorm", **_ATTN, "ffn_norm": "post_attention_layernorm", **_MLP}
_GEMMA_LAYER = {"attn_norm": "input_layernorm", **_ATTN, "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", **_MLP, "post_ffw_norm": "post_feedforward_layernorm"}
_MOE_LAYER = {"attn_norm": "input_layernorm", **_ATTN, "ffn_norm": "post_attention_layernorm",
              "ffn_gate_inp": "mlp.gate", "ffn_down_exps": "mlp.experts.down_proj"}
_PHI3_LAYER = {"attn_norm": "input_layernorm", "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
               "ffn_norm": "post_attention_layernorm", "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"}

GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Stacked expert weights [experts, out, in]: gate and up separate, or fused (--fuse-gate-up-exps) as in
# HF's `mlp.experts.gate_up_proj`, which the reader builds (gate rows first). No `.weight` suffix in HF.
EXPERT_GATE_UP = {"ffn_gate_exps": "mlp.experts.gate_proj", "ffn_up_exps": "mlp.experts.up_proj",
                  "ffn_gate_up_exps": "mlp.experts.gate_up_proj"}
# Tensors that are metadata, not weights: RoPE frequency tables turned back into rope_scaling.
ROPE_FREQS, ROPE_LONG, ROPE_SHORT = "rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"
_TOKEN_ID_KEYS = {"tokenizer.ggml.bos_token_id": "bos_token_id", "tokenizer.ggml.eos_token_id": "eos_token_id",
                  "tokenizer.ggml.padding_token_id": "pad_token_id"}


class Metadata:
    """`{arch}.*` keys of one file, read with the file named in every error."""

    def __init__(self, fields: dict, arch: str, path: Path):
        self.fields, self.arch, self.path = fields, arch, path

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(f"{self.arch}.{key}", default)

    def required(self, key: str) -> Any:
        full = f"{self.arch}.{key}"
        if full not in self.fields:
            raise CheckpointError(f"{self.path}: GGUF metadata key {full!r} is missing")
        return self.fields[full]

    def error(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {message}")


@dataclasses.dataclass(frozen=True)
class GGUFArch:
    """One `general.architecture` as llama.cpp writes it.

    layer: GGUF kind -> HF module path of each layer's weights (all required);
    biases: kinds that may carry a `.bias`; permuted_qk: convert_hf_to_gguf
    permuted q/k rows (LlamaModel.permute; llama.cpp's "normal" RoPE layout);
    norm_offset: added to every `*norm.weight` by the converter; extra: the
    family's own config.json keys.
    """

    model_type: str
    hf_class: str
    layer: dict[str, str]
    extra: Callable[[Metadata, dict], dict]
    biases: tuple[str, ...] = ()
    permuted_qk: bool = False
    norm_offset: float = 0.0
    experts: bool = False


def as_written(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


def hf_config(arch: GGUFArch, meta: Metadata, shapes: dict[str, tuple[int, ...]], rope_tables: dict) -> dict:
    """The config.json dict of `arch`'s HF family; `shapes` are HF tensor shapes, `rope_tables` the RoPE tensors."""
    hidden, heads = meta.required("embedding_length"), meta.required("attention.head_count")
    head_dim = meta.get("attention.key_length", hidden // heads)
    if meta.get("attention.value_length", head_dim) != head_dim:
        raise meta.error(f"{meta.arch}.attention.value_length differs from key_length {head_dim}")
    kv_heads = meta.get("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise meta.error(f"{meta.arch}.attention.head_count_kv varies per layer, which {arch.model_type} does not")
    config = {
        "model_type": arch.model_type,
        "architectures": [arch.hf_class],
        "vocab_size": shapes["model.embed_tokens.weight"][0],
        "hidden_size": hidden,
        # an all-expert file may leave out the dense FFN width (the family's extra fills it)
        "intermediate_size": meta.get("feed_forward_length") if arch.experts else meta.required("feed_forward_length"),
        "num_hidden_layers": meta.required("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": as_written(meta.required("attention.layer_norm_rms_epsilon")),
        "rope_theta": as_written(meta.get("rope.freq_base", 10000.0)),
        "max_position_embeddings": meta.required("context_length"),
        "tie_word_embeddings": "lm_head.weight" not in shapes,
    }
    config |= {hf: meta.fields[key] for key, hf in _TOKEN_ID_KEYS.items() if key in meta.fields}
    rope_scaling = _rope_scaling(meta, rope_tables, head_dim, config["rope_theta"])
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    config |= arch.extra(meta, config)
    if meta.get("rope.dimension_count", head_dim) != head_dim and "partial_rotary_factor" not in config:
        raise meta.error(f"{meta.arch}.rope.dimension_count is {meta.get('rope.dimension_count')} but the head "
                         f"dim is {head_dim}; {arch.model_type} rotates the whole head")
    return config


# --- RoPE scaling -----------------------------------------------------------------------------


def _rope_scaling(meta: Metadata, tables: dict, head_dim: int, theta: float) -> dict | None:
    if ROPE_FREQS in tables:
        return llama3_rope_scaling(np.asarray(tables[ROPE_FREQS], np.float64), head_dim, theta, meta)
    if ROPE_LONG in tables:
        return {"rope_type": "longrope", "long_factor": _factors(tables[ROPE_LONG]),
                "short_factor": _factors(tables.get(ROPE_SHORT, tables[ROPE_LONG]))}
    kind = meta.get("rope.scaling.type", "none")
    factor = meta.get("rope.scaling.factor", meta.get("rope.scale_linear", 1.0))
    if kind == "none" and factor == 1.0:
        return None
    if kind in ("linear", "none"):  # old files carry only `rope.scale_linear`
        return {"rope_type": "linear", "factor": as_written(factor)}
    if kind == "yarn":
        return _yarn(meta, factor)
    raise meta.error(f"{meta.arch}.rope.scaling.type {kind!r} is not supported (flaxlm reads linear, yarn, "
                     "llama3 from rope_freqs and longrope from rope_factors_long/short)")


def _factors(values) -> list[float]:
    return [as_written(v) for v in np.asarray(values, np.float32)]


def _yarn(meta: Metadata, factor: float) -> dict:
    """HF's yarn rope_scaling from the keys convert_hf_to_gguf writes (ext_factor has no HF counterpart)."""
    scaling = {"rope_type": "yarn", "factor": as_written(factor),
               "original_max_position_embeddings": meta.required("rope.scaling.original_context_length")}
    for key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                        ("yarn_attn_factor", "attention_factor")):
        if meta.get(f"rope.scaling.{key}") is not None:
            scaling[hf_key] = as_written(meta.get(f"rope.scaling.{key}"))
    return scaling


def llama3_rope_divisors(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                         high_freq_factor: float, original_context: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3 rope scaling, as convert_hf_to_gguf writes `rope_freqs.weight`."""
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)  # [head_dim // 2]
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    middle = 1 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelen > original_context / low_freq_factor, factor, middle)
    return np.where(wavelen < original_context / high_freq_factor, 1.0, divisors)


def llama3_rope_scaling(divisors: np.ndarray, head_dim: int, theta: float, meta: Metadata) -> dict:
    """Recover HF's llama3 rope_scaling from the stored divisors.

    Four numbers made the divisors; they determine the factor and, given
    Meta's low/high frequency factors 1 and 4 (every Llama 3.x release), the
    original context length. The result is checked by recomputing the divisors.
    """
    low, high = 1.0, 4.0
    factor = float(divisors.max())
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    inner = (divisors > 1 + 1e-4) & (divisors < factor * (1 - 1e-4))
    if divisors.shape != wavelen.shape or factor <= 1 or not inner.any():
        raise meta.error(f"{ROPE_FREQS} is not llama3 rope scaling that flaxlm can recover")
    smooth = (1 / divisors[inner] - 1 / factor) / (1 - 1 / factor)
    original = int(round(float(np.median(wavelen[inner] * (low + (high - low) * smooth)))))
    scaling = {"rope_type": "llama3", "factor": as_written(factor), "low_freq_factor": low,
               "high_freq_factor": high, "original_max_position_embeddings": original}
    recomputed = llama3_rope_divisors(head_dim, theta, scaling["factor"], low, high, original)
    if not np.allclose(recomputed, divisors, rtol=1e-4):
        raise meta.error(f"{ROPE_FREQS} does not match llama3 rope scaling with low/high frequency factors 1 and 4")
    return scaling


# --- the families -----------------------------------------------------------------------------


def _llama(meta: Metadata, config: dict) -> dict:
    return {"hidden_act": "silu"}


def _qwen2(meta: Metadata, config: dict) -> dict:
    return {"hidden_act": "silu", "use_sliding_window": False}


def _qwen3(meta: Metadata, config: dict) -> dict:
    return {"hidden_act": "silu", "attention_bias": False, "use_sliding_window": False}


def _smollm3(meta: Metadata, config: dict) -> dict:
    """llama.cpp hard-codes SmolLM3's NoPE layers: every 4th (n_no_rope_layer_step = 4)."""
    interval = 4
    return {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "use_sliding_window": False,
            "no_rope_layer_interval": interval,
            "no_rope_layers": [int((i + 1) % interval != 0) for i in range(config["num_hidden_layers"])]}


def _layer_types(meta: Metadata, layers: int, default_pattern: int) -> list[str]:
    """Sliding or full attention per layer, as llama.cpp's set_swa_pattern (dense_first=False) reads it.

    The pattern key is a period n (layer i slides unless i % n == n - 1) or one bool per layer.
    """
    pattern = meta.get("attention.sliding_window_pattern", default_pattern)
    if isinstance(pattern, list):
        if len(pattern) != layers:
            raise meta.error(f"{meta.arch}.attention.sliding_window_pattern has {len(pattern)} entries "
                             f"for {layers} layers")
        sliding = [bool(flag) for flag in pattern]
    else:
        sliding = [pattern == 0 or i % pattern < pattern - 1 for i in range(layers)]
    return ["sliding_attention" if flag else "full_attention" for flag in sliding]


def _query_pre_attn_scalar(config: dict, big_layers: int) -> float:
    """llama.cpp's f_attention_scale: hidden / heads for the 27B models (known by layer count), else head_dim."""
    if config["num_hidden_layers"] == big_layers:
        return config["hidden_size"] // config["num_attention_heads"]
    return config["head_dim"]


def _gemma2(meta: Metadata, config: dict) -> dict:
    return {"hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": _query_pre_attn_scalar(config, big_layers=46),
            "sliding_window": meta.get("attention.sliding_window", 4096),
            "layer_types": _layer_types(meta, config["num_hidden_layers"], 2),
            "attn_logit_softcapping": as_written(meta.get("attn_logit_softcapping", 50.0)),
            "final_logit_softcapping": as_written(meta.get("final_logit_softcapping", 30.0))}


def _gemma3(meta: Metadata, config: dict) -> dict:
    """Gemma 3 text: local layers use rope.freq_base_swa (llama.cpp's default 10000) and no scaling."""
    window = meta.get("attention.sliding_window", 0)
    final_cap = meta.get("final_logit_softcapping")
    layers = config["num_hidden_layers"]
    return {"hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": _query_pre_attn_scalar(config, big_layers=62),
            "sliding_window": window or None,
            "layer_types": _layer_types(meta, layers, 6) if window else ["full_attention"] * layers,
            "rope_local_base_freq": as_written(meta.get("rope.freq_base_swa", 10000.0)),
            "attn_logit_softcapping": None,
            "final_logit_softcapping": as_written(final_cap) if final_cap else None}


def _phi3(meta: Metadata, config: dict) -> dict:
    """Phi-3: a partial rotary width is stated in dims; sliding_window 0 means none.

    A LongRoPE file also states the attention factor; HF derives the same number from the
    context lengths, so it is written only when it differs.
    """
    extra = {"hidden_act": "silu",
             "original_max_position_embeddings": meta.get("rope.scaling.original_context_length",
                                                          config["max_position_embeddings"]),
             "sliding_window": meta.get("attention.sliding_window") or None}
    rotary = meta.get("rope.dimension_count", config["head_dim"])
    if rotary != config["head_dim"]:
        extra["partial_rotary_factor"] = rotary / config["head_dim"]
    scaling = config.get("rope_scaling")
    attn_factor = meta.get("rope.scaling.attn_factor")
    if scaling and scaling["rope_type"] == "longrope" and attn_factor is not None:
        scale = config["max_position_embeddings"] / extra["original_max_position_embeddings"]
        derived = math.sqrt(1 + math.log(scale) / math.log(extra["original_max_position_embeddings"])) \
            if scale > 1 else 1.0
        if abs(attn_factor - derived) > 1e-6:
            extra["rope_scaling"] = {**scaling, "attention_factor": as_written(attn_factor)}
    return extra


def _mixtral(meta: Metadata, config: dict) -> dict:
    """A `llama` file with experts: Mixtral (softmax router, top-k weights renormalized, as llama.cpp runs it)."""
    return {"hidden_act": "silu", "num_local_experts": meta.required("expert_count"),
            "num_experts_per_tok": meta.required("expert_used_count"), "sliding_window": None}


def _qwen3_moe(meta: Metadata, config: dict) -> dict:
    """Qwen3-MoE: every layer sparse; llama.cpp renormalizes the top-k weights (norm_topk_prob)."""
    expert_ffn = meta.required("expert_feed_forward_length")
    return {"hidden_act": "silu", "attention_bias": False, "use_sliding_window": False,
            "num_experts": meta.required("expert_count"), "num_experts_per_tok": meta.required("expert_used_count"),
            "moe_intermediate_size": expert_ffn, "intermediate_size": config["intermediate_size"] or expert_ffn,
            "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}


MIXTRAL = GGUFArch("mixtral", "MixtralForCausalLM", _MOE_LAYER, _mixtral, permuted_qk=True, experts=True)
ARCHS = {
    "llama": GGUFArch("llama", "LlamaForCausalLM", _LLAMA_LAYER, _llama, permuted_qk=True),
    "qwen2": GGUFArch("qwen2", "Qwen2ForCausalLM", _LLAMA_LAYER, _qwen2, biases=("attn_q", "attn_k", "attn_v")),
    "qwen3": GGUFArch("qwen3", "Qwen3ForCausalLM", _LLAMA_LAYER | _QK_NORM, _qwen3),
    "gemma2": GGUFArch("gemma2", "Gemma2ForCausalLM", _GEMMA_LAYER, _gemma2, norm_offset=1.0),
    "gemma3": GGUFArch("gemma3_text", "Gemma3ForCausalLM", _GEMMA_LAYER | _QK_NORM, _gemma3, norm_offset=1.0),
    "phi3": GGUFArch("phi3", "Phi3ForCausalLM", _PHI3_LAYER, _phi3),
    "smollm3": GGUFArch("smollm3", "SmolLM3ForCausalLM", _LLAMA_LAYER, _smollm3, permuted_qk=True),
    "qwen3moe": GGUFArch("qwen3_moe", "Qwen3MoeForCausalLM", _MOE_LAYER | _QK_NORM, _qwen3_moe, experts=True),
}


def architecture(name: str, fields: dict) -> GGUFArch | None:
    """The spec of `general.architecture` `name`; a `llama` file with experts is Mixtral."""
    if name == "llama" and fields.get("llama.expert_count", 0) > 0:
        return MIXTRAL
    return ARCHS.get(name)


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name suffix -> shape that the config implies ([out, in] for weights)."""
    hidden, head_dim, ffn = config["hidden_size"], config["head_dim"], config["intermediate_size"]
    experts = config.get("num_local_experts") or config.get("num_experts") or 0
    expert_ffn = config.get("moe_intermediate_size", ffn)
    q_rows = config["num_attention_heads"] * head_dim
    kv_rows = config["num_key_value_heads"] * head_dim
    norms = ("norm", "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
             "post_feedforward_layernorm")
    return {
        "embed_tokens.weight": (config["vocab_size"], hidden), "lm_head.weight": (config["vocab_size"], hidden),
        **{f"{norm}.weight": (hidden,) for norm in norms},
        "q_norm.weight": (head_dim,), "k_norm.weight": (head_dim,),
        "q_proj.weight": (q_rows, hidden), "k_proj.weight": (kv_rows, hidden), "v_proj.weight": (kv_rows, hidden),
        "q_proj.bias": (q_rows,), "k_proj.bias": (kv_rows,), "v_proj.bias": (kv_rows,),
        "qkv_proj.weight": (q_rows + 2 * kv_rows, hidden), "o_proj.weight": (hidden, q_rows),
        "gate_proj.weight": (ffn, hidden), "up_proj.weight": (ffn, hidden), "gate_up_proj.weight": (2 * ffn, hidden),
        "down_proj.weight": (hidden, ffn),
        "gate.weight": (experts, hidden), "experts.gate_proj": (experts, expert_ffn, hidden),
        "experts.up_proj": (experts, expert_ffn, hidden), "experts.gate_up_proj": (experts, 2 * expert_ffn, hidden),
        "experts.down_proj": (experts, hidden, expert_ffn),
    }
