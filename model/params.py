"""Flat views of a model's parameters: build a model from arrays, list, count."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxlm.model.config import ModelConfig
from flaxlm.model.decoder import Decoder
from flaxlm.model.errors import CheckpointError


def path_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def abstract_model(config: ModelConfig) -> Decoder:
    """The model with ShapeDtypeStructs for parameters: nothing is allocated."""
    return nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))


def flat_params(model: nnx.Module) -> dict[str, jax.Array]:
    """{"layers.0.attn.q_proj.kernel": array, ...} for every parameter."""
    state = nnx.state(model, nnx.Param)
    return {path_name(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def build_model(config: ModelConfig, params: dict[str, np.ndarray], source: str) -> Decoder:
    """A Decoder whose parameters are `params` (cast to config.param_dtype).

    Every parameter must be present with its exact shape; the error names the
    tensor and `source` (the file it came from).
    """
    return fill_model(abstract_model(config), params, source)


def fill_model(abstract: nnx.Module, params: dict[str, np.ndarray], source: str) -> nnx.Module:
    """`abstract` (parameters as ShapeDtypeStructs) with the values of `params`,
    each cast to its parameter's dtype; errors name the tensor and `source`."""
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    missing = [path_name(p) for p, _ in flat if path_name(p) not in params]
    if missing:
        raise CheckpointError(f"{source}: missing tensors for {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    leaves = []
    for path, var in flat:
        name = path_name(path)
        value = params[name]
        if tuple(value.shape) != tuple(var.get_value().shape):
            raise CheckpointError(
                f"{source}: tensor for {name} has shape {tuple(value.shape)}, "
                f"the config needs {tuple(var.get_value().shape)}")
        leaves.append(var.replace(jnp.asarray(value, dtype=var.get_value().dtype)))
    state = nnx.from_flat_state([(p, leaf) for (p, _), leaf in zip(flat, leaves)])
    return nnx.merge(graphdef, state)


def param_stats(model: nnx.Module) -> tuple[int, dict[str, int]]:
    """(parameter count, bytes by dtype name)."""
    count, by_dtype = 0, collections.Counter()
    for value in flat_params(model).values():
        count += int(np.prod(value.shape))
        by_dtype[str(value.dtype)] += int(np.prod(value.shape)) * value.dtype.itemsize
    return count, dict(by_dtype)
