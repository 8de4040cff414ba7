"""Translate between Hugging Face `config.json` dicts and `ModelConfig`."""

from __future__ import annotations

from typing import Any

from flaxlm.model.config import ModelConfig, RopeScaling
from flaxlm.model.errors import CheckpointError

LLAMA_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_TYPES = LLAMA_TYPES + ("gpt2",)
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                     "gelu_fast": "gelu_tanh", "gelu": "gelu"}


def config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise CheckpointError(f"{source}: unsupported model_type {model_type!r}; "
                              f"flaxlm reads {', '.join(SUPPORTED_TYPES)}")
    try:
        if model_type == "gpt2":
            return _gpt2_from_hf(hf, source)
        return _llama_from_hf(hf, source)
    except KeyError as e:
        raise CheckpointError(f"{source}: config is missing the field {e.args[0]!r}") from e


def _llama_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag) and hf["model_type"] == "llama":
            raise CheckpointError(f"{source}: llama with {flag}=true is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported "
                              "for the llama family (only 'silu')")
    heads = hf["num_attention_heads"]
    rope = _rope_from_hf(hf, source)
    return ModelConfig(
        family="llama",
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope[0],
        rope_scaling=rope[1],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=hf["model_type"] == "qwen2",
        sliding_window=_sliding_window(hf, source),
    )


def _rope_from_hf(hf: dict[str, Any], source: str) -> tuple[float, RopeScaling]:
    # transformers >= 5 writes `rope_parameters`; older files `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, RopeScaling()
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            kind="llama3", factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=int(params["original_max_position_embeddings"]))
    raise CheckpointError(f"{source}: RoPE scaling type {kind!r} is not supported "
                          "(default, linear and llama3 are)")


def _sliding_window(hf: dict[str, Any], source: str) -> int | None:
    if hf["model_type"] == "mistral":
        return hf.get("sliding_window")
    if hf["model_type"] == "qwen2" and hf.get("use_sliding_window"):
        raise CheckpointError(f"{source}: qwen2 with use_sliding_window=true is not supported")
    return None


def _gpt2_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        raise CheckpointError(f"{source}: gpt2 activation_function {act!r} is not supported")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise CheckpointError(f"{source}: gpt2 with {flag}=true is not supported")
    if hf.get("scale_attn_weights") is False:
        raise CheckpointError(f"{source}: gpt2 with scale_attn_weights=false is not supported")
    embed, heads = hf["n_embd"], hf["n_head"]
    return ModelConfig(
        family="gpt2",
        vocab_size=hf["vocab_size"],
        embed_dim=embed,
        num_layers=hf["n_layer"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=embed // heads,
        mlp_dim=hf.get("n_inner") or 4 * embed,
        max_seq_len=hf["n_positions"],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=_GPT2_ACTIVATIONS[act],
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def config_to_hf(cfg: ModelConfig, bos_token_id: int | None = None,
                 eos_token_id: int | list[int] | None = None) -> dict[str, Any]:
    """A config.json dict that transformers' AutoConfig reads back as `cfg`."""
    hf = _gpt2_to_hf(cfg) if cfg.family == "gpt2" else _llama_to_hf(cfg)
    hf.update(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
              torch_dtype=cfg.param_dtype, tie_word_embeddings=cfg.tie_embeddings)
    return hf


def _llama_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.qkv_bias and cfg.sliding_window is not None:
        raise CheckpointError("no Hugging Face model_type has both q/k/v bias and a sliding window")
    model_type = "qwen2" if cfg.qkv_bias else "mistral" if cfg.sliding_window else "llama"
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM"}[model_type]
    hf = dict(model_type=model_type, architectures=[arch], vocab_size=cfg.vocab_size,
              hidden_size=cfg.embed_dim, intermediate_size=cfg.mlp_dim,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
              max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
              hidden_act="silu", rope_theta=cfg.rope_theta,
              rope_scaling=_rope_to_hf(cfg.rope_scaling))
    if model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    if model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    return hf


def _rope_to_hf(s: RopeScaling) -> dict[str, Any] | None:
    if s.kind == "none":
        return None
    if s.kind == "linear":
        return {"rope_type": "linear", "factor": s.factor}
    return {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position}


def _gpt2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu"}.get(cfg.activation)
    if act is None or cfg.num_kv_heads != cfg.num_heads or cfg.head_dim * cfg.num_heads != cfg.embed_dim:
        raise CheckpointError("this gpt2-family config has no Hugging Face GPT-2 equivalent "
                              "(needs MHA, head_dim * heads == embed_dim, a GELU activation)")
    return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
                n_embd=cfg.embed_dim, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                n_inner=cfg.mlp_dim, n_positions=cfg.max_seq_len,
                layer_norm_epsilon=cfg.norm_eps, activation_function=act)
