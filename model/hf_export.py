"""Write a `ModelConfig` as a Hugging Face `config.json` dict.

The config names no family, so export picks the HF `model_type`: each writer
below spells the config in one type's keys, and the first type in
`EXPORT_ORDER` whose dict reads back (flaxlm.model.hf_config) as exactly the
same config wins. A Llama stays llama, a config with q/k norms becomes qwen3,
Gemma's norms and soft-caps become gemma2 or gemma3_text; a Phi-3 model, whose
fused projections flaxlm splits on load, is written unfused as llama (or
mistral, with its window), which transformers runs with the same logits. A
config no type expresses is an error naming the closest type and what it
cannot express.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flaxlm.model.config import ModelConfig, RopeScaling
from flaxlm.model.errors import CheckpointError
from flaxlm.model.hf_config import config_from_hf

_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "smollm3": "SmolLM3ForCausalLM", "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
    "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
EXPORT_ORDER = tuple(_ARCHITECTURES)
_RUNTIME = dict(dtype="float32", param_dtype="float32", remat="none",
                scan_layers=False)


def config_to_hf(cfg: ModelConfig, bos_token_id: int | None = None,
                 eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None) -> dict[str, Any]:
    """A config.json dict that transformers' AutoConfig reads back as `cfg`. The token
    ids are always written (None included), so no HF class default (Phi-3's pad id
    32000) lands outside a small vocabulary."""
    hf = export_dict(cfg)
    hf.update(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
              torch_dtype=cfg.param_dtype, tie_word_embeddings=cfg.tie_embeddings)
    return hf


def export_dict(cfg: ModelConfig) -> dict[str, Any]:
    wanted = cfg.replace(**_RUNTIME)
    misses = []
    for model_type in EXPORT_ORDER:
        hf = {"model_type": model_type, "architectures": [_ARCHITECTURES[model_type]],
              **_WRITERS[model_type](cfg)}
        try:
            back = config_from_hf(hf, model_type).replace(**_RUNTIME)
        except CheckpointError as e:  # ranks below any type that reads back at all
            misses.append((len(dataclasses.fields(cfg)) + 1, model_type, str(e)))
            continue
        if back == wanted:
            return hf
        diff = _differences(back, wanted)
        misses.append((len(diff), model_type, ", ".join(diff[:3])))
    _, closest, why = min(misses)
    raise CheckpointError(f"no Hugging Face model_type expresses this config; the closest, "
                          f"{closest}, cannot express {why}")


def _differences(got: ModelConfig, wanted: ModelConfig) -> list[str]:
    return [f"{f.name}={getattr(wanted, f.name)!r}" for f in dataclasses.fields(wanted)
            if getattr(got, f.name) != getattr(wanted, f.name)]


# ------------------------------------------------------------------ writers

def _rope_scaling(s: RopeScaling) -> dict[str, Any] | None:
    if s.kind == "none":
        return None
    out: dict[str, Any] = {"rope_type": s.kind, "factor": s.factor}
    if s.kind == "llama3":
        out.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    if s.kind == "yarn":
        out.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
    if s.kind == "longrope":
        out.update(short_factor=list(s.short_factor), long_factor=list(s.long_factor))
    if s.kind in ("yarn", "longrope"):
        out["attention_factor"] = s.attention_factor
    if s.kind != "linear":
        out["original_max_position_embeddings"] = s.original_max_position
    return out


def _base(cfg: ModelConfig) -> dict[str, Any]:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim,
                intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len,
                rms_norm_eps=cfg.norm_eps, hidden_act=_ACTIVATIONS.get(cfg.activation, "silu"),
                rope_theta=cfg.rope_theta, rope_scaling=_rope_scaling(cfg.rope_scaling),
                tie_word_embeddings=cfg.tie_embeddings)


def _layer_types(cfg: ModelConfig) -> list[str]:
    return [f"{kind}_attention" for kind in cfg.layer_kinds("attention")]


def _llama(cfg: ModelConfig) -> dict[str, Any]:
    return _base(cfg) | dict(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)


def _mistral(cfg: ModelConfig) -> dict[str, Any]:
    return _base(cfg) | dict(sliding_window=cfg.sliding_window)


def _qwen(cfg: ModelConfig) -> dict[str, Any]:
    return _base(cfg) | dict(use_sliding_window=cfg.sliding_window is not None,
                             sliding_window=cfg.sliding_window, layer_types=_layer_types(cfg),
                             max_window_layers=cfg.num_layers)


def _qwen3(cfg: ModelConfig) -> dict[str, Any]:
    return _qwen(cfg) | dict(attention_bias=cfg.qkv_bias)


def _smollm3(cfg: ModelConfig) -> dict[str, Any]:
    return _base(cfg) | dict(
        no_rope_layers=[int(p == "rope") for p in cfg.layer_kinds("positions")],
        use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
        layer_types=_layer_types(cfg), attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)


def _phi3(cfg: ModelConfig) -> dict[str, Any]:
    return _base(cfg) | dict(
        sliding_window=cfg.sliding_window, partial_rotary_factor=cfg.partial_rotary_factor,
        original_max_position_embeddings=cfg.rope_scaling.original_max_position
        if cfg.rope_scaling.kind != "none" else cfg.max_seq_len)


def _gemma(cfg: ModelConfig) -> dict[str, Any]:
    out = _base(cfg) | dict(
        hidden_activation=_ACTIVATIONS.get(cfg.activation, "gelu"),
        query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
        sliding_window=cfg.sliding_window, layer_types=_layer_types(cfg),
        attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap,
        attention_bias=cfg.qkv_bias)
    del out["hidden_act"]
    return out


def _gemma3(cfg: ModelConfig) -> dict[str, Any]:
    return _gemma(cfg) | dict(rope_local_base_freq=cfg.local_rope_theta or cfg.rope_theta)


def _mixtral(cfg: ModelConfig) -> dict[str, Any]:
    return _base(cfg) | dict(sliding_window=cfg.sliding_window, num_local_experts=cfg.num_experts,
                             num_experts_per_tok=cfg.experts_per_token)


def _qwen3_moe(cfg: ModelConfig) -> dict[str, Any]:
    kinds = cfg.layer_kinds("mlp")
    return _base(cfg) | dict(
        use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
        attention_bias=cfg.qkv_bias, num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.experts_per_token, moe_intermediate_size=cfg.expert_mlp_dim,
        norm_topk_prob=cfg.router_renormalize, decoder_sparse_step=1,
        mlp_only_layers=[i for i, kind in enumerate(kinds) if kind == "dense"])


def _gpt2(cfg: ModelConfig) -> dict[str, Any]:
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu"}.get(cfg.activation, cfg.activation)
    return dict(vocab_size=cfg.vocab_size, n_embd=cfg.embed_dim, n_layer=cfg.num_layers,
                n_head=cfg.num_heads, n_inner=cfg.mlp_dim, n_positions=cfg.max_seq_len,
                layer_norm_epsilon=cfg.norm_eps, activation_function=act,
                tie_word_embeddings=cfg.tie_embeddings)


_WRITERS: dict[str, Callable[[ModelConfig], dict[str, Any]]] = {
    "llama": _llama, "mistral": _mistral, "qwen2": _qwen, "qwen3": _qwen3, "smollm3": _smollm3,
    "phi3": _phi3, "gemma2": _gemma, "gemma3_text": _gemma3, "mixtral": _mixtral,
    "qwen3_moe": _qwen3_moe, "gpt2": _gpt2,
}
