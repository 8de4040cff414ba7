"""Int8 weights as modules: drop-in `QuantEinsum` / `QuantEmbedder`, and `quantize`.

A quantized model keeps every parameter path of the float model and adds the
scales beside the int8 values (gemma's IntDense):

    layers.0.attn.q_proj.kernel  int8    [heads, head_dim, embed]   (output-major)
    layers.0.attn.q_proj.scale   float32 [heads, head_dim, groups]
    embed.embedding              int8    [vocab, embed]
    embed.scale                  float32 [vocab, groups]
    lm_head                      int8    [vocab, embed]             (untied heads)
    lm_head_scale                float32 [vocab, groups]
    layers.0.mlp.gate_proj.kernel int8   [expert, mlp, embed]       (MoE experts)
    layers.0.mlp.gate_proj.scale float32 [expert, mlp, groups]

Kernels are stored output-major (the float kernel's input axes moved last),
with their logical axis names permuted alike, so sharding rules apply
unchanged; see `flaxlm.model.int8` for why (the CPU matmul streams rows).
groups is 1 for per-output-channel scales, K / 32 for GGUF Q8_0 blocks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxlm.model.config import ModelConfig
from flaxlm.model.decoder import Decoder
from flaxlm.model.errors import CheckpointError, ConfigError
from flaxlm.model.int8 import dequantize, int8_matmul, quantize_rows
from flaxlm.model.layers import Einsum, Embedder
from flaxlm.model.moe import ExpertKernel
from flaxlm.model.params import fill_model, flat_params, path_name


class QuantEinsum(nnx.Module):
    """`Einsum` with an int8 kernel [out..., in...] and float32 scales [out..., groups]."""

    def __init__(self, spec: str, kernel: jax.Array, kernel_axes, scale: jax.Array,
                 bias: nnx.Param | None, dtype):
        self.spec = spec
        self.dtype = dtype
        self.kernel = nnx.Param(kernel, logical_axes=tuple(kernel_axes))
        num_out = scale.ndim - 1
        self.scale = nnx.Param(scale, logical_axes=tuple(kernel_axes[:num_out]) + (None,))
        self.bias = bias
        self.lora = None  # float LoRA adapter over the frozen int8 weight (flaxlm.model.lora)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, scale = self.kernel[...], self.scale[...]
        out_shape = kernel.shape[:scale.ndim - 1]
        num_in = kernel.ndim - len(out_shape)
        lead = x.shape[:x.ndim - num_in]
        n = int(np.prod(out_shape))
        x2 = x.astype(self.dtype).reshape(*lead, -1)
        y = int8_matmul(x2, kernel.reshape(n, -1), scale.reshape(n, -1))
        y = y.astype(self.dtype).reshape(*lead, *out_shape)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x2).reshape(*lead, *out_shape)
        return y


class QuantExpertKernel(nnx.Module):
    """`ExpertKernel` with int8 kernels [expert, out, in] and float32 scales [expert, out, groups]."""

    def __init__(self, kernel: jax.Array, kernel_axes, scale: jax.Array, dtype):
        self.dtype = dtype
        self.kernel = nnx.Param(kernel, logical_axes=tuple(kernel_axes))
        self.scale = nnx.Param(scale, logical_axes=tuple(kernel_axes[:2]) + (None,))

    def one(self, e: jax.Array, x: jax.Array) -> jax.Array:
        """x [T, in] through expert e -> [T, out]: only that expert's int8 rows are read."""
        q = jax.lax.dynamic_index_in_dim(self.kernel[...], e, keepdims=False)
        scale = jax.lax.dynamic_index_in_dim(self.scale[...], e, keepdims=False)
        return int8_matmul(x.astype(self.dtype), q, scale).astype(self.dtype)

    def all(self, x: jax.Array) -> jax.Array:
        """x [T, in] or [expert, T, in] through every expert -> [expert, T, out]."""
        w = jax.vmap(lambda q, s: dequantize(q, s, self.dtype))(self.kernel[...], self.scale[...])
        spec = "ti,eoi->eto" if x.ndim == 2 else "eti,eoi->eto"
        return jnp.einsum(spec, x.astype(self.dtype), w)


class QuantEmbedder(nnx.Module):
    """`Embedder` with an int8 table [vocab, embed] and float32 scales [vocab, groups]."""

    def __init__(self, embedding: jax.Array, scale: jax.Array, dtype):
        self.dtype = dtype
        self.embedding = nnx.Param(embedding, logical_axes=("vocab", "embed"))
        self.scale = nnx.Param(scale, logical_axes=("vocab", None))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        rows = jnp.take(self.embedding[...], tokens.reshape(-1), axis=0)  # [tokens, embed]
        scales = jnp.take(self.scale[...], tokens.reshape(-1), axis=0)    # [tokens, groups]
        return dequantize(rows, scales, self.dtype).reshape(*tokens.shape, -1)

    def attend(self, x: jax.Array) -> jax.Array:
        # [..., embed] x [vocab, embed] -> [..., vocab]
        return int8_matmul(x.astype(self.dtype), self.embedding[...], self.scale[...])


