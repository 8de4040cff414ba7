"""Read Hugging Face `config.json` dicts into `ModelConfig` (writing: `hf_export`).

One reader per `model_type` turns HF's keys into explicit architecture fields,
resolving HF's defaults the way its config classes do (per-layer sliding
patterns, SmolLM3's NoPE layers, RoPE scaling parameters). Both key styles are
read: transformers 5's `rope_parameters` and older `rope_theta` + `rope_scaling`.
GGUF files reach the model through the same readers (flaxlm.model.gguf_io
builds an HF-style dict).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from flaxlm.model.config import ModelConfig, RopeScaling
from flaxlm.model.errors import CheckpointError, ConfigError

HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")

Fields = dict[str, Any]


def config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    """The ModelConfig of an HF config dict; errors name `source` and the field."""
    model_type = hf.get("model_type")
    if model_type not in READERS:
        raise CheckpointError(f"{source}: unsupported model_type {model_type!r}; "
                              f"flaxlm reads {', '.join(SUPPORTED_TYPES)}")
    try:
        return ModelConfig(**READERS[model_type](hf))
    except KeyError as e:
        raise CheckpointError(f"{source}: config is missing the field {e.args[0]!r}") from e
    except (ConfigError, _Unsupported) as e:
        raise CheckpointError(f"{source}: {model_type}: {e}") from e


class _Unsupported(Exception):
    """A config value flaxlm does not implement (the message names the field)."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise _Unsupported(message)


# ------------------------------------------------------------------ shared pieces

def _shape(hf: dict[str, Any], *, head_dim: int | None = None, norm_eps: float = 1e-6) -> Fields:
    """Shapes, with the HF config class's defaults for head_dim and rms_norm_eps."""
    heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or head_dim or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", norm_eps))


def _activation(hf: dict[str, Any], key: str = "hidden_act", default: str = "silu") -> str:
    act = hf.get(key) or default
    _require(act in HF_ACTIVATIONS, f"{key} {act!r} is not supported "
                                    f"({', '.join(HF_ACTIVATIONS)} are)")
    return HF_ACTIVATIONS[act]


