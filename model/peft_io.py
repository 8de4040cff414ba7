"""Adapters in and out as Hugging Face PEFT directories.

A PEFT directory is `adapter_config.json` + `adapter_model.safetensors`, the tensors named
as PEFT saves them (no adapter name inside):

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   [out, r]
    prompt_embeddings                                                [N, embed]

`save_adapter` writes the LoRA adapters or the soft prompt of a flaxlm model so that
`peft.PeftModel.from_pretrained(hf_model, directory)` loads them onto the HF export of the
base; `load_adapter` puts a PEFT-made (or flaxlm-made) adapter onto a flaxlm model. HF
names map to flaxlm paths as in flaxlm.model.hf_weights (`self_attn` -> `attn`); Phi-3's
fused `qkv_proj` / `gate_up_proj` adapters load split (A shared, B's rows split), which
gives the same outputs. GPT-2's fused Conv1D projections, DoRA, LoRA biases, rank or
alpha patterns and `modules_to_save` are refused with an error that names them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from flaxlm.model.config import ModelConfig
from flaxlm.model.errors import CheckpointError, ConfigError
from flaxlm.model.hf_config import config_from_hf
from flaxlm.model.hf_io import read_json, read_safetensors
from flaxlm.model.lora import LoraConfig, adapters, apply_lora, kernel_layout, projections
from flaxlm.model.prompt_tuning import SoftPrompt, set_prompt

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model
PROMPT_KEY = "prompt_embeddings"
# Config fields whose mismatch with the base named in adapter_config.json is an error.
BASE_FIELDS = ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads",
               "head_dim", "mlp_dim")
_HF_MODULE = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)")


def hf_module(path: str) -> str:
    """flaxlm projection path -> HF module name: layers.0.attn.q_proj -> model.layers.0.self_attn.q_proj."""
    layer, block, proj = path.removeprefix("layers.").split(".")
    return f"model.layers.{layer}.{'self_attn' if block == 'attn' else block}.{proj}"


def flaxlm_path(module: str) -> str | None:
    m = _HF_MODULE.fullmatch(module)
    if m is None:
        return None
    return f"layers.{m[1]}.{'attn' if m[2] == 'self_attn' else 'mlp'}.{m[3]}"


# ------------------------------------------------------------------ save

def save_adapter(model: nnx.Module, directory: str | os.PathLike, *,
                 base_model_name_or_path: str, overwrite: bool = False) -> Path:
    """Write the model's LoRA adapters or soft prompt as a PEFT directory; an existing
    adapter there is replaced only with overwrite=True."""
    _check_peft_family(model.config)
    found, prompt = adapters(model), model.soft_prompt
    if found and prompt is not None:
        raise ConfigError("the model has both LoRA adapters and a soft prompt; a PEFT "
                          "directory holds one adapter")
    if not found and prompt is None:
        raise ConfigError("the model has no adapter to save (no LoRA adapters, no soft prompt)")
    directory = Path(directory)
    existing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if (directory / f).exists()]
    if existing and not overwrite:
        raise CheckpointError(f"{directory}: already holds {existing[0]}; pass overwrite=True "
                              "(--overwrite) to replace it")
    if found:
        config, tensors = _lora_out(model, found)
    else:
        config, tensors = _prompt_out(model.config, prompt, str(base_model_name_or_path))
    config = {"base_model_name_or_path": str(base_model_name_or_path), "revision": None,
              "task_type": "CAUSAL_LM", "inference_mode": True, **config}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
                  str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        with open(directory / CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
    except OSError as e:
        raise CheckpointError(f"{directory}: cannot write ({e})") from e
    return directory


def _lora_out(model: nnx.Module, found: dict) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    settings = {(a.rank, a.alpha, a.rslora) for a in found.values()}
    if len(settings) > 1:
        raise ConfigError(f"the adapters differ in (rank, alpha, rslora): {sorted(settings)}; "
                          "a PEFT directory without rank_pattern holds one setting")
    (rank, alpha, rslora), = settings
    dropouts = {a.dropout.rate if a.dropout is not None else 0.0 for a in found.values()}
    tensors = {}
    for path, lora in found.items():
        key = PREFIX + hf_module(path)
        tensors[key + ".lora_A.weight"] = np.asarray(lora.a[...]).reshape(-1, rank).T
        tensors[key + ".lora_B.weight"] = np.asarray(lora.b[...]).reshape(rank, -1).T
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
              "lora_dropout": max(dropouts), "target_modules": _target_modules(model, found),
              "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
              "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
              "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False}
    return config, tensors


def _target_modules(model: nnx.Module, found: dict) -> list[str] | str:
    """Module names (["q_proj", "v_proj"]) when they select exactly the adapted modules,
    else a regular expression PEFT matches whole against exactly their HF names."""
    names = sorted({p.rsplit(".", 1)[-1] for p in found})
    same_names = {p for p in projections(model) if p.rsplit(".", 1)[-1] in names}
    if same_names == set(found):
        return names
    return "(" + "|".join(re.escape(hf_module(p)) for p in found) + ")"


def _prompt_out(cfg: ModelConfig, prompt: SoftPrompt, base: str):
    text = prompt.init == "text"  # PEFT wants the tokenizer of a text init: the base's
    config = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": prompt.num_tokens,
              "token_dim": cfg.embed_dim, "num_transformer_submodules": 1,
              "num_attention_heads": cfg.num_heads, "num_layers": cfg.num_layers,
              "prompt_tuning_init": "TEXT" if text else "RANDOM",
              "prompt_tuning_init_text": prompt.init_text if text else None,
              "tokenizer_name_or_path": base if text else None}
    return config, {PROMPT_KEY: np.asarray(prompt.embedding[...])}


# ------------------------------------------------------------------ load

def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(adapter_config.json, tensors) of a PEFT directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not an adapter directory")
    weights = directory / WEIGHTS_FILE
    if not weights.exists():
        pickled = directory / "adapter_model.bin"
        raise CheckpointError(
            f"{directory}: no {WEIGHTS_FILE}" + (" (adapter_model.bin is a pickle, which flaxlm "
                                                 "never reads)" if pickled.exists() else ""))
    return read_json(directory / CONFIG_FILE), read_safetensors([weights])


def load_adapter(model: nnx.Module, directory: str | os.PathLike,
                 rngs: nnx.Rngs | None = None) -> str:
    """Put the PEFT adapter in `directory` onto `model`, in place; returns "lora" or
    "prompt". Every tensor is checked against the model before anything changes."""
    config, tensors = read_adapter(directory)
    source = str(Path(directory) / WEIGHTS_FILE)
    kind = config.get("peft_type")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise CheckpointError(f"{directory}: task_type {config.get('task_type')!r}, flaxlm "
                              "loads CAUSAL_LM adapters")
    _check_base(model.config, config, directory)
    if kind == "LORA":
        _load_lora(model, config, tensors, source, rngs or nnx.Rngs(0))
        return "lora"
    if kind == "PROMPT_TUNING":
        _load_prompt(model, config, tensors, source)
        return "prompt"
    raise CheckpointError(f"{directory}: peft_type {kind!r}; flaxlm loads LORA and "
                          "PROMPT_TUNING adapters")


def _check_base(cfg: ModelConfig, config: dict, directory) -> None:
    """When base_model_name_or_path is a local HF directory, its shapes must be the model's."""
    base = config.get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        return  # a hub name: there is nothing offline to compare; the tensors are checked
    theirs = config_from_hf(read_json(Path(base) / "config.json"), str(base))
    for name in BASE_FIELDS:
        if getattr(theirs, name) != getattr(cfg, name):
            raise CheckpointError(
                f"{directory}: the adapter's base {base} has {name}={getattr(theirs, name)}, "
                f"the model has {name}={getattr(cfg, name)}")


