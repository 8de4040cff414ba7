"""Map Hugging Face state-dict tensors to flaxlm parameters and back.

HF stores torch Linear weights as [out, in]; flaxlm stores einsum kernels with
named dimensions, e.g. q_proj [embed, heads, head_dim]. GPT-2 uses Conv1D
([in, out]) and a fused q/k/v projection, split here.
"""

from __future__ import annotations

import numpy as np

from flaxlm.model.config import ModelConfig
from flaxlm.model.errors import CheckpointError


class _Source:
    """Tensors by name; a missing one is an error naming the checkpoint."""

    def __init__(self, tensors: dict[str, np.ndarray], source: str, prefix: str = ""):
        self.tensors, self.source, self.prefix = tensors, source, prefix

    def __call__(self, name: str) -> np.ndarray:
        key = self.prefix + name
        if key not in self.tensors:
            raise CheckpointError(f"{self.source}: missing tensor {key!r}")
        return np.asarray(self.tensors[key])

    def has(self, name: str) -> bool:
        return self.prefix + name in self.tensors

    def reshape(self, x: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
        """Tensor `name` (after any transpose) as `shape`; an error names the checkpoint."""
        if x.size != int(np.prod(shape)):
            raise CheckpointError(f"{self.source}: tensor {self.prefix + name!r} has shape "
                                  f"{x.shape}, which does not fit the config's {shape}")
        return x.reshape(shape)


def params_from_hf(cfg: ModelConfig, tensors: dict[str, np.ndarray], source: str
                   ) -> dict[str, np.ndarray]:
    """flaxlm parameter dict ("layers.0.attn.q_proj.kernel" -> array) from HF tensors."""
    if cfg.family == "gpt2":
        prefix = "transformer." if any(k.startswith("transformer.") for k in tensors) else ""
        get = _Source(tensors, source, prefix)
        return _gpt2_from_hf(cfg, get)
    return _llama_from_hf(cfg, _Source(tensors, source))


def _llama_from_hf(cfg: ModelConfig, get: _Source) -> dict[str, np.ndarray]:
    d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    out = {"embed.embedding": get("model.embed_tokens.weight"),
           "final_norm.scale": get("model.norm.weight")}
    if not cfg.tie_embeddings:
        out["lm_head"] = get("lm_head.weight").T
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        out[ours + "attn_norm.scale"] = get(hf + "input_layernorm.weight")
        out[ours + "mlp_norm.scale"] = get(hf + "post_attention_layernorm.weight")
        for proj, heads in (("q_proj", n), ("k_proj", k), ("v_proj", k)):
            w = get(f"{hf}self_attn.{proj}.weight")  # [heads * h, d]
            out[f"{ours}attn.{proj}.kernel"] = get.reshape(
                w.T, (d, heads, h), f"{hf}self_attn.{proj}.weight")
            if cfg.qkv_bias:
                b = get(f"{hf}self_attn.{proj}.bias")
                out[f"{ours}attn.{proj}.bias"] = get.reshape(
                    b, (heads, h), f"{hf}self_attn.{proj}.bias")
        w = get(hf + "self_attn.o_proj.weight")  # [d, n * h]
        out[ours + "attn.o_proj.kernel"] = get.reshape(w.T, (n, h, d),
                                                       hf + "self_attn.o_proj.weight")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[f"{ours}mlp.{proj}.kernel"] = get(f"{hf}mlp.{proj}.weight").T
    return out


def _gpt2_from_hf(cfg: ModelConfig, get: _Source) -> dict[str, np.ndarray]:
    d, n, h = cfg.embed_dim, cfg.num_heads, cfg.head_dim
    out = {"embed.embedding": get("wte.weight"), "pos_embed": get("wpe.weight"),
           "final_norm.scale": get("ln_f.weight"), "final_norm.bias": get("ln_f.bias")}
    if not cfg.tie_embeddings:
        out["lm_head"] = _Source(get.tensors, get.source)("lm_head.weight").T
    for i in range(cfg.num_layers):
        hf, ours = f"h.{i}.", f"layers.{i}."
        for hf_norm, norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            out[f"{ours}{norm}.scale"] = get(f"{hf}{hf_norm}.weight")
            out[f"{ours}{norm}.bias"] = get(f"{hf}{hf_norm}.bias")
        w = get(hf + "attn.c_attn.weight")  # Conv1D [d, 3 * n * h]
        b = get(hf + "attn.c_attn.bias")
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            cols = slice(j * n * h, (j + 1) * n * h)
            out[f"{ours}attn.{proj}.kernel"] = get.reshape(w[:, cols], (d, n, h),
                                                           hf + "attn.c_attn.weight")
            out[f"{ours}attn.{proj}.bias"] = get.reshape(b[cols], (n, h), hf + "attn.c_attn.bias")
        out[ours + "attn.o_proj.kernel"] = get.reshape(get(hf + "attn.c_proj.weight"), (n, h, d),
                                                       hf + "attn.c_proj.weight")
        out[ours + "attn.o_proj.bias"] = get(hf + "attn.c_proj.bias")
        out[ours + "mlp.up_proj.kernel"] = get(hf + "mlp.c_fc.weight")
        out[ours + "mlp.up_proj.bias"] = get(hf + "mlp.c_fc.bias")
        out[ours + "mlp.down_proj.kernel"] = get(hf + "mlp.c_proj.weight")
        out[ours + "mlp.down_proj.bias"] = get(hf + "mlp.c_proj.bias")
    return out


def params_to_hf(cfg: ModelConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF state dict from flaxlm parameters (the inverse of `params_from_hf`)."""
    p = {k: np.asarray(v) for k, v in params.items()}
    if cfg.family == "gpt2":
        return _gpt2_to_hf(cfg, p)
    return _llama_to_hf(cfg, p)


def _llama_to_hf(cfg: ModelConfig, p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    d = cfg.embed_dim
    out = {"model.embed_tokens.weight": p["embed.embedding"],
           "model.norm.weight": p["final_norm.scale"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"].T
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        out[hf + "input_layernorm.weight"] = p[ours + "attn_norm.scale"]
        out[hf + "post_attention_layernorm.weight"] = p[ours + "mlp_norm.scale"]
        for proj in ("q_proj", "k_proj", "v_proj"):
            kernel = p[f"{ours}attn.{proj}.kernel"]
            out[f"{hf}self_attn.{proj}.weight"] = kernel.reshape(d, -1).T
            if cfg.qkv_bias:
                out[f"{hf}self_attn.{proj}.bias"] = p[f"{ours}attn.{proj}.bias"].reshape(-1)
        out[hf + "self_attn.o_proj.weight"] = p[ours + "attn.o_proj.kernel"].reshape(-1, d).T
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[f"{hf}mlp.{proj}.weight"] = p[f"{ours}mlp.{proj}.kernel"].T
    return out


def _gpt2_to_hf(cfg: ModelConfig, p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    d = cfg.embed_dim
    out = {"transformer.wte.weight": p["embed.embedding"], "transformer.wpe.weight": p["pos_embed"],
           "transformer.ln_f.weight": p["final_norm.scale"],
           "transformer.ln_f.bias": p["final_norm.bias"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"].T
    for i in range(cfg.num_layers):
        hf, ours = f"transformer.h.{i}.", f"layers.{i}."
        for hf_norm, norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            out[f"{hf}{hf_norm}.weight"] = p[f"{ours}{norm}.scale"]
            out[f"{hf}{hf_norm}.bias"] = p[f"{ours}{norm}.bias"]
        qkv = ("q_proj", "k_proj", "v_proj")
        out[hf + "attn.c_attn.weight"] = np.concatenate(
            [p[f"{ours}attn.{x}.kernel"].reshape(d, -1) for x in qkv], axis=1)
        out[hf + "attn.c_attn.bias"] = np.concatenate(
            [p[f"{ours}attn.{x}.bias"].reshape(-1) for x in qkv])
        out[hf + "attn.c_proj.weight"] = p[ours + "attn.o_proj.kernel"].reshape(-1, d)
        out[hf + "attn.c_proj.bias"] = p[ours + "attn.o_proj.bias"]
        out[hf + "mlp.c_fc.weight"] = p[ours + "mlp.up_proj.kernel"]
        out[hf + "mlp.c_fc.bias"] = p[ours + "mlp.up_proj.bias"]
        out[hf + "mlp.c_proj.weight"] = p[ours + "mlp.down_proj.kernel"]
        out[hf + "mlp.c_proj.bias"] = p[ours + "mlp.down_proj.bias"]
    return out