def _rope_params(hf: dict[str, Any], default_theta: float = 10000.0) -> dict[str, Any]:
    """One RoPE parameter dict: `rope_parameters` over the older `rope_scaling`, with
    `rope_theta` filled in."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", default_theta))
    return params


def _rope(hf: dict[str, Any], params: dict[str, Any], *, default_original: int | None = None
          ) -> Fields:
    """rope_theta, rope_scaling and partial_rotary_factor from one RoPE parameter dict."""
    kind = params.get("rope_type", params.get("type", "default"))
    _require(kind in ROPE_TYPES, f"RoPE scaling type {kind!r} (rope_scaling.rope_type) is not "
                                 f"supported ({', '.join(ROPE_TYPES)} are)")
    out = dict(rope_theta=float(params["rope_theta"]),
               partial_rotary_factor=float(params.get("partial_rotary_factor")
                                           or hf.get("partial_rotary_factor") or 1.0))
    if kind == "default":
        return out
    max_pos = hf.get("max_position_embeddings", 2048)
    original = int(default_original or params.get("original_max_position_embeddings")
                   or max_pos)
    if kind == "linear":
        scaling = RopeScaling(kind="linear", factor=float(params["factor"]))
    elif kind == "llama3":
        scaling = RopeScaling(
            kind="llama3", factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=int(params["original_max_position_embeddings"]))
    elif kind == "yarn":
        scaling = _yarn(params, max_pos, original)
    else:
        scaling = _longrope(params, max_pos, original)
    return out | dict(rope_scaling=scaling)


def _yarn(params: dict[str, Any], max_pos: int, original: int) -> RopeScaling:
    factor = float(params.get("factor") or max_pos / original)

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = (mscale(factor, m) / mscale(factor, m_all) if m and m_all
                     else mscale(factor))
    return RopeScaling(kind="yarn", factor=factor, original_max_position=original,
                       beta_fast=float(params.get("beta_fast") or 32),
                       beta_slow=float(params.get("beta_slow") or 1),
                       truncate=bool(params.get("truncate", True)),
                       attention_factor=float(attention))


def _longrope(params: dict[str, Any], max_pos: int, original: int) -> RopeScaling:
    factor = float(params.get("factor") or max_pos / original)
    attention = params.get("attention_factor")
    if attention is None:
        attention = (1.0 if factor <= 1 else
                     math.sqrt(1 + math.log(factor) / math.log(original)))
    return RopeScaling(kind="longrope", factor=factor, original_max_position=original,
                       attention_factor=float(attention),
                       short_factor=tuple(params["short_factor"]),
                       long_factor=tuple(params["long_factor"]))


def _layer_windows(hf: dict[str, Any], window: int | None, default_types: list[str]) -> Fields:
    """sliding_window and layer_attention from HF `layer_types` (or the type's default)."""
    types = hf.get("layer_types") or default_types
    _require(len(types) == hf["num_hidden_layers"],
             f"layer_types has {len(types)} entries for {hf['num_hidden_layers']} layers")
    kinds = []
    for t in types:
        _require(t in ("full_attention", "sliding_attention"),
                 f"layer_types entry {t!r} is not supported (full_attention, sliding_attention)")
        kinds.append("sliding" if t == "sliding_attention" and window is not None else "full")
    return dict(sliding_window=window if "sliding" in kinds else None,
                layer_attention=tuple(kinds))


def _all_layers_window(window: int | None) -> Fields:
    """One window on every layer (Mistral, Mixtral, Phi-3, Qwen3-MoE)."""
    return dict(sliding_window=window, layer_attention=("sliding" if window else "full",))


def _qwen_windows(hf: dict[str, Any]) -> Fields:
    """Qwen2/Qwen3: with use_sliding_window, layers from max_window_layers on slide."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    first = hf.get("max_window_layers", hf["num_hidden_layers"])
    default = ["sliding_attention" if window is not None and i >= first else "full_attention"
               for i in range(hf["num_hidden_layers"])]
    return _layer_windows(hf, window, default)


def _biases(hf: dict[str, Any]) -> Fields:
    bias = bool(hf.get("attention_bias", False))
    return dict(qkv_bias=bias, out_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))


# ------------------------------------------------------------------ readers

def _llama(hf: dict[str, Any], *, head_dim: int | None = None, norm_eps: float = 1e-6,
           theta: float = 10000.0, tied: bool = False, rope: Fields | None = None) -> Fields:
    """Llama's fields, with the defaults of each HF config class passed in."""
    return (_shape(hf, head_dim=head_dim, norm_eps=norm_eps) | _biases(hf)
            | (rope if rope is not None else _rope(hf, _rope_params(hf, theta)))
            | dict(activation=_activation(hf),
                   tie_embeddings=bool(hf.get("tie_word_embeddings", tied))))


def _mistral(hf: dict[str, Any]) -> Fields:
    _require(not hf.get("layer_types"), "mistral with layer_types is not supported")
    return _llama(hf) | _all_layers_window(hf.get("sliding_window"))


def _qwen2(hf: dict[str, Any]) -> Fields:
    return _llama(hf) | _qwen_windows(hf) | dict(qkv_bias=True, out_bias=False, mlp_bias=False)


def _qwen3(hf: dict[str, Any]) -> Fields:
    return _llama(hf, head_dim=128) | _qwen_windows(hf) | dict(qk_norm=True, mlp_bias=False)


def _phi3(hf: dict[str, Any]) -> Fields:
    params = _rope_params(hf)
    if params.get("rope_type", params.get("type")) in ("su", "yarn"):
        params["rope_type"] = "longrope"  # as Phi3Config renames them
    # Phi3Config's original_max_position_embeddings (default 4096) wins over rope_scaling's.
    original = hf.get("original_max_position_embeddings", 4096)
    return (_llama(hf, norm_eps=1e-5, rope=_rope(hf, params, default_original=original))
            | _all_layers_window(hf.get("sliding_window"))
            | dict(qkv_bias=False, out_bias=False, mlp_bias=False))


def _smollm3(hf: dict[str, Any]) -> Fields:
    layers = hf["num_hidden_layers"]
    interval = hf.get("no_rope_layer_interval", 4)
    rope = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
    _require(len(rope) == layers, f"no_rope_layers has {len(rope)} entries for {layers} layers")
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    default = ["sliding_attention" if window is not None and not rope[i] else "full_attention"
               for i in range(layers)]
    return (_llama(hf, theta=2_000_000.0, tied=True) | _layer_windows(hf, window, default)
            | dict(layer_positions=tuple("rope" if r else "none" for r in rope)))


def _gemma(hf: dict[str, Any], pattern: int) -> Fields:
    """What Gemma 2 and 3 share: 1 + w norms, post-norms, scaled embeddings, the
    query scale, soft-capping and a sliding pattern (every `pattern`-th layer global)."""
    _require(not hf.get("use_bidirectional_attention"),
             "use_bidirectional_attention=true is not supported (causal decoders only)")
    default = ["sliding_attention" if (i + 1) % pattern else "full_attention"
               for i in range(hf["num_hidden_layers"])]
    fields = _shape(hf, head_dim=256) | _biases(hf)
    scalar = int(hf.get("query_pre_attn_scalar", 256))
    return (fields | _layer_windows(hf, hf.get("sliding_window"), default)
            | dict(norm_offset=1.0, post_attn_norm=True, post_mlp_norm=True,
                   scale_embeddings=True,
                   activation=_activation(hf, "hidden_activation", "gelu_pytorch_tanh"),
                   query_pre_attn_scalar=None if scalar == fields["head_dim"] else scalar,
                   attn_softcap=hf.get("attn_logit_softcapping"),
                   final_softcap=hf.get("final_logit_softcapping"),
                   tie_embeddings=bool(hf.get("tie_word_embeddings", True))))


def _gemma2(hf: dict[str, Any]) -> Fields:
    hf = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, **hf}
    return _gemma(hf, 2) | _rope(hf, _rope_params(hf))