@dataclasses.dataclass(frozen=True)
class Target:
    """One quantizable weight: where its int8 values and scales live, and how the
    float layout maps to the output-major int8 layout."""

    kernel: str               # parameter path of the values
    scale: str                # parameter path of the scales
    perm: tuple[int, ...]     # float layout -> int8 layout
    num_in: int               # trailing input axes in the int8 layout


def is_quantized(model: nnx.Module) -> bool:
    return _first_int8(model) is not None


def _first_int8(model: nnx.Module) -> str | None:
    for name, value in flat_params(model).items():
        if value.dtype == jnp.int8:
            return name
    return None


def targets(config: ModelConfig, embeddings: bool = True) -> list[Target]:
    """The weights `quantize` turns into int8: every projection kernel (MoE experts
    included; routers stay float, as their top-k choice is what int8 would disturb
    most), plus the token embedding and an untied LM head when `embeddings`."""
    model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    found = []
    for path, node in nnx.iter_graph(model):
        name = path_name(path)
        if isinstance(node, Einsum):
            ndim, num_in = len(node.kernel.shape), node.num_in
            perm = tuple(range(num_in, ndim)) + tuple(range(num_in))
            found.append(Target(name + ".kernel", name + ".scale", perm, num_in))
        elif isinstance(node, ExpertKernel):  # [expert, in, out] -> [expert, out, in]
            found.append(Target(name + ".kernel", name + ".scale", (0, 2, 1), 1))
    if embeddings:
        found.append(Target("embed.embedding", "embed.scale", (0, 1), 1))
        if model.lm_head is not None:
            found.append(Target("lm_head", "lm_head_scale", (1, 0), 1))
    return found


def int8_abstract(config: ModelConfig, groups: dict[str, int]) -> Decoder:
    """The model with the weights named in `groups` (kernel path -> scale groups)
    int8, as ShapeDtypeStructs: nothing is allocated."""
    chosen = [t for t in targets(config) if t.kernel in groups]

    def build():
        model = Decoder(config, rngs=nnx.Rngs(0))
        for target in chosen:
            _swap(model, target, groups[target.kernel])
        return model

    return nnx.eval_shape(build)


def _swap(model: Decoder, target: Target, num_groups: int) -> None:
    """Replace the float weight of `target` by zero int8 values and scales (traced abstractly)."""
    dtype = jnp.dtype(model.config.dtype)
    if target.kernel == "lm_head":
        vocab_embed = (model.config.vocab_size, model.config.embed_dim)
        model.lm_head = nnx.Param(jnp.zeros(vocab_embed, jnp.int8), logical_axes=("vocab", "embed"))
        model.lm_head_scale = nnx.data(nnx.Param(
            jnp.zeros((vocab_embed[0], num_groups), jnp.float32), logical_axes=("vocab", None)))
        return
    if target.kernel == "embed.embedding":
        shape = model.embed.embedding.shape
        model.embed = QuantEmbedder(jnp.zeros(shape, jnp.int8),
                                    jnp.zeros((shape[0], num_groups), jnp.float32), dtype)
        return
    parent, name = _parent(model, target.kernel.removesuffix(".kernel"))
    float_einsum: Einsum | ExpertKernel = getattr(parent, name)
    axes = float_einsum.kernel.get_metadata()["logical_axes"]
    if isinstance(float_einsum, ExpertKernel):
        shape = tuple(float_einsum.kernel.shape[i] for i in target.perm)
        setattr(parent, name, QuantExpertKernel(
            jnp.zeros(shape, jnp.int8), tuple(axes[i] for i in target.perm),
            jnp.zeros(shape[:2] + (num_groups,), jnp.float32), float_einsum.dtype))
        return
    shape = tuple(float_einsum.kernel.shape[i] for i in target.perm)
    scale_shape = shape[:len(shape) - target.num_in] + (num_groups,)
    setattr(parent, name, QuantEinsum(
        float_einsum.spec, jnp.zeros(shape, jnp.int8), tuple(axes[i] for i in target.perm),
        jnp.zeros(scale_shape, jnp.float32), float_einsum.bias, float_einsum.dtype))


def _parent(model: nnx.Module, path: str):
    *parents, name = path.split(".")
    node = model
    for part in parents:
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node, name


