"""Model configuration: one frozen dataclass for the Llama and GPT-2 families."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import tomllib
from typing import Any

from flaxlm.model.errors import ConfigError

FAMILIES = ("llama", "gpt2")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
DTYPES = ("float32", "bfloat16", "float16")
ROPE_KINDS = ("none", "linear", "llama3")
# Rematerialization of each block in the backward pass: "full" recomputes the whole
# block, "dots" keeps matmul outputs and recomputes the rest, "none" keeps everything.
REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as in HF's `rope_scaling` (linear and llama3 kinds)."""

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if self.kind not in ROPE_KINDS:
            raise ConfigError(f"rope_scaling.kind {self.kind!r} is not one of {ROPE_KINDS}")
        if self.factor <= 0:
            raise ConfigError(f"rope_scaling.factor must be > 0, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of a decoder-only transformer.

    family "llama": RMSNorm, RoPE, SwiGLU MLP (Llama, Mistral, Qwen2, SmolLM2).
    family "gpt2":  LayerNorm with bias, learned absolute positions, GELU MLP,
                    biases on every projection.
    """

    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_seq_len: int
    family: str = "llama"
    norm_eps: float = 1e-5
    activation: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    tie_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        _check_choice("family", self.family, FAMILIES)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("param_dtype", self.param_dtype, DTYPES)
        _check_choice("remat", self.remat, REMAT_POLICIES)
        for name in ("vocab_size", "embed_dim", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "mlp_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})")
        if self.family == "llama" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")

    # Derived properties of the family.
    @property
    def uses_rope(self) -> bool:
        return self.family == "llama"

    @property
    def gated_mlp(self) -> bool:
        return self.family == "llama"

    @property
    def norm_kind(self) -> str:
        return "rmsnorm" if self.family == "llama" else "layernorm"

    @property
    def dense_bias(self) -> bool:
        """Bias on the output projection and MLP (GPT-2 only)."""
        return self.family == "gpt2"

    @property
    def attn_qkv_bias(self) -> bool:
        return self.qkv_bias or self.family == "gpt2"

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["sliding_window"] is None:
            del d["sliding_window"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ConfigError(f"{source}: unknown model setting {key!r}{extra}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in data]
        if missing:
            raise ConfigError(f"{source}: missing model settings {missing}")
        return cls(**data)

    @classmethod
    def from_toml(cls, path) -> ModelConfig:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read model config {path}: {e}") from e
        return cls.from_dict(data.get("model", data), source=str(path))

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """A named preset from `configs/models/NAME.toml`."""
        names = preset_names()
        if name not in names:
            hint = difflib.get_close_matches(name, names, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"unknown model preset {name!r}{extra}; known: {', '.join(names)}")
        return cls.from_toml(_presets_dir() / f"{name}.toml")

    @classmethod
    def smollm2_135m(cls) -> ModelConfig:
        return cls.preset("smollm2-135m")

    @classmethod
    def tiny(cls) -> ModelConfig:
        return cls.preset("tiny-llama")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} {value!r} is not one of {choices}")


def _presets_dir():
    return importlib.resources.files("flaxlm.configs") / "models"


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in _presets_dir().iterdir()
                  if p.name.endswith(".toml"))
