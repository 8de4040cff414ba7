"""Write a tiny HF model as a GGUF file the way llama.cpp's convert_hf_to_gguf.py does.

Test-side, so GGUF files of every architecture can be made offline: per
architecture the metadata keys its converter class writes (TextModel's
set_gguf_parameters and the family's own), HF names mapped with the gguf
package's own tensor-name table, q/k rows permuted for LlamaModel subclasses
(llama, smollm3), 1 added to Gemma's norm weights, Llama 3 `rope_freqs` and
Phi-3's `rope_factors_long/short` tables. Tensors are quantized with the gguf
package's quantizers, one type per HF weight chosen by the caller.
"""

from __future__ import annotations

import math

import gguf
import numpy as np

QT = gguf.GGMLQuantizationType
ARCH_OF = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3_text": "gemma3",
           "phi3": "phi3", "smollm3": "smollm3", "mixtral": "llama", "qwen3_moe": "qwen3moe"}
PERMUTED = ("llama", "smollm3")  # LlamaModel.modify_tensors permutes q/k for these (Mixtral is `llama`)
NORM_PLUS_ONE = ("gemma2", "gemma3")  # Gemma*Model.modify_tensors adds 1 to every norm weight


def llama_cpp_permute(weights, n_head, n_head_kv):
    """convert_hf_to_gguf.py's `permute` (LlamaModel), verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _rope(cfg) -> dict:
    """transformers 5's rope_parameters, full-attention part for Gemma 3 (TextModel.rope_parameters)."""
    params = dict(cfg.rope_parameters or {})
    return dict(params.get("full_attention", params))


def _common(writer: gguf.GGUFWriter, cfg, arch: str) -> None:
    """TextModel.set_gguf_parameters."""
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    rope = _rope(cfg)
    kind = rope.get("rope_type")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif kind == "longrope":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    writer.add_rope_freq_base(rope["rope_theta"])
    sliding = (cfg.rope_parameters or {}).get("sliding_attention")
    if sliding is not None:
        writer.add_rope_freq_base_swa(sliding["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if getattr(cfg, "head_dim", None):  # the converter writes it when config.json has head_dim
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)


def _parameters(writer: gguf.GGUFWriter, cfg, arch: str) -> None:
    if arch == "gemma2":  # Gemma2Model.set_gguf_parameters, which does not call TextModel's
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
        writer.add_sliding_window(cfg.sliding_window)
        return
    if arch == "phi3":  # Phi3MiniModel.set_gguf_parameters
        rope = _rope(cfg)
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * head_dim))
        writer.add_rope_freq_base(rope["rope_theta"])
        writer.add_sliding_window(cfg.sliding_window or 0)
        return
    _common(writer, cfg, arch)
    if arch in PERMUTED:  # LlamaModel.set_gguf_parameters
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_rope_dimension_count(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    if hasattr(cfg, "num_experts_per_tok"):  # TextModel: num_local_experts / num_experts
        writer.add_expert_count(getattr(cfg, "num_local_experts", None) or cfg.num_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
    if arch == "qwen3moe":  # Qwen2MoeModel.set_gguf_parameters
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if arch == "gemma3":
        if cfg.final_logit_softcapping:
            writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
        writer.add_sliding_window(cfg.sliding_window)


def _extra_tensors(cfg, arch: str) -> dict[str, np.ndarray]:
    """LlamaModel's llama3 `rope_freqs` and Phi3MiniModel's LongRoPE factor tables."""
    rope = _rope(cfg)
    if rope.get("rope_type") == "llama3":
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        old, low, high = rope["original_max_position_embeddings"], rope["low_freq_factor"], rope["high_freq_factor"]
        factors = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < old / high:
                factors.append(1)
            elif wavelen > old / low:
                factors.append(rope["factor"])
            else:
                smooth = (old / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
        return {"rope_freqs.weight": np.array(factors, np.float32)}
    if arch == "phi3" and rope.get("long_factor"):
        return {"rope_factors_long.weight": np.array(rope["long_factor"], np.float32),
                "rope_factors_short.weight": np.array(rope["short_factor"], np.float32)}
    return {}


def _tokenizer(writer: gguf.GGUFWriter, vocab_size: int) -> None:
    """A byte-level vocabulary of the model's size (single letters, then placeholders) and one merge."""
    letters = [chr(ord("a") + i) for i in range(26)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(letters + [f"<t{i}>" for i in range(26, vocab_size - 1)] + ["ab"])
    writer.add_token_merges(["a b"])


def gguf_tensors(model, qtype_of) -> dict[str, tuple[np.ndarray, QT]]:
    """GGUF name -> (stored data, type) for every tensor convert_hf_to_gguf writes for `model`."""
    cfg, arch = model.config, ARCH_OF[model.config.model_type]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    out = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and (cfg.tie_word_embeddings or arch == "gemma2"):
            continue  # tied heads are not written (Gemma 2's converter drops it always)
        data = tensor.detach().float().numpy()
        if arch in PERMUTED and hf_name.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
        if arch in PERMUTED and hf_name.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        if arch in NORM_PLUS_ONE and hf_name.endswith("norm.weight"):
            data = data + 1
        qtype = qtype_of(hf_name) if data.ndim >= 2 else QT.F32
        for name, part in _gguf_names(hf_name, data, names):
            out[name] = (gguf.quants.quantize(part, qtype), qtype)
    out |= {name: (table, QT.F32) for name, table in _extra_tensors(cfg, arch).items()}
    return out


def _gguf_names(hf_name: str, data: np.ndarray, names) -> list[tuple[str, np.ndarray]]:
    """GGUF name(s) of one HF tensor: stacked experts [E, 2F, D] are split into gate and up
    (Qwen2MoeModel.modify_tensors), the rest mapped with the gguf package's tensor-name table."""
    if hf_name.endswith("mlp.experts.gate_up_proj"):
        layer = hf_name.split(".")[2]
        gate, up = np.split(data, 2, axis=1)
        return [(f"blk.{layer}.ffn_gate_exps.weight", gate), (f"blk.{layer}.ffn_up_exps.weight", up)]
    if hf_name.endswith("mlp.experts.down_proj"):
        return [(f"blk.{hf_name.split('.')[2]}.ffn_down_exps.weight", data)]
    base, suffix = hf_name.rsplit(".", 1)
    return [(f"{names.get_name(base)}.{suffix}", data)]


def write_like_llama_cpp(model, path, qtype_of=lambda hf_name: QT.F32, tokenizer=_tokenizer):
    """Write `model` (a transformers causal LM) to `path` as convert_hf_to_gguf would; returns `path`."""
    cfg, arch = model.config, ARCH_OF[model.config.model_type]
    writer = gguf.GGUFWriter(path, arch)
    _parameters(writer, cfg, arch)
    for key, value in (("bos", cfg.bos_token_id), ("eos", cfg.eos_token_id), ("pad", cfg.pad_token_id)):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(value)
    tokenizer(writer, cfg.vocab_size)
    for name, (data, qtype) in gguf_tensors(model, qtype_of).items():
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def dequantized(model, qtype_of) -> dict[str, np.ndarray]:
    """The model's state dict as a GGUF of these types holds it: each 2-D weight quantized and back.

    Quantization works within rows, so it commutes with the q/k row permutation;
    this is the reference a GGUF reader must reproduce.
    """
    out = {}
    for name, tensor in model.state_dict().items():
        data = tensor.detach().float().numpy()
        qtype = qtype_of(name) if data.ndim >= 2 else QT.F32
        out[name] = gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype).astype(np.float32)
    return out
