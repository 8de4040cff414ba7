"""`flaxlm train --dry-run`: the memory per device that a recipe and a mesh imply.

Nothing is allocated: parameter and optimizer-state shapes come from
`jax.eval_shape`, their per-device slices from the shardings the rules give
(`state_shardings`), so a user sees an out-of-memory before paying for it.

Activation memory (the train step's temporaries: saved activations, gradients
in flight, logits) is measured when the mesh's devices are present: the train
step is lowered with those shardings and compiled, and XLA's
`compiled.memory_analysis().temp_size_in_bytes` (per device, since the program
is SPMD-partitioned) is reported. Without the devices (planning a 256-chip run
on a laptop), or when the backend gives no memory analysis, a formula estimates
it instead (`activation_formula`): per layer and token kept for the backward
pass, about 6 x embed + 4 x heads*head_dim/tensor + 3 x mlp/tensor values in the
compute dtype plus the float32 attention probabilities (heads/tensor x seq_len),
times the layers (one layer plus each layer's input with remat), plus three
float32 copies of the logits (vocab/tensor per token). Tokens per device are
micro_batch * seq_len / (data * fsdp). It is an estimate; the compiled figure
is what XLA will allocate on that backend.

The compiled plan also reports how long the train step took to trace and lower
and then to compile (XLA): run it with `model.scan_layers` both ways to compare.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh

from flaxlm.model.config import ModelConfig
from flaxlm.model.sharding import BATCH_AXES, MESH_AXES, MeshShape, Rules, make_mesh, use_sharding
from flaxlm.train.data import Batch
from flaxlm.train.optim import optimizer as make_optimizer
from flaxlm.train.prepare import check_shapes  # the checks `flaxlm train` runs
from flaxlm.train.recipe import Recipe
from flaxlm.train.step import (abstract_state, jit_train_step, state_shardings,
                               train_batch_sharding)

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    mesh: dict[str, int]
    num_params: int
    param_bytes: int            # per device
    optimizer_bytes: int        # per device (AdamW moments, counters)
    activation_bytes: int       # per device
    activation_source: str      # "compiled" (XLA memory analysis) or "formula"
    lower_seconds: float | None = None    # tracing and lowering the train step
    compile_seconds: float | None = None  # XLA compiling it (None: not compiled)

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.optimizer_bytes + self.activation_bytes

    def report(self) -> str:
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items())
        rows = [("parameters", self.param_bytes), ("optimizer state", self.optimizer_bytes),
                (f"activations ({self.activation_source})", self.activation_bytes),
                ("total", self.total_bytes)]
        lines = [f"mesh {mesh} ({math.prod(self.mesh.values())} devices), "
                 f"{self.num_params:,} parameters; memory per device:"]
        lines += [f"  {name:<28} {_size(n)}" for name, n in rows]
        if self.compile_seconds is not None:
            lines.append(f"train step: lowered in {self.lower_seconds:.2f} s, compiled in "
                         f"{self.compile_seconds:.2f} s")
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:9.2f} {unit}  ({n:,} bytes)"
    return f"{n:9d} B"


def _device_bytes(tree) -> int:
    """Bytes of the largest per-device slice of a tree of ShapeDtypeStructs with shardings."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def activation_formula(config: ModelConfig, recipe: Recipe, mesh: dict[str, int]) -> int:
    """The documented estimate of per-device activation bytes (see the module docstring)."""
    tokens = recipe.train.micro_batch * recipe.data.seq_len / math.prod(
        mesh[axis] for axis in BATCH_AXES)
    tensor = mesh["tensor"]
    itemsize = jnp.dtype(config.dtype).itemsize
    q_dim = config.num_heads * config.head_dim
    per_layer = tokens * (itemsize * (6 * config.embed_dim + 4 * q_dim / tensor
                                      + 3 * config.mlp_dim / tensor)
                          + 4 * config.num_heads / tensor * recipe.data.seq_len)
    if config.remat == "none":
        layers = config.num_layers * per_layer
    else:  # each layer's input is kept; one layer's activations are recomputed at a time
        layers = per_layer + config.num_layers * tokens * config.embed_dim * itemsize
    logits = 3 * tokens * config.vocab_size / tensor * 4
    return int(layers + logits)


def memory_plan(recipe: Recipe, config: ModelConfig | None = None, rules: Rules | None = None,
                num_devices: int | None = None, compile: bool = True) -> MemoryPlan:
    """Per-device memory of training `recipe` (its model, or `config`) on its mesh over
    `num_devices` (default: the devices here), with the recipe's rules (or `rules`)."""
    config = config or recipe.model_config()
    rules = recipe.train.sharding_rules if rules is None else rules
    num_devices = jax.device_count() if num_devices is None else num_devices
    sizes = MeshShape.parse(recipe.train.mesh).resolve(num_devices)
    present = num_devices == jax.device_count()
    mesh: Mesh | AbstractMesh = (make_mesh(recipe.train.mesh) if present else
                                 AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES))
    check_shapes(recipe, config, mesh)
    opt = make_optimizer(recipe.optimizer, recipe.train.steps)
    graphdef, target = abstract_state(config, opt)
    shardings = state_shardings(target, opt, mesh, rules)
    state = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s),
                         target, shardings)
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(target.params))
    activations, source, seconds = None, "formula", (None, None)
    if compile and present:
        compiled, seconds = _compile(graphdef, opt, state, shardings, mesh, rules, recipe)
        activations = _temp_bytes(compiled)
        source = "compiled" if activations is not None else source
    if activations is None:
        activations = activation_formula(config, recipe, sizes)
    return MemoryPlan(mesh=sizes, num_params=num_params, param_bytes=_device_bytes(state.params),
                      optimizer_bytes=_device_bytes(state.opt_state) + _device_bytes(
                          (state.step, state.rng)),
                      activation_bytes=activations, activation_source=source,
                      lower_seconds=seconds[0], compile_seconds=seconds[1])


def _compile(graphdef, opt, state, shardings, mesh, rules, recipe):
    """The compiled train step and (seconds to lower it, seconds to compile it)."""
    train = recipe.train
    shape = (train.grad_accum, train.micro_batch, recipe.data.seq_len + 1)
    step = jit_train_step(graphdef, opt, shardings, mesh, rules,
                          recipe.train.router_aux_loss_coef)
    field = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=train_batch_sharding(mesh, rules))
    batch = Batch(tokens=field, segment_ids=field, positions=field)
    start = time.perf_counter()
    with use_sharding(mesh, rules):
        lowered = step.lower(state, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, (lowered_at - start, time.perf_counter() - lowered_at)


def _temp_bytes(compiled) -> int | None:
    """XLA's temporary bytes per device of a compiled program, None when not reported."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # no memory analysis on this backend: fall back to the formula
        return None
    if analysis is None or getattr(analysis, "temp_size_in_bytes", None) is None:
        return None
    return int(analysis.temp_size_in_bytes)
