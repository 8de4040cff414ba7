"""Map Hugging Face state-dict tensors to flaxlm parameters and back.

HF stores torch Linear weights as [out, in]; flaxlm stores einsum kernels with
named dimensions, e.g. q_proj [embed, heads, head_dim]. Every decoder family
but GPT-2 shares Llama's names, with these variations, read from the config
(post-norms mean Gemma's names) or from the tensors present:

- Gemma 2/3: `post_attention_layernorm` is the attention post-norm and
  `pre_feedforward_layernorm` / `post_feedforward_layernorm` surround the MLP.
- Phi-3: fused `qkv_proj` [(heads + 2 kv heads) * h, d] and `gate_up_proj`
  [2 * mlp, d], split on load into q/k/v and gate/up. Split is the layout
  flaxlm keeps: in a decode-shaped step over Phi-3-mini's shapes, separate
  matrices were faster than fused ones in 5 of 6 runs on the (loaded) 2-core
  Xeon, split/fused 0.78-1.10, median 0.91 (scripts/bench_fused_proj.py,
  docs/benchmarks.md); fusing gains nothing measurable, and split keeps one
  layout for every family (per-head sharding, int8 rows, the GGUF Q8_0 path).
- MoE: the router `gate` [experts, d] and per-expert weights, Mixtral's
  `block_sparse_moe.experts.E.w1/w3/w2` or Qwen3-MoE's
  `mlp.experts.E.gate_proj/up_proj/down_proj`, stacked on load into
  [experts, ...] kernels; transformers 5's already stacked `mlp.experts.gate_up_proj`
  / `down_proj` are read too.
GPT-2 uses Conv1D ([in, out]) and a fused q/k/v projection, split here.
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


def _norm_names(cfg: ModelConfig) -> dict[str, str]:
    """flaxlm norm -> HF norm name inside a layer."""
    if cfg.post_attn_norm or cfg.post_mlp_norm:  # Gemma 2/3
        names = {"attn_norm": "input_layernorm", "mlp_norm": "pre_feedforward_layernorm"}
        if cfg.post_attn_norm:
            names["attn_post_norm"] = "post_attention_layernorm"
        if cfg.post_mlp_norm:
            names["mlp_post_norm"] = "post_feedforward_layernorm"
        return names
    return {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


# Expert weight names: (router, per-expert format with {e}, {gate, up, down} names).
_EXPERT_NAMES = {
    "mixtral": ("block_sparse_moe.gate", "block_sparse_moe.experts.{e}.",
                {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}),
    "qwen3_moe": ("mlp.gate", "mlp.experts.{e}.",
                  {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}),
}


def params_from_hf(cfg: ModelConfig, tensors: dict[str, np.ndarray], source: str
                   ) -> dict[str, np.ndarray]:
    """flaxlm parameter dict ("layers.0.attn.q_proj.kernel" -> array) from HF tensors."""
    if "wte.weight" in tensors or "transformer.wte.weight" in tensors:  # GPT-2
        prefix = "transformer." if "transformer.wte.weight" in tensors else ""
        return _gpt2_from_hf(cfg, _Source(tensors, source, prefix))
    get = _Source(tensors, source)
    out = {"embed.embedding": get("model.embed_tokens.weight"),
           "final_norm.scale": get("model.norm.weight")}
    if not cfg.tie_embeddings:
        out["lm_head"] = get("lm_head.weight").T
    for i, mlp_kind in enumerate(cfg.layer_kinds("mlp")):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        for norm, name in _norm_names(cfg).items():
            out[f"{ours}{norm}.scale"] = get(f"{hf}{name}.weight")
        out.update(_attention_from_hf(cfg, get, hf, ours))
        if mlp_kind == "moe":
            out.update(_experts_from_hf(cfg, get, hf, ours))
        else:
            out.update(_mlp_from_hf(cfg, get, hf, ours))
    return out


def _attention_from_hf(cfg: ModelConfig, get: _Source, hf: str, ours: str) -> dict:
    d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    out = {}
    if get.has(hf + "self_attn.qkv_proj.weight"):  # Phi-3: [(n + 2k) * h, d]
        fused = get(hf + "self_attn.qkv_proj.weight")
        weights = dict(zip(("q_proj", "k_proj", "v_proj"),
                           np.split(fused, [n * h, (n + k) * h], axis=0)))
    else:
        weights = {p: get(f"{hf}self_attn.{p}.weight") for p in ("q_proj", "k_proj", "v_proj")}
    for proj, heads in (("q_proj", n), ("k_proj", k), ("v_proj", k)):
        out[f"{ours}attn.{proj}.kernel"] = get.reshape(weights[proj].T, (d, heads, h),
                                                        f"{hf}self_attn.{proj}.weight")
        if cfg.qkv_bias:
            b = get(f"{hf}self_attn.{proj}.bias")
            out[f"{ours}attn.{proj}.bias"] = get.reshape(b, (heads, h), f"{hf}self_attn.{proj}.bias")
    w = get(hf + "self_attn.o_proj.weight")  # [d, n * h]
    out[ours + "attn.o_proj.kernel"] = get.reshape(w.T, (n, h, d), hf + "self_attn.o_proj.weight")
    if cfg.out_bias:
        out[ours + "attn.o_proj.bias"] = get(hf + "self_attn.o_proj.bias")
    if cfg.qk_norm:
        for norm in ("q_norm", "k_norm"):
            out[f"{ours}attn.{norm}.scale"] = get(f"{hf}self_attn.{norm}.weight")
    return out


def _mlp_from_hf(cfg: ModelConfig, get: _Source, hf: str, ours: str) -> dict:
    if get.has(hf + "mlp.gate_up_proj.weight"):  # Phi-3: [2 * mlp, d], gate first
        gate, up = np.split(get(hf + "mlp.gate_up_proj.weight"), 2, axis=0)
        weights = {"gate_proj": gate, "up_proj": up}
    else:
        projs = ("gate_proj", "up_proj") if cfg.gated_mlp else ("up_proj",)
        weights = {p: get(f"{hf}mlp.{p}.weight") for p in projs}
    weights["down_proj"] = get(hf + "mlp.down_proj.weight")
    out = {f"{ours}mlp.{p}.kernel": w.T for p, w in weights.items()}
    if cfg.mlp_bias:
        out.update({f"{ours}mlp.{p}.bias": get(f"{hf}mlp.{p}.bias") for p in weights})
    return out


def _experts_from_hf(cfg: ModelConfig, get: _Source, hf: str, ours: str) -> dict:
    if get.has(hf + "mlp.experts.gate_up_proj"):  # transformers 5's stacked layout
        gate, up = np.split(get(hf + "mlp.experts.gate_up_proj"), 2, axis=1)  # [E, 2F, d]
        stacked = {"gate_proj": gate, "up_proj": up,
                   "down_proj": get(hf + "mlp.experts.down_proj")}       # [E, d, F]
        router = get(hf + "mlp.gate.weight")
    else:
        style = "mixtral" if get.has(hf + "block_sparse_moe.gate.weight") else "qwen3_moe"
        router_name, expert, names = _EXPERT_NAMES[style]
        router = get(f"{hf}{router_name}.weight")
        stacked = {ours_name: np.stack([get(f"{hf}{expert.format(e=e)}{theirs}.weight")
                                        for e in range(cfg.num_experts)])
                   for ours_name, theirs in names.items()}
    out = {f"{ours}mlp.{p}.kernel": w.transpose(0, 2, 1) for p, w in stacked.items()}
    out[ours + "mlp.router"] = router.T  # [d, experts]
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


# ------------------------------------------------------------------ export

def params_to_hf(cfg: ModelConfig, params: dict[str, np.ndarray], model_type: str
                 ) -> dict[str, np.ndarray]:
    """HF state dict of `model_type` (what `config_to_hf` chose) from flaxlm parameters."""
    p = {k: np.asarray(v) for k, v in params.items()}
    if model_type == "gpt2":
        return _gpt2_to_hf(cfg, p)
    out = {"model.embed_tokens.weight": p["embed.embedding"],
           "model.norm.weight": p["final_norm.scale"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"].T
    for i, mlp_kind in enumerate(cfg.layer_kinds("mlp")):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        for norm, name in _norm_names(cfg).items():
            out[f"{hf}{name}.weight"] = p[f"{ours}{norm}.scale"]
        out.update(_attention_to_hf(cfg, p, hf, ours, fused=model_type == "phi3"))
        if mlp_kind == "moe":
            out.update(_experts_to_hf(cfg, p, hf, ours, model_type))
        else:
            out.update(_mlp_to_hf(cfg, p, hf, ours, fused=model_type == "phi3"))
    return out


def _attention_to_hf(cfg: ModelConfig, p: dict, hf: str, ours: str, fused: bool) -> dict:
    d = cfg.embed_dim
    weights = {proj: p[f"{ours}attn.{proj}.kernel"].reshape(d, -1).T
               for proj in ("q_proj", "k_proj", "v_proj")}
    if fused:
        out = {hf + "self_attn.qkv_proj.weight": np.concatenate(list(weights.values()))}
    else:
        out = {f"{hf}self_attn.{proj}.weight": w for proj, w in weights.items()}
    if cfg.qkv_bias:
        out.update({f"{hf}self_attn.{proj}.bias": p[f"{ours}attn.{proj}.bias"].reshape(-1)
                    for proj in weights})
    out[hf + "self_attn.o_proj.weight"] = p[ours + "attn.o_proj.kernel"].reshape(-1, d).T
    if cfg.out_bias:
        out[hf + "self_attn.o_proj.bias"] = p[ours + "attn.o_proj.bias"]
    if cfg.qk_norm:
        for norm in ("q_norm", "k_norm"):
            out[f"{hf}self_attn.{norm}.weight"] = p[f"{ours}attn.{norm}.scale"]
    return out


def _mlp_to_hf(cfg: ModelConfig, p: dict, hf: str, ours: str, fused: bool) -> dict:
    projs = ("gate_proj", "up_proj", "down_proj") if cfg.gated_mlp else ("up_proj", "down_proj")
    weights = {proj: p[f"{ours}mlp.{proj}.kernel"].T for proj in projs}
    if fused:
        gate_up = np.concatenate([weights.pop("gate_proj"), weights.pop("up_proj")])
        weights = {"gate_up_proj": gate_up, **weights}
    out = {f"{hf}mlp.{proj}.weight": w for proj, w in weights.items()}
    if cfg.mlp_bias:
        out.update({f"{hf}mlp.{proj}.bias": p[f"{ours}mlp.{proj}.bias"] for proj in projs})
    return out


def _experts_to_hf(cfg: ModelConfig, p: dict, hf: str, ours: str, model_type: str) -> dict:
    router_name, expert, names = _EXPERT_NAMES[model_type]
    out = {f"{hf}{router_name}.weight": p[ours + "mlp.router"].T}
    for proj, theirs in names.items():
        stacked = p[f"{ours}mlp.{proj}.kernel"]  # [E, in, out]
        for e in range(cfg.num_experts):
            out[f"{hf}{expert.format(e=e)}{theirs}.weight"] = stacked[e].T
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
