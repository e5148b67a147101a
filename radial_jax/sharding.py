"""The sharding seam: logical axis names -> mesh axes through one rules table.

Parameters carry logical axis names in flax's partitioning metadata (`out_sharding` on each
nnx.Param, set by `with_axes`/`param`); activations are constrained by logical name with
`constrain`. One table, RULES, maps logical names to the axes of one mesh
("data", "fsdp", "sequence", "tensor"), in maxdiffusion's spirit:

  batch -> (data, fsdp)   activation_length -> sequence   activation_heads/mlp -> tensor
  embed -> fsdp (parameters: fully sharded data parallel)   heads, mlp, vocab -> tensor

With no mesh set (`jax.set_mesh`), `constrain` returns its input: outputs are bit-identical to
a model without the seam. A mesh axis that does not divide a dimension is left out for that
dimension (a batch of 1 on an fsdp mesh stays whole), so every mesh runs every shape.

    mesh = make_mesh("data=2,fsdp=4")                 # default: every axis 1, one device
    state = jax.device_put(nnx.state(model), state_shardings(nnx.state(model), mesh))
    with jax.set_mesh(mesh): out = jax.jit(step)(state, ...)
"""

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "sequence", "tensor")
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]
RULES: Rules = (
    # activations
    ("batch", ("data", "fsdp")),
    ("activation_length", "sequence"),
    ("activation_embed", None),  # the residual stream is whole on each device at block edges
    ("activation_heads", "tensor"),
    ("activation_kv", None),  # head_dim
    ("activation_mlp", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),  # small vectors (norm scales of encoders' inner widths)
)
LogicalAxes = tuple[str | None, ...]


def parse_mesh(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """Returns {axis: size} for every MESH_AXES name from "data=2,fsdp=4" (absent axes: 1)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    if spec is None or spec == "":
        return sizes
    items = spec.items() if isinstance(spec, Mapping) else (_axis_size(part) for part in spec.split(","))
    for name, size in items:
        if name not in sizes:
            raise ValueError(f"mesh axis {name!r} must be one of {MESH_AXES} (e.g. --mesh data=2,fsdp=4)")
        if int(size) < 1:
            raise ValueError(f"mesh axis {name}={size} must be >= 1")
        sizes[name] = int(size)
    return sizes


def _axis_size(part: str) -> tuple[str, int]:
    name, sep, size = part.strip().partition("=")
    if not sep or not size.strip().isdigit():
        raise ValueError(f"mesh {part!r} must be AXIS=SIZE, e.g. data=2,fsdp=4")
    return name.strip(), int(size)


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """Returns a Mesh over axes MESH_AXES from "data=2,fsdp=4,sequence=1" (default: all 1, one device).

    Uses the first prod(sizes) of `devices` (default jax.devices()), in order.
    """
    sizes = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    count = math.prod(sizes.values())
    if count > len(devices):
        raise ValueError(f"mesh {sizes} needs {count} devices, {len(devices)} available")
    grid = np.array(devices[:count], dtype=object).reshape([sizes[name] for name in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def with_axes(init, axes: LogicalAxes):
    """Returns initializer `init` whose nnx.Param carries logical axis names `axes` (one per dim).

    eager_sharding=False: the names are metadata only; nothing is placed until a caller shards
    the state (state_shardings), so building a model needs no mesh.
    """
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def param(value: jax.Array, axes: LogicalAxes) -> nnx.Param:
    """Returns nnx.Param(value) carrying logical axis names `axes` (one per dimension)."""
    if len(axes) != value.ndim:
        raise ValueError(f"axes {axes} name {len(axes)} dimensions, the value has shape {value.shape}")
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def logical_axes(variable: nnx.Variable) -> LogicalAxes | None:
    """Returns the logical axis names a Variable carries (None if it has none)."""
    axes = variable.get_metadata().get("out_sharding")
    return tuple(axes) if axes else None


def partition_spec(axes: LogicalAxes, shape: Sequence[int], mesh_shape: Mapping[str, int],
                   rules: Rules = RULES) -> PartitionSpec:  # fmt: skip
    """Returns the PartitionSpec of a `shape` array named `axes` on a mesh of `mesh_shape`.

    Each logical name maps through `rules` (unknown names: an error naming them); mesh axes
    absent from the mesh, already used by an earlier dimension, or not dividing the dimension
    are dropped, so the spec is always valid for the shape.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape, strict=True):
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        targets = table.get(name) if name is not None else None
        targets = (targets,) if isinstance(targets, str) else tuple(targets or ())
        kept = []
        for axis in targets:
            width = mesh_shape.get(axis, 1)
            if axis in used or axis not in mesh_shape or size % (math.prod(mesh_shape[a] for a in kept) * width):
                continue
            kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def active_mesh_shape() -> dict[str, int] | None:
    """Returns {axis: size} of the mesh set by jax.set_mesh, or None when none is set."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else dict(mesh.shape)


def constrain(x: jax.Array, axes: LogicalAxes, rules: Rules = RULES) -> jax.Array:
    """Returns x with a sharding constraint by logical names `axes`; x itself when no mesh is set."""
    mesh_shape = active_mesh_shape()
    if mesh_shape is None:
        return x
    return jax.lax.with_sharding_constraint(x, partition_spec(axes, x.shape, mesh_shape, rules))


def state_shardings(state, mesh: Mesh, rules: Rules = RULES):
    """Returns the NamedSharding tree of an nnx state (nnx.state(model), abstract or not) from its
    variables' logical axes and `rules`; variables without names are replicated.

    jax.device_put(state, state_shardings(state, mesh)) places a model's state; pass it as a
    jit's in/out_shardings to create or load the state sharded.
    """
    mesh_shape = dict(mesh.shape)

    def sharding(var):
        if not isinstance(var, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        axes = logical_axes(var)
        shape = var.get_value().shape
        spec = PartitionSpec() if axes is None else partition_spec(axes, shape, mesh_shape, rules)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