def int8_model(config: ModelConfig, params: dict[str, np.ndarray], source: str, *,
               given: dict[str, np.ndarray] | None = None, embeddings: bool = True) -> Decoder:
    """An int8 model from float-layout parameters (as `build_model` takes them).

    Each target weight is quantized per output channel, except those already
    int8 in `params` (e.g. GGUF Q8_0 rows), whose scales [out, groups] are
    `given[kernel path]`.
    """
    given = given or {}
    chosen = targets(config, embeddings)
    groups = {t.kernel: given[t.kernel].shape[-1] if t.kernel in given else 1 for t in chosen}
    abstract = int8_abstract(config, groups)
    shapes = {name: v.shape for name, v in flat_params(abstract).items()}
    out = dict(params)
    for target in chosen:
        value = np.asarray(params[target.kernel]).transpose(target.perm)
        rows = int(np.prod(value.shape[:value.ndim - target.num_in]))
        if target.kernel in given:
            q, scale = _checked_int8(value, given[target.kernel], target, source)
        else:
            q, scale = quantize_rows(value.reshape(rows, -1).astype(np.float32))
        out[target.kernel] = np.asarray(q).reshape(shapes[target.kernel])
        out[target.scale] = np.asarray(scale).reshape(shapes[target.scale])
    return fill_model(abstract, out, source)


def _checked_int8(q: np.ndarray, scale: np.ndarray, target: Target, source: str):
    if q.dtype != np.int8:
        raise CheckpointError(f"{source}: {target.kernel} has scales but dtype {q.dtype}, not int8")
    return q, np.asarray(scale, np.float32)


def quantize(model: Decoder, *, embeddings: bool = True) -> Decoder:
    """A new model with int8 weights (symmetric, per output channel): every
    projection, and the token embedding and LM head unless `embeddings=False`.
    The float model is left as it is."""
    name = _first_int8(model)
    if name is not None:
        raise ConfigError(f"cannot quantize: {name} is already int8 (the model is quantized)")
    params = {k: np.asarray(v) for k, v in flat_params(model).items()}
    return int8_model(model.config, params, "quantize", embeddings=embeddings)


def load_int8_tensors(config: ModelConfig, tensors: dict[str, np.ndarray], source: str
                      ) -> Decoder:
    """An int8 model from a flaxlm int8 checkpoint's tensors (int8 layout, scales
    beside the values), after checking that every int8 tensor has matching scales."""
    groups = {}
    for target in targets(config):
        if target.kernel in tensors and np.asarray(tensors[target.kernel]).dtype == np.int8:
            groups[target.kernel] = _scale_groups(tensors, target, source)
        elif target.scale in tensors:
            raise CheckpointError(f"{source}: {target.scale} is present but {target.kernel} "
                                  "is not int8")
    return fill_model(int8_abstract(config, groups), tensors, source)


def _scale_groups(tensors: dict[str, np.ndarray], target: Target, source: str) -> int:
    """The scale groups of one int8 tensor; the error names the tensor when the
    scales do not fit its values."""
    if target.scale not in tensors:
        raise CheckpointError(f"{source}: {target.kernel} is int8 but {target.scale} is missing")
    kernel, scale = tensors[target.kernel], tensors[target.scale]
    out_shape = tuple(kernel.shape[:kernel.ndim - target.num_in])
    k = int(np.prod(kernel.shape[kernel.ndim - target.num_in:]))
    groups = scale.shape[-1] if scale.ndim else 0
    if (tuple(scale.shape[:-1]) != out_shape or groups < 1 or k % groups
            or np.dtype(scale.dtype) != np.float32):
        raise CheckpointError(
            f"{source}: scales {target.scale} {scale.dtype}{list(scale.shape)} do not match "
            f"{target.kernel} {list(kernel.shape)}: expected float32 {list(out_shape)} + "
            f"[groups], groups dividing {k}")
    return groups


def dequantize_model(model: Decoder) -> Decoder:
    """The float model whose weights are exactly the int8 model's (values times scales)."""
    params = {k: np.asarray(v) for k, v in flat_params(model).items()}
    out = {}
    for target in targets(model.config):
        if target.kernel not in params or params[target.kernel].dtype != np.int8:
            continue
        q, scale = params.pop(target.kernel), params.pop(target.scale)
        rows = int(np.prod(scale.shape[:-1]))
        w = np.asarray(dequantize(jnp.asarray(q.reshape(rows, -1)), jnp.asarray(scale.reshape(rows, -1))))
        out[target.kernel] = w.reshape(q.shape).transpose(np.argsort(target.perm))
    return fill_model(nnx.eval_shape(lambda: Decoder(model.config, rngs=nnx.Rngs(0))),
                      params | out, "dequantize_model")
