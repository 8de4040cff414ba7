"""Rotary position embeddings: frequencies of every scaling kind, tables, rotation.

Frequencies are computed in numpy float32 in HF's order of operations
(transformers' `modeling_rope_utils`), so angles agree at long positions. A
`RopeTable` holds sin/cos for one call's positions and is shared by every layer
with the same RoPE; `apply_rope` rotates the first `rotary_dim` dimensions of
each head (all of them unless `partial_rotary_factor` < 1) in HF's rotate_half
layout.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from flaxlm.model.config import RopeScaling

F32 = np.float32


def inv_freq(rotary_dim: int, theta: float, scaling: RopeScaling, long: bool = False
             ) -> np.ndarray:
    """Inverse frequencies [rotary_dim // 2]; `long` picks LongRoPE's long factors."""
    exponent = np.arange(0, rotary_dim, 2).astype(F32) / F32(rotary_dim)
    base = F32(theta) ** exponent  # [rotary_dim // 2]
    kind = scaling.kind
    if kind == "longrope":
        factors = np.asarray(scaling.long_factor if long else scaling.short_factor, F32)
        return F32(1.0) / (factors * base)
    if kind == "yarn":
        return _yarn(base, rotary_dim, theta, scaling)
    freq = F32(1.0) / base
    if kind == "linear":
        return freq / F32(scaling.factor)
    if kind == "llama3":
        return _llama3(freq, scaling).astype(F32)
    return freq


def _llama3(freq: np.ndarray, s: RopeScaling) -> np.ndarray:
    low_freq_wavelen = s.original_max_position / s.low_freq_factor
    high_freq_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / freq
    scaled = np.where(wavelen > low_freq_wavelen, freq / s.factor, freq)
    smooth = ((s.original_max_position / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled)


def _yarn(base: np.ndarray, dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    """YaRN: interpolated low frequencies, extrapolated high ones, a linear ramp between."""
    def correction_dim(rotations):
        return (dim * math.log(s.original_max_position / (rotations * 2 * math.pi))
                / (2 * math.log(theta)))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=F32) - F32(low)) / F32(high - low), 0, 1)
    extrapolation = F32(1.0) - ramp
    interpolated = F32(1.0) / (F32(s.factor) * base)
    extrapolated = F32(1.0) / base
    return (interpolated * (F32(1.0) - extrapolation) + extrapolated * extrapolation).astype(F32)


@struct.dataclass
class RopeTable:
    """sin and cos [batch, seq, rotary_dim // 2] of one call's positions."""

    sin: jax.Array
    cos: jax.Array


def rope_table(positions: jax.Array, rotary_dim: int, theta: float,
               scaling: RopeScaling) -> RopeTable:
    """The table for positions [batch, seq]. With LongRoPE the long factors apply when
    the call reaches past original_max_position (max position + 1 over the whole
    call, as HF decides per forward pass)."""
    freq = jnp.asarray(inv_freq(rotary_dim, theta, scaling))
    if scaling.kind == "longrope":
        long = jnp.asarray(inv_freq(rotary_dim, theta, scaling, long=True))
        past = jnp.max(positions) + 1 > scaling.original_max_position
        freq = jnp.where(past, long, freq)
    angles = positions[..., None].astype(jnp.float32) * freq  # [b, t, rotary_dim // 2]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    if scaling.attention_factor != 1.0:
        sin, cos = sin * scaling.attention_factor, cos * scaling.attention_factor
    return RopeTable(sin=sin, cos=cos)


def apply_rope(x: jax.Array, table: RopeTable) -> jax.Array:
    """Rotate the leading rotary dims of x [batch, seq, heads, head_dim]."""
    rot = 2 * table.sin.shape[-1]
    sin, cos = table.sin[:, :, None, :], table.cos[:, :, None, :]
    x1, x2 = jnp.split(x[..., :rot].astype(jnp.float32), 2, axis=-1)
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if rot < x.shape[-1]:
        parts.append(x[..., rot:].astype(jnp.float32))
    return jnp.concatenate(parts, axis=-1).astype(x.dtype)