def _unsupported(config: dict, directory: str) -> None:
    checks = (("use_dora", lambda v: bool(v), "DoRA"),
              ("bias", lambda v: v not in (None, "none"), "LoRA biases"),
              ("lora_bias", lambda v: bool(v), "LoRA biases"),
              ("modules_to_save", lambda v: bool(v), "modules_to_save (full copies of modules)"),
              ("rank_pattern", lambda v: bool(v), "per-module ranks (rank_pattern)"),
              ("alpha_pattern", lambda v: bool(v), "per-module alphas (alpha_pattern)"))
    for key, bad, what in checks:
        if bad(config.get(key)):
            raise CheckpointError(f"{directory}: {key}={config[key]!r}: {what} are not supported")


def _load_lora(model, config: dict, tensors: dict, source: str, rngs: nnx.Rngs) -> None:
    _check_peft_family(model.config)
    _unsupported(config, source)
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise CheckpointError(f"{source}: adapter_config.json has r={rank!r}, not a rank > 0")
    pairs = _lora_pairs(_split_fused(model.config, tensors, source), source)
    mods = projections(model)
    for path, (a_key, a, b_key, b) in pairs.items():
        if path not in mods:
            raise CheckpointError(f"{source}: tensor {a_key} adapts {hf_module(path)}, which "
                                  f"this model ({model.config.num_layers} layers) does not have")
        in_shape, out_shape, _, _ = kernel_layout(mods[path])
        n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
        for key, value, want in ((a_key, a, (rank, n_in)), (b_key, b, (n_out, rank))):
            if tuple(value.shape) != want:
                raise CheckpointError(f"{source}: tensor {key} has shape {tuple(value.shape)}, "
                                      f"the model needs {want}")
    try:
        lora_cfg = LoraConfig(rank=rank, alpha=config.get("lora_alpha", 8),
                              dropout=float(config.get("lora_dropout") or 0.0),
                              rslora=bool(config.get("use_rslora")), targets=tuple(pairs))
    except ConfigError as e:
        raise CheckpointError(f"{source}: adapter_config.json: {e}") from None
    apply_lora(model, lora_cfg, rngs)
    for path, lora in adapters(model).items():
        _, a, _, b = pairs[path]
        lora.a[...] = np.asarray(a, np.float32).T.reshape(lora.a.shape)
        lora.b[...] = np.asarray(b, np.float32).T.reshape(lora.b.shape)


