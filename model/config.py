"""Model configuration: one frozen dataclass that says what the architecture is.

Every architectural choice is an explicit field that the HF and GGUF readers
set (flaxlm.model.hf_config): the norm and its weight offset, the MLP (gated
or not, its activation, or a mixture of experts), the position scheme of each
layer, q/k norms, sliding windows per layer, soft-capping, the query scale,
embedding scaling and post-norms. Fields are static Python values, so a model
compiles to exactly the operations its architecture needs.

Per-layer fields (`layer_attention`, `layer_positions`, `layer_mlp`) are
patterns repeated over the layers: ("sliding", "full") alternates, Gemma 3's
five local layers and one global are six entries, and a tuple of num_layers
entries spells every layer out. They are stored in their shortest form, so a
config read from HF's explicit per-layer list equals the preset's pattern.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import tomllib
from typing import Any

from flaxlm.model.errors import ConfigError

NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
DTYPES = ("float32", "bfloat16", "float16")
ROPE_KINDS = ("none", "linear", "llama3", "yarn", "longrope")
LAYER_ATTENTION = ("full", "sliding")
LAYER_POSITIONS = ("rope", "none")
LAYER_MLP = ("dense", "moe")
# "softmax_topk": softmax over all experts, then the top k (Mixtral, Qwen3-MoE);
# "topk_softmax": the top k logits, then a softmax over those k.
ROUTERS = ("softmax_topk", "topk_softmax")
# Rematerialization of each block in the backward pass: "full" recomputes the whole
# block, "dots" keeps matmul outputs and recomputes the rest, "none" keeps everything.
REMAT_POLICIES = ("none", "full", "dots")
# `scan_layers` runs the layers as a lax.scan over repeats of the per-layer pattern
# (flaxlm.model.scan), which needs at least this many repeats.
MIN_SCAN_REPEATS = 2


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as HF's `rope_scaling` / `rope_parameters`.

    linear:   every frequency divided by `factor`.
    llama3:   low frequencies divided by `factor`, high ones kept, a smooth ramp between
              (`low_freq_factor`, `high_freq_factor`, `original_max_position`).
    yarn:     interpolated/extrapolated frequencies ramped between `beta_slow` and
              `beta_fast` rotations over `original_max_position`; cos/sin times
              `attention_factor`.
    longrope: Phi-3's per-frequency divisors, `short_factor` while a call's positions
              stay within `original_max_position`, `long_factor` beyond it (as HF
              switches); cos/sin times `attention_factor`.
    """

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()

    def __post_init__(self):
        for name in ("short_factor", "long_factor"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if self.kind not in ROPE_KINDS:
            raise ConfigError(f"rope_scaling.kind {self.kind!r} is not one of {ROPE_KINDS}")
        if self.factor <= 0:
            raise ConfigError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if self.kind == "longrope" and not (self.short_factor and self.long_factor):
            raise ConfigError("rope_scaling.kind 'longrope' needs short_factor and long_factor")
        if self.kind != "longrope" and (self.short_factor or self.long_factor):
            raise ConfigError(f"rope_scaling.short_factor/long_factor are for 'longrope', "
                              f"not {self.kind!r}")
        if self.kind == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError("rope_scaling.high_freq_factor must be > low_freq_factor")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and architecture of a decoder-only transformer (defaults: Llama)."""

    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_seq_len: int
    # Norms: RMSNorm or LayerNorm (with bias); the scale is `norm_offset + weight`
    # (Gemma: 1 + w, multiplied in float32). Post-norms normalize a sublayer's output
    # before the residual add (Gemma 2/3); q/k norms act on each head before RoPE.
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_offset: float = 0.0
    post_attn_norm: bool = False
    post_mlp_norm: bool = False
    qk_norm: bool = False
    # MLP: gated (act(gate) * up, then down) or plain (act(up), then down).
    activation: str = "silu"
    gated_mlp: bool = True
    mlp_bias: bool = False
    # Attention: queries scaled by query_pre_attn_scalar ** -0.5 (None: head_dim);
    # logits soft-capped as cap * tanh(logits / cap) when attn_softcap is set.
    qkv_bias: bool = False
    out_bias: bool = False
    query_pre_attn_scalar: int | None = None
    attn_softcap: float | None = None
    sliding_window: int | None = None
    layer_attention: tuple[str, ...] = ("full",)
    # Positions: RoPE or nothing per layer; a learned absolute table (GPT-2).
    layer_positions: tuple[str, ...] = ("rope",)
    learned_positions: bool = False
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    partial_rotary_factor: float = 1.0
    # Sliding layers' own RoPE base, used unscaled (Gemma 3); None: as the others.
    local_rope_theta: float | None = None
    # Embeddings and output.
    scale_embeddings: bool = False  # token embeddings times sqrt(embed_dim) (Gemma)
    tie_embeddings: bool = False
    final_softcap: float | None = None
    # Mixture of experts (layers whose layer_mlp entry is "moe").
    num_experts: int = 0
    experts_per_token: int = 0
    expert_mlp_dim: int = 0
    router: str = "softmax_topk"
    router_renormalize: bool = False  # top-k weights divided by their sum
    layer_mlp: tuple[str, ...] = ("dense",)
    # How it runs, not what it is.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False  # forward without a cache as a lax.scan (flaxlm.model.scan)

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        for name, choices in (("layer_attention", LAYER_ATTENTION),
                              ("layer_positions", LAYER_POSITIONS), ("layer_mlp", LAYER_MLP)):
            self._set_pattern(name, choices)
        for name, choices in (("norm", NORMS), ("activation", ACTIVATIONS), ("dtype", DTYPES),
                              ("param_dtype", DTYPES), ("remat", REMAT_POLICIES),
                              ("router", ROUTERS)):
            _check_choice(name, getattr(self, name), choices)
        for name in ("vocab_size", "embed_dim", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "mlp_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})")
        for name in ("query_pre_attn_scalar", "attn_softcap", "final_softcap"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be > 0 or unset, got {value}")
        self._check_attention()
        self._check_rope()
        self._check_moe()
        self._check_scan()

    def _set_pattern(self, name: str, choices: tuple[str, ...]) -> None:
        pattern = tuple(getattr(self, name))
        if not pattern or len(pattern) > self.num_layers:
            raise ConfigError(f"{name} needs 1 to num_layers ({self.num_layers}) entries, "
                              f"got {len(pattern)}")
        for value in pattern:
            _check_choice(name, value, choices)
        object.__setattr__(self, name, _shortest(expand(pattern, self.num_layers)))

    def _check_attention(self) -> None:
        sliding = "sliding" in self.layer_attention
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be >= 1 or unset, got {self.sliding_window}")
        if sliding and self.sliding_window is None:
            raise ConfigError("layer_attention has 'sliding' layers but sliding_window is unset")
        if self.sliding_window is not None and not sliding:
            raise ConfigError("sliding_window is set but no layer_attention entry is 'sliding' "
                              "(layer_attention = ['sliding'] windows every layer)")

    def _check_rope(self) -> None:
        if "rope" not in self.layer_positions:
            return
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2 or not self.rotary_dim:
            raise ConfigError(f"RoPE needs an even rotary dimension (head_dim {self.head_dim} x "
                              f"partial_rotary_factor {self.partial_rotary_factor})")
        scaling = self.rope_scaling
        for name in ("short_factor", "long_factor"):
            factors = getattr(scaling, name)
            if factors and len(factors) != self.rotary_dim // 2:
                raise ConfigError(f"rope_scaling.{name} has {len(factors)} entries, the rotary "
                                  f"dimension {self.rotary_dim} needs {self.rotary_dim // 2}")
        if self.local_rope_theta is not None and not any(
                a == "sliding" and p == "rope" for a, p in zip(self.layer_kinds("attention"),
                                                               self.layer_kinds("positions"))):
            raise ConfigError("local_rope_theta is set but no sliding layer uses RoPE")

    def _check_moe(self) -> None:
        if "moe" not in self.layer_mlp:
            if self.num_experts:
                raise ConfigError("num_experts is set but no layer_mlp entry is 'moe'")
            return
        if self.num_experts < 2:
            raise ConfigError(f"'moe' layers need num_experts >= 2, got {self.num_experts}")
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ConfigError(f"experts_per_token must be in [1, num_experts={self.num_experts}],"
                              f" got {self.experts_per_token}")
        if self.expert_mlp_dim < 1:
            raise ConfigError(f"expert_mlp_dim must be >= 1, got {self.expert_mlp_dim}")
        if not self.gated_mlp:
            raise ConfigError("'moe' layers are gated MLPs: gated_mlp must be true")

    def _check_scan(self) -> None:
        if not isinstance(self.scan_layers, bool):
            raise ConfigError(f"scan_layers must be true or false, got {self.scan_layers!r}")
        repeats = self.num_layers // self.layer_period
        if self.scan_layers and repeats < MIN_SCAN_REPEATS:
            raise ConfigError(
                f"scan_layers: the layers differ with a period of {self.layer_period} "
                f"(layer_attention {list(self.layer_attention)}, layer_positions "
                f"{list(self.layer_positions)}, layer_mlp {list(self.layer_mlp)}), so "
                f"{self.num_layers} layers hold {repeats} repeat(s) of the pattern and a scan "
                f"needs {MIN_SCAN_REPEATS}; set scan_layers = false")

    @property
    def layer_period(self) -> int:
        """Layers i and i + layer_period are built alike (their per-layer entries agree)."""
        return math.lcm(len(self.layer_attention), len(self.layer_positions),
                        len(self.layer_mlp))

    @property
    def rotary_dim(self) -> int:
        """Leading dimensions of each head that RoPE rotates."""
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_kinds(self, which: str) -> tuple[str, ...]:
        """Per-layer entries of `layer_attention`, `layer_positions` or `layer_mlp`
        ("attention", "positions", "mlp"), expanded to num_layers."""
        return expand(getattr(self, f"layer_{which}"), self.num_layers)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data (unset optional fields left out, as TOML has no null)."""
        d = dataclasses.asdict(self)
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items() if v is not None}
        d["rope_scaling"] = {k: list(v) if isinstance(v, tuple) else v
                             for k, v in d["rope_scaling"].items()}
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
        try:
            return cls(**data)
        except TypeError as e:  # e.g. a list where a number belongs
            raise ConfigError(f"{source}: {e}") from e

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


def expand(pattern: tuple[str, ...], n: int) -> tuple[str, ...]:
    """`pattern` repeated to n entries."""
    return tuple(pattern[i % len(pattern)] for i in range(n))


def _shortest(layers: tuple[str, ...]) -> tuple[str, ...]:
    """The shortest pattern that repeats to `layers`."""
    for period in range(1, len(layers) + 1):
        if expand(layers[:period], len(layers)) == layers:
            return layers[:period]
    return layers


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} {value!r} is not one of {choices}")


def _presets_dir():
    return importlib.resources.files("flaxlm.configs") / "models"


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in _presets_dir().iterdir()
                  if p.name.endswith(".toml"))


def embed_scale(embed_dim: int) -> float:
    """Gemma's embedding multiplier, sqrt(embed_dim)."""
    return math.sqrt(embed_dim)
