"""LoRA: low-rank adapters on the decoder's projections, as Hugging Face PEFT defines them.

An adapted projection computes `base(x) + dropout(x) @ A @ B * scaling` with A [in..., r]
(Kaiming-uniform, as PEFT's `init_lora_weights=True`) and B [r, out...] (zeros), so a
fresh adapter changes nothing; scaling is alpha / r, or alpha / sqrt(r) with rsLoRA.
The adapter lives inside the projection it adapts (`Einsum.lora`, `QuantEinsum.lora`), so
the projection keeps its parameter path and the adapter's are beside it:

    layers.0.attn.q_proj.kernel   the base weight (float, or int8 with its scales)
    layers.0.attn.q_proj.lora.a   LoraParam float32 [embed, r]
    layers.0.attn.q_proj.lora.b   LoraParam float32 [r, heads, head_dim]

A and B carry the kernel's logical axis names (the rank axis replicated), so the sharding
rules apply unchanged. On an int8 base (flaxlm.model.quant) the adapters stay float: a
frozen int8 model with float adapters, QLoRA-style. Adapter parameters are `LoraParam`
variables, a subclass of `nnx.Param`, so `lora_filter` selects them for differentiation
and the optimizer (`nnx.DiffState(0, lora_filter)`, `nnx.Optimizer(..., wrt=lora_filter)`).

MoE expert kernels ([expert, in, out] stacks) are not adapted: a target that names them
adapts the dense projections of the same name only.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxlm.model.errors import ConfigError
from flaxlm.model.layers import Einsum
from flaxlm.model.moe import ExpertKernel
from flaxlm.model.params import path_name
from flaxlm.model.quant import QuantEinsum, QuantExpertKernel

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraParam(nnx.Param):
    """A LoRA adapter matrix (A or B): what LoRA training differentiates."""


lora_filter = LoraParam  # an nnx filter: the adapter parameters, nothing else


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (scaling alpha / r, or alpha / sqrt(r) with rslora), dropout on the
    adapter's input in training mode, and `targets`: module names (`q_proj`), path suffixes
    (`attn.q_proj`), full paths (`layers.0.attn.q_proj`) or regular expressions over the
    full path (`layers\\.[0-3]\\.attn\\..*`)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    rslora: bool = False
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"LoRA rank must be an int > 0, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"LoRA alpha must be a number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(f"LoRA targets must be non-empty module names or patterns, "
                              f"got {self.targets!r}")
        object.__setattr__(self, "targets", targets)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class LoraAdapter(nnx.Module):
    """x [..., in] -> dropout(x) @ a [in..., r] @ b [r, out...] * scaling, flattened to
    [..., out] (the projection reshapes it)."""

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], in_axes, out_axes,
                 *, rank: int, alpha: float, rslora: bool, dropout: float, dtype,
                 rngs: nnx.Rngs):
        fan_in = int(np.prod(in_shape))
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) on PEFT's [r, in] A
        self.a = LoraParam(jax.random.uniform(rngs.params(), (*in_shape, rank), jnp.float32,
                                              -bound, bound),
                           logical_axes=(*in_axes, None))
        self.b = LoraParam(jnp.zeros((rank, *out_shape), jnp.float32),
                           logical_axes=(None, *out_axes))
        self.rank, self.alpha, self.rslora, self.dtype = rank, alpha, rslora, dtype
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
        # Created switched off: `model.train()` turns it on, `model.eval()` off again. Its
        # stream is always named "dropout", so `nnx.reseed(model, dropout=key)` sets it.
        self.dropout = (nnx.Dropout(dropout, deterministic=True,
                                    rngs=nnx.Rngs(dropout=rngs.dropout()))
                        if dropout > 0 else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.a[...].reshape(-1, self.rank).astype(self.dtype)  # [in, r]
        b = self.b[...].reshape(self.rank, -1).astype(self.dtype)  # [r, out]
        if self.dropout is not None:
            x = self.dropout(x)
        return jnp.matmul(jnp.matmul(x, a), b) * jnp.asarray(self.scaling, self.dtype)

    def delta(self) -> jax.Array:
        """The weight change A @ B * scaling, float32 [in, out] (flattened)."""
        a = self.a[...].reshape(-1, self.rank)
        return a @ self.b[...].reshape(self.rank, -1) * self.scaling


def projections(model: nnx.Module) -> dict[str, Einsum | QuantEinsum]:
    """Every projection LoRA can adapt, by path ("layers.0.attn.q_proj")."""
    return {path_name(p): node for p, node in nnx.iter_graph(model)
            if isinstance(node, (Einsum, QuantEinsum))}


def adapters(model: nnx.Module) -> dict[str, LoraAdapter]:
    """The LoRA adapters of `model`, by the path of the projection each adapts."""
    return {name: node.lora for name, node in projections(model).items()
            if node.lora is not None}


def matches(target: str, path: str) -> bool:
    """PEFT's rule: a name matches a path that equals it or ends in "." + it; a regular
    expression matches a path it matches whole."""
    if path == target or path.endswith("." + target):
        return True
    try:
        return re.fullmatch(target, path) is not None
    except re.error:
        return False


def select(model: nnx.Module, targets: tuple[str, ...]) -> list[str]:
    """The projection paths `targets` match. Every target must match a projection (of the
    default targets, at least one), else a ConfigError lists the projections there are."""
    paths = list(projections(model))
    chosen = [p for p in paths if any(matches(t, p) for t in targets)]
    unmatched = [t for t in targets if not any(matches(t, p) for p in paths)]
    if (unmatched and targets != DEFAULT_TARGETS) or not chosen:
        names = sorted({p.rsplit(".", 1)[-1] for p in paths})
        experts = sorted({path_name(p).rsplit(".", 1)[-1] for p, node in nnx.iter_graph(model)
                          if isinstance(node, (ExpertKernel, QuantExpertKernel))})
        note = (f"; MoE expert kernels ({', '.join(experts)} in MoE layers) are not adapted"
                if experts else "")
        raise ConfigError(
            f"LoRA target {', '.join(map(repr, unmatched or targets))} matches no module; the "
            f"projections are {', '.join(names)} (paths like {paths[0] if paths else '-'})"
            + note)
    return chosen


def apply_lora(model: nnx.Module, cfg: LoraConfig, rngs: nnx.Rngs) -> list[str]:
    """Add a LoRA adapter (A Kaiming-uniform, B zero) to every projection `cfg.targets`
    matches, in place; returns the adapted paths. The model's outputs are unchanged until
    B is trained."""
    chosen = select(model, cfg.targets)
    present = adapters(model)
    if present:
        raise ConfigError(f"the model already has LoRA adapters ({next(iter(present))}, ...); "
                          "merge them (merge_lora) or start from the base model")
    mods = projections(model)
    for path in chosen:
        proj = mods[path]
        in_shape, out_shape, in_axes, out_axes = kernel_layout(proj)
        proj.lora = nnx.data(LoraAdapter(in_shape, out_shape, in_axes, out_axes,
                                         rank=cfg.rank, alpha=cfg.alpha, rslora=cfg.rslora,
                                         dropout=cfg.dropout, dtype=proj.dtype, rngs=rngs))
    return chosen


def kernel_layout(proj: Einsum | QuantEinsum):
    """(in shape, out shape, in axes, out axes) of a projection's weight: Einsum kernels are
    [in..., out...], int8 kernels output-major [out..., in...]."""
    kernel = proj.kernel
    axes = tuple(kernel.get_metadata().get("logical_axes") or (None,) * kernel.ndim)
    shape = tuple(kernel.shape)
    if isinstance(proj, QuantEinsum):
        num_out = proj.scale.ndim - 1
        return shape[num_out:], shape[:num_out], axes[num_out:], axes[:num_out]
    n = proj.num_in
    return shape[:n], shape[n:], axes[:n], axes[n:]


def merge_lora(model: nnx.Module) -> list[str]:
    """Fold every adapter into its float kernel (W + A @ B * scaling, in float32, cast to the
    kernel's dtype) and remove it; returns the merged paths. An int8 base is refused (the
    sum would have to be re-quantized, losing the adapter): serve it unmerged, or load the
    base in float and load the adapter onto that."""
    found = adapters(model)
    mods = projections(model)
    for path in found:
        if isinstance(mods[path], QuantEinsum):
            raise ConfigError(f"cannot merge the LoRA adapter of {path}: its base weight is "
                              "int8, and re-quantizing the sum would lose the adapter; serve "
                              "it unmerged, or load the base in float to merge")
    for path, lora in found.items():
        proj = mods[path]
        kernel = proj.kernel[...]
        merged = kernel.astype(jnp.float32) + lora.delta().reshape(kernel.shape)
        proj.kernel[...] = merged.astype(kernel.dtype)
        proj.lora = None
    return list(found)