def _lora_pairs(tensors: dict, source: str) -> dict[str, tuple]:
    """{flaxlm path: (A key, A [r, in], B key, B [out, r])}; an unknown tensor is named."""
    pairs: dict[str, dict] = {}
    for key, value in tensors.items():
        m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_([AB])\.weight", key)
        path = flaxlm_path(m[1]) if m else None
        if path is None:
            raise CheckpointError(f"{source}: tensor {key} is not a LoRA matrix of a decoder "
                                  "projection (self_attn or mlp of model.layers.N)")
        pairs.setdefault(path, {})[m[2]] = (key, value)
    out = {}
    for path, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            have, = ab.values()
            raise CheckpointError(f"{source}: tensor {have[0]} has no "
                                  f"lora_{'B' if 'A' in ab else 'A'} partner")
        out[path] = (*ab["A"], *ab["B"])
    return out


def _split_fused(cfg: ModelConfig, tensors: dict, source: str) -> dict:
    """Phi-3's fused qkv_proj / gate_up_proj adapters as q/k/v and gate/up adapters: the
    same A for each, B's rows split as the fused weight is."""
    q, kv, f = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.mlp_dim
    splits = {"self_attn.qkv_proj": {"q_proj": q, "k_proj": kv, "v_proj": kv},
              "mlp.gate_up_proj": {"gate_proj": f, "up_proj": f}}
    out = {}
    for key, value in tensors.items():
        fused = next((name for name in splits if f".{name}.lora_" in key), None)
        if fused is None:
            out[key] = value
            continue
        rows = splits[fused]
        block = fused.split(".")[0]
        if ".lora_A." in key:
            parts = [value] * len(rows)
        elif value.ndim == 2 and value.shape[0] == sum(rows.values()):
            parts = np.split(value, np.cumsum(list(rows.values()))[:-1], axis=0)
        else:
            raise CheckpointError(f"{source}: tensor {key} has shape {tuple(value.shape)}, the "
                                  f"model needs ({sum(rows.values())}, r)")
        for name, part in zip(rows, parts):
            out[key.replace(fused, f"{block}.{name}")] = part
    return out


def _load_prompt(model, config: dict, tensors: dict, source: str) -> None:
    if set(tensors) != {PROMPT_KEY}:
        extra = sorted(set(tensors) - {PROMPT_KEY}) or [PROMPT_KEY + " (missing)"]
        raise CheckpointError(f"{source}: a prompt-tuning adapter holds only {PROMPT_KEY}; "
                              f"found {extra[0]}")
    table = np.asarray(tensors[PROMPT_KEY], np.float32)
    n = config.get("num_virtual_tokens")
    if config.get("num_transformer_submodules", 1) != 1:
        raise CheckpointError(f"{source}: num_transformer_submodules="
                              f"{config['num_transformer_submodules']}; a decoder-only model has 1")
    want = (n, model.config.embed_dim)
    if table.shape != want:
        raise CheckpointError(f"{source}: tensor {PROMPT_KEY} has shape {table.shape}, the "
                              f"model needs {want}")
    if model.soft_prompt is not None:
        raise ConfigError("the model already has a soft prompt")
    init = "text" if config.get("prompt_tuning_init") == "TEXT" else "random"
    set_prompt(model, SoftPrompt(table, init, config.get("prompt_tuning_init_text")))


def _check_peft_family(cfg: ModelConfig) -> None:
    if cfg.learned_positions:
        raise ConfigError("PEFT adapters of GPT-2 models (fused Conv1D c_attn) are not "
                          "supported; LoRA on GPT-2 works inside flaxlm but is not exported")
