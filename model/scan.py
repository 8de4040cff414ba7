"""Decoder layers as one `jax.lax.scan` (`ModelConfig.scan_layers`): XLA compiles the
body once instead of once per layer, so compile time stops growing with depth.

Parameters keep their per-layer layout (`layers.0`, `layers.1`, ...: checkpoints,
HF/GGUF, LoRA, int8 and the sharding rules are unchanged). Inside the traced forward
the state of layers j, j + P, j + 2P, ... is stacked along a new leading axis, where P
is `ModelConfig.layer_period` (1 for a Llama; 2 for Gemma 2's alternating sliding and
full layers; 6 for Gemma 3), and the scan runs over the repeats of the pattern: its
body runs the P layers of one repeat in order, each its own block, rematerialized per
layer as without the scan. Layers after the last whole repeat run unrolled. Gradients
flow back through the stack to each layer's own parameters; random state (LoRA
dropout's counters) comes out of the scan and is written back to each layer.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flaxlm.model.errors import ConfigError

# call(j, block, x) -> (x, aux): one layer at place j of the period (static); aux an
# array or None, the same kind for every layer at place j.
LayerCall = Callable[[int, nnx.Module, jax.Array], tuple[jax.Array, jax.Array | None]]


def scan_layers(blocks: Sequence[nnx.Module], period: int, x: jax.Array, call: LayerCall
                ) -> tuple[jax.Array, list[jax.Array]]:
    """`x` through `blocks` in order, the whole repeats of `period` layers as a scan.
    Returns x and the layers' auxes that are not None, in layer order."""
    repeats = len(blocks) // period
    columns = [_stack([blocks[r * period + j] for r in range(repeats)], j, period)
               for j in range(period)]

    def body(x, stacked):
        auxes, rng_states = [], []
        for j, ((graphdef, treedef), leaves) in enumerate(zip(specs, stacked)):
            block = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            x, aux = call(j, block, x)
            auxes.append(aux)
            rng_states.append(nnx.state(block, nnx.RngState))
        return x, (auxes, rng_states)

    specs = [spec for spec, _ in columns]
    x, (auxes, rng_states) = jax.lax.scan(body, x, [leaves for _, leaves in columns])
    out = []
    for r in range(repeats):
        for j in range(period):
            nnx.update(blocks[r * period + j], jax.tree.map(lambda a: a[r], rng_states[j]))
            if auxes[j] is not None:
                out.append(auxes[j][r])
    for i in range(repeats * period, len(blocks)):
        x, aux = call(i % period, blocks[i], x)
        if aux is not None:
            out.append(aux)
    return x, out


def _stack(blocks: Sequence[nnx.Module], place: int, period: int):
    """((graphdef, treedef), leaves stacked along a new leading axis) of blocks built alike."""
    splits = [nnx.split(block) for block in blocks]
    flat = [jax.tree.flatten(state) for _, state in splits]
    spec = (splits[0][0], flat[0][1])
    for r, ((graphdef, _), (_, treedef)) in enumerate(zip(splits, flat)):
        if (graphdef, treedef) != spec:
            raise ConfigError(
                f"scan_layers: layer {r * period + place} is built unlike layer {place} (an "
                f"adapter or quantization on some layers only?); set scan_layers = false")
    leaves = [jnp.stack(column) for column in zip(*(leaves for leaves, _ in flat))]
    return spec, leaves
