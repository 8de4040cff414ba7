"""Building blocks: parameters with logical axis names, projections, norms, the MLP.

Every parameter is an `nnx.Param` whose `logical_axes` metadata names its
dimensions (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, ...);
`flaxlm.model.sharding` maps those names to mesh axes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxlm.model import f32_kernel
from flaxlm.model.errors import ConfigError

Axes = tuple[str | None, ...]


def make_param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: Axes, dtype) -> nnx.Param:
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


def einsum_num_inputs(spec: str) -> int:
    """How many leading kernel axes a projection's einsum spec contracts; the spec must
    be x[..., in...] @ kernel[in..., out...] (the contracted axes end x, in order)."""
    inputs, out = spec.split("->")
    x_spec, k_spec = inputs.split(",")
    contracted = [c for c in k_spec if c in x_spec]
    n = len(contracted)
    if k_spec[:n] != "".join(contracted) or x_spec[len(x_spec) - n:] != k_spec[:n] \
            or out != x_spec[:len(x_spec) - n] + k_spec[n:]:
        raise ConfigError(f"einsum {spec!r} is not x[..., in] @ kernel[in, out]")
    return n


class Einsum(nnx.Module):
    """A projection `einsum(spec, x, kernel) + bias` (gemma's Einsum).

    kernel_shape and kernel_axes describe the weight; bias_shape/bias_axes are
    given only for projections with a bias.
    """

    def __init__(self, spec: str, kernel_shape, kernel_axes: Axes, *, fan_in: int,
                 bias_shape=None, bias_axes: Axes = (), dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.spec = spec
        self.num_in = einsum_num_inputs(spec)  # leading kernel axes contracted
        self.dtype = dtype
        init = jax.nn.initializers.normal(stddev=1.0 / math.sqrt(fan_in))
        self.kernel = make_param(rngs, init, tuple(kernel_shape), kernel_axes, param_dtype)
        self.bias = (make_param(rngs, jax.nn.initializers.zeros, tuple(bias_shape),
                                bias_axes, param_dtype)
                     if bias_shape is not None else None)
        self.lora = None  # a LoRA adapter (flaxlm.model.lora.apply_lora)

    def __call__(self, x: jax.Array) -> jax.Array:
        # One 2-D matmul x[rows, in] @ kernel[in, out], every leading axis of x flattened
        # into rows. Flattening the kernel is free (row-major); flattening x's contracted
        # axes makes XLA lay out the small activation to suit the weight, where a
        # multi-axis einsum let XLA:CPU copy a transposed o_proj weight every decode step
        # (20% of the step). Flattening the leading axes too keeps the weight gradient
        # (rows contracted) a plain 2-D dot: with [batch, seq] rows XLA:CPU wrote every
        # MLP activation gradient transposed for it (14% of a SmolLM2-135M train step).
        kernel = self.kernel[...].astype(self.dtype)
        lead, out = x.shape[:x.ndim - self.num_in], kernel.shape[self.num_in:]
        x2 = x.astype(self.dtype).reshape(-1, math.prod(x.shape[len(lead):]))
        # Few float32 rows (decode) on CPU: flaxlm's kernel (f32_kernel.use_kernel).
        w2 = kernel.reshape(x2.shape[-1], -1)
        f32 = self.kernel[...].dtype == jnp.float32  # not a bfloat16 weight cast up
        y = (f32_kernel.matmul if f32 else jnp.matmul)(x2, w2).reshape(*lead, *out)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x2).reshape(*lead, *out)
        return y


SMALL_HEAD_ROWS = 64  # up to this many rows, `Embedder.attend` uses table @ x.T


class Embedder(nnx.Module):
    """Token embedding table [vocab, embed]; `attend` gives tied output logits."""

    def __init__(self, vocab_size: int, embed_dim: int, *, dtype, param_dtype, rngs):
        self.dtype = dtype
        init = jax.nn.initializers.normal(stddev=0.02)
        self.embedding = make_param(rngs, init, (vocab_size, embed_dim),
                                    ("vocab", "embed"), param_dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output logits: [..., embed] x [vocab, embed] -> [..., vocab] float32."""
        table = self.embedding[...].astype(self.dtype)
        x = x.astype(self.dtype)
        rows = int(np.prod(x.shape[:-1]))
        if rows > SMALL_HEAD_ROWS:  # 2-D rows, as in Einsum: no transposed logits gradient
            logits = jnp.einsum("nd,vd->nv", x.reshape(rows, -1), table,
                                preferred_element_type=jnp.float32)
            return logits.reshape(*x.shape[:-1], -1)
        # Few rows (decode, prefill's last tokens): table @ x.T streams the table as the
        # dot's left operand, 1.1x (1 row) to 1.6x (4 rows) faster on XLA:CPU than x @
        # table.T; the barrier keeps XLA from folding the transpose back into the dot.
        logits = jax.lax.dot_general(table, x.reshape(rows, -1), (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)  # [vocab, rows]
        logits = jax.lax.optimization_barrier(logits).T
        return logits.reshape(*x.shape[:-1], -1)


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """What every norm of a model shares: RMSNorm or LayerNorm, epsilon, weight offset."""

    kind: str = "rmsnorm"
    eps: float = 1e-5
    offset: float = 0.0  # the scale is offset + weight (Gemma: 1 + w)


class Norm(nnx.Module):
    """RMSNorm or LayerNorm with bias over the last axis, computed in float32.

    Without an offset the normalized x is cast to the compute dtype before the
    scale multiplies it (HF Llama); with one, (offset + w) multiplies in float32
    and the product is cast (HF Gemma).
    """

    def __init__(self, dim: int, spec: NormSpec, *, dtype, param_dtype, rngs,
                 axis_name: str = "embed"):
        self.kind, self.eps, self.offset = spec.kind, spec.eps, spec.offset
        self.dtype = dtype
        init = jax.nn.initializers.constant(1.0 - spec.offset)  # an effective scale of 1
        self.scale = make_param(rngs, init, (dim,), (axis_name,), param_dtype)
        self.bias = (make_param(rngs, jax.nn.initializers.zeros, (dim,), (axis_name,),
                                param_dtype)
                     if spec.kind == "layernorm" else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        scale = self.offset + self.scale[...].astype(jnp.float32)
        if self.kind == "layernorm":
            return (x * scale + self.bias[...].astype(jnp.float32)).astype(self.dtype)
        if self.offset:
            return (x * scale).astype(self.dtype)
        # HF casts back to the input dtype before multiplying by the weight.
        return self.scale[...].astype(self.dtype) * x.astype(self.dtype)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class Mlp(nnx.Module):
    """SwiGLU (gate, up, down) or a plain two-layer MLP with biases (GPT-2)."""

    def __init__(self, embed_dim: int, mlp_dim: int, *, gated: bool, bias: bool,
                 activation: str, dtype, param_dtype, rngs):
        self.activation = activation

        def proj(spec, shape, axes, fan_in, bias_dim, bias_axis):
            return Einsum(spec, shape, axes, fan_in=fan_in,
                          bias_shape=(bias_dim,) if bias else None, bias_axes=(bias_axis,),
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        up = ("btd,df->btf", (embed_dim, mlp_dim), ("embed", "mlp"), embed_dim, mlp_dim, "mlp")
        self.gate_proj = proj(*up) if gated else None
        self.up_proj = proj(*up)
        self.down_proj = proj("btf,fd->btd", (mlp_dim, embed_dim), ("mlp", "embed"),
                              mlp_dim, embed_dim, "embed")

    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        if self.gate_proj is not None:
            h = act(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = act(self.up_proj(x))
        return self.down_proj(h)


