"""Logical axis names -> mesh axes: one rules table, one mesh, shardings for everything.

Every parameter carries `logical_axes` metadata (`vocab`, `embed`, `heads`,
`kv_heads`, `head_dim`, `mlp`, `expert`, ...). `RULES` maps each logical name to
mesh axes among `data`, `fsdp`, `expert`, `tensor`; changing parallelism means changing the
mesh shape and this table, never the model code. Activations are constrained
at block boundaries through `constrain`, which does nothing unless a program
is traced inside `use_sharding(mesh, rules)`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from flaxlm.model.errors import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Data parallel over data x fsdp x expert; FSDP splits parameters (and optimizer
# state) over fsdp along `embed`; expert parallelism splits the stacked experts of
# MoE layers over `expert` (the batch too, so attention is not duplicated there);
# tensor parallel splits heads, MLP and vocabulary.
BATCH_AXES = ("data", "fsdp", "expert")
RULES: Rules = (
    ("batch", BATCH_AXES),
    ("expert", "expert"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("seq", None),
    ("cache_seq", None),
    ("layers", None),
)


def make_rules(overrides: Mapping[str, Any] | None = None, base: Rules = RULES) -> Rules:
    """The rules table with `overrides` ({logical name: mesh axis, axes or None}) applied."""
    table = dict(base)
    for name, value in (overrides or {}).items():
        table[name] = tuple(value) if isinstance(value, (list, tuple)) else value
    rules = tuple(table.items())
    for name, value in rules:
        for axis in _axes(value):
            if axis not in MESH_AXES:
                raise ConfigError(f"sharding rule {name!r} names unknown mesh axis {axis!r}; "
                                  f"mesh axes are {', '.join(MESH_AXES)}")
    return rules


def parse_rules(items: Sequence[str]) -> dict[str, str | tuple[str, ...] | None]:
    """Rule overrides from strings "NAME=AXIS", "NAME=AXIS+AXIS" or "NAME=none"
    (e.g. a recipe's train.rules = ["mlp=fsdp+tensor", "embed=none"])."""
    out: dict[str, str | tuple[str, ...] | None] = {}
    for item in items:
        name, sep, value = (x.strip() for x in item.partition("="))
        if not sep or not name or not value:
            raise ConfigError(f"a sharding rule is NAME=AXIS, NAME=AXIS+AXIS or NAME=none; "
                              f"got {item!r}")
        axes = tuple(a.strip() for a in value.split("+"))
        out[name] = None if value.lower() == "none" else (axes[0] if len(axes) == 1 else axes)
    make_rules(out)  # unknown mesh axes fail here
    return out


def _axes(value) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Sizes of the mesh axes; one of them may be -1 to take the remaining devices."""

    data: int = 1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1

    @classmethod
    def parse(cls, spec: str | Mapping[str, int] | MeshShape) -> MeshShape:
        """From "data=2,tensor=4", {"data": 2, "tensor": 4} or a MeshShape."""
        if isinstance(spec, MeshShape):
            return spec
        if isinstance(spec, str):
            items = {}
            for part in filter(None, (p.strip() for p in spec.split(","))):
                name, sep, size = part.partition("=")
                if not sep or not size.strip().lstrip("-").isdigit():
                    raise ConfigError(f"mesh wants AXIS=SIZE pairs like data=2,tensor=4; got {part!r}")
                items[name.strip()] = int(size)
            spec = items
        unknown = set(spec) - set(MESH_AXES)
        if unknown:
            raise ConfigError(f"unknown mesh axis {sorted(unknown)[0]!r}; mesh axes are "
                              f"{', '.join(MESH_AXES)}")
        return cls(**spec)

    def resolve(self, num_devices: int) -> dict[str, int]:
        sizes = dataclasses.asdict(self)
        free = [k for k, v in sizes.items() if v == -1]
        bad = [k for k, v in sizes.items() if v == 0 or v < -1]
        if bad or len(free) > 1:
            raise ConfigError(f"mesh sizes must be >= 1 (one may be -1), got {sizes}")
        known = math.prod(v for v in sizes.values() if v != -1)
        if free:
            if num_devices % known:
                raise ConfigError(f"mesh {sizes}: {num_devices} devices are not divisible by {known}")
            sizes[free[0]] = num_devices // known
        if math.prod(sizes.values()) != num_devices:
            raise ConfigError(f"mesh {sizes} has {math.prod(sizes.values())} devices, "
                              f"but {num_devices} are available")
        return sizes


def make_mesh(shape: str | Mapping[str, int] | MeshShape | Mesh,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, expert, tensor) over `devices` (default: all).

    A given `Mesh` may have Auto or Explicit axes (`jax.make_mesh` makes Explicit ones):
    flaxlm's programs place values by the rules table and let XLA partition the rest,
    so they run on the same devices and axes seen as Auto.
    """
    if isinstance(shape, Mesh):
        missing = set(MESH_AXES) - set(shape.axis_names)
        if missing:
            raise ConfigError(f"a mesh needs the axes {MESH_AXES}; this one has {shape.axis_names}")
        manual = [n for n, t in zip(shape.axis_names, shape.axis_types) if t == AxisType.Manual]
        if manual:
            raise ConfigError(f"mesh axes {manual} are Manual (inside shard_map); flaxlm needs "
                              "Auto or Explicit axes")
        return shape.update(axis_types=(AxisType.Auto,) * len(shape.axis_names))
    devices = list(devices if devices is not None else jax.devices())
    sizes = MeshShape.parse(shape).resolve(len(devices))
    grid = np.asarray(devices).reshape(tuple(sizes[a] for a in MESH_AXES))
    return Mesh(grid, MESH_AXES)


def spec_for(axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """PartitionSpec of a value whose dimensions have these logical names.

    A mesh axis is used at most once: a later dimension that maps to an axis
    already taken stays unsharded.
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in axes:
        mesh_axes = tuple(a for a in _axes(table.get(name)) if a not in used)
        used.update(mesh_axes)
        out.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*out)


def check_divisible(name: str, shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> None:
    """A clear error when a dimension does not split evenly over its mesh axes."""
    for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
        parts = math.prod(mesh.shape[a] for a in _axes(axes))
        if size % parts:
            raise ConfigError(f"{name} of shape {tuple(shape)}: dimension {dim} ({size}) is not "
                              f"divisible by mesh axis {axes!r} of size {parts}")


def param_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """NamedShardings for every parameter of `state`, from its `logical_axes` metadata."""
    def one(path, var):
        axes = var.get_metadata().get("logical_axes", (None,) * var.get_value().ndim)
        spec = spec_for(axes, rules)
        name = ".".join(str(p) for p in path)
        check_divisible(name, var.get_value().shape, spec, mesh)
        return var.replace(NamedSharding(mesh, spec))

    flat = [(p, one(p, v)) for p, v in nnx.to_flat_state(state)]
    return nnx.from_flat_state(flat)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = RULES) -> nnx.Module:
    """Place the model's parameters on `mesh` according to `rules` (in place)."""
    state = nnx.state(model)
    shardings = param_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


# ------------------------------------------------------------------ activations

@dataclasses.dataclass(frozen=True)
class _Context:
    mesh: Mesh
    rules: Rules


_CONTEXT: contextvars.ContextVar[_Context | None] = contextvars.ContextVar("flaxlm_sharding",
                                                                          default=None)


@contextlib.contextmanager
def use_sharding(mesh: Mesh, rules: Rules = RULES) -> Iterator[None]:
    """Programs traced inside this block constrain activations to `mesh`."""
    token = _CONTEXT.set(_Context(mesh, rules))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op outside `use_sharding`."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    spec = spec_for(axes, ctx.rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))


def mesh_axis_size(axis: str) -> int:
    """Devices along `axis` of the mesh programs are being traced for (1 outside
    `use_sharding`); lets a layer pick a formulation that suits the layout."""
    ctx = _CONTEXT.get()
    if ctx is None or axis not in ctx.mesh.shape:
        return 1
    return ctx.mesh.shape[axis]


def mesh_size() -> int:
    """Devices in the mesh programs are being traced for (1 outside `use_sharding`)."""
    ctx = _CONTEXT.get()
    return 1 if ctx is None else ctx.mesh.size


def sharding_for(axes: Sequence[str | None], mesh: Mesh, rules: Rules = RULES) -> NamedSharding:
    return NamedSharding(mesh, spec_for(axes, rules))