def _gemma3(hf: dict[str, Any]) -> Fields:
    """Gemma 3: q/k norms; global layers use rope_theta (default 1e6) with any scaling,
    sliding ones their own base (rope_local_base_freq, default 1e4), unscaled."""
    fields = _gemma(hf, hf.get("sliding_window_pattern", 6)) | dict(qk_norm=True)
    nested = hf.get("rope_parameters") or {}
    full = dict(nested.get("full_attention") or {})
    full.update(hf.get("rope_scaling") or {})
    full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
    local = dict(nested.get("sliding_attention") or {})
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
    kind = local.get("rope_type", local.get("type", "default"))
    _require(kind == "default", f"RoPE scaling type {kind!r} on sliding layers "
                                "(rope_parameters.sliding_attention) is not supported")
    local_theta = float(local["rope_theta"]) if "sliding" in fields["layer_attention"] else None
    return fields | _rope(hf, full) | dict(local_rope_theta=local_theta)


def _mixtral(hf: dict[str, Any]) -> Fields:
    return (_llama(hf, norm_eps=1e-5, theta=1_000_000.0)
            | _all_layers_window(hf.get("sliding_window"))
            | dict(num_experts=hf["num_local_experts"],
                   experts_per_token=hf["num_experts_per_tok"],
                   expert_mlp_dim=hf["intermediate_size"], router="softmax_topk",
                   router_renormalize=True, layer_mlp=("moe",)))


def _qwen3_moe(hf: dict[str, Any]) -> Fields:
    layers, step = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1)
    dense = set(hf.get("mlp_only_layers") or [])
    # Hub files say num_experts; transformers 5 writes num_local_experts.
    experts = hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]
    mlp = tuple("moe" if i not in dense and experts > 0 and (i + 1) % step == 0 else "dense"
                for i in range(layers))
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    return (_llama(hf) | _all_layers_window(window) | dict(qk_norm=True, mlp_bias=False)
            | dict(num_experts=experts if "moe" in mlp else 0,
                   experts_per_token=hf["num_experts_per_tok"],
                   expert_mlp_dim=hf["moe_intermediate_size"], router="softmax_topk",
                   router_renormalize=bool(hf.get("norm_topk_prob", False)), layer_mlp=mlp))


_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                     "gelu_fast": "gelu_tanh", "gelu": "gelu"}


def _gpt2(hf: dict[str, Any]) -> Fields:
    act = hf.get("activation_function", "gelu_new")
    _require(act in _GPT2_ACTIVATIONS, f"activation_function {act!r} is not supported")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        _require(not hf.get(flag), f"{flag}=true is not supported")
    _require(hf.get("scale_attn_weights") is not False, "scale_attn_weights=false is not supported")
    embed, heads = hf["n_embd"], hf["n_head"]
    return dict(
        vocab_size=hf["vocab_size"], embed_dim=embed, num_layers=hf["n_layer"], num_heads=heads,
        num_kv_heads=heads, head_dim=embed // heads, mlp_dim=hf.get("n_inner") or 4 * embed,
        max_seq_len=hf["n_positions"], norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation=_GPT2_ACTIVATIONS[act],
        gated_mlp=False, qkv_bias=True, out_bias=True, mlp_bias=True, layer_positions=("none",),
        learned_positions=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


READERS: dict[str, Callable[[dict[str, Any]], Fields]] = {
    "llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3, "phi3": _phi3,
    "smollm3": _smollm3, "gemma2": _gemma2, "gemma3_text": _gemma3, "mixtral": _mixtral,
    "qwen3_moe": _qwen3_moe, "gpt2": _gpt2,
}
SUPPORTED_TYPES = tuple(READERS)
