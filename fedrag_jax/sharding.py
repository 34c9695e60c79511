"""One device mesh, logical axis names on every parameter, one table of rules.

Parameters carry *logical* axis names (``("embed", "mlp")``); :data:`DEFAULT_RULES` maps
each name to mesh axes. The same model code then runs on one CPU, 8 simulated CPU devices,
a GPU host or a TPU pod: only the mesh and (rarely) the rules change.

Mesh axes:
    data    pure data parallelism (parameters replicated)
    fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
    tensor  tensor (model) parallelism inside matmuls
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .errors import MeshError

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated)
LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: LogicalRules = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),  # q and o projections: num_heads * head_dim
    ("kv_heads", "tensor"),  # k and v projections: num_kv_heads * head_dim
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("positions", None),
    ("token_types", None),
    ("lora_rank", None),
)


@dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; one of them may be -1, meaning "all remaining devices"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def axis_sizes(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sum(s == -1 for s in sizes) > 1:
            raise MeshError(f"at most one mesh axis may be -1, got {self}")
        for name, size in zip(MESH_AXES, sizes, strict=True):
            if size == 0 or size < -1:
                raise MeshError(f"mesh axis {name!r} has size {size}; use a positive size or -1")
        known = math.prod(s for s in sizes if s != -1)
        if num_devices % known:
            raise MeshError(
                f"mesh axis sizes {dict(zip(MESH_AXES, sizes, strict=True))} do not divide the "
                f"{num_devices} available devices; choose sizes whose product divides "
                f"{num_devices} (or set one axis to -1)"
            )
        sizes = [num_devices // known if s == -1 else s for s in sizes]
        if math.prod(sizes) != num_devices:
            raise MeshError(
                f"mesh axis sizes {dict(zip(MESH_AXES, sizes, strict=True))} use "
                f"{math.prod(sizes)} devices but {num_devices} are available; "
                "set one axis to -1 to take the rest"
            )
        return tuple(sizes)  # type: ignore[return-value]


def make_mesh(config: MeshConfig | Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a :class:`jax.sharding.Mesh` with axes ``(data, fsdp, tensor)``.

    Axis types are ``Auto`` so that ``with_sharding_constraint`` and sharding propagation
    behave as in classic pjit (jax >= 0.10 defaults ``make_mesh`` to Explicit axes).
    """
    if config is None:
        config = MeshConfig()
    elif isinstance(config, Mapping):
        unknown = set(config) - set(MESH_AXES)
        if unknown:
            raise MeshError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
        config = MeshConfig(**config)
    devices = list(devices) if devices is not None else jax.devices()
    shape = config.axis_sizes(len(devices))
    device_grid = np.asarray(devices, dtype=object).reshape(shape)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(device_grid, MESH_AXES, axis_types=auto)


def logical_to_spec(logical_axes: Sequence[str | None] | None,
                    rules: LogicalRules = DEFAULT_RULES,
                    shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec.

    A mesh axis is used at most once per array (first logical axis wins). When ``shape``
    and ``mesh`` are given, a dimension that the mesh axes do not divide is replicated
    instead (e.g. 3 KV heads on a tensor axis of 2).
    """
    if logical_axes is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for dim, name in enumerate(logical_axes):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and axes:
                if shape[dim] % math.prod(mesh.shape[a] for a in axes):
                    axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None] | None,
                   shape: Sequence[int] | None = None,
                   rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules, shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a batch array: leading dimension over the data-parallel axes."""
    return named_sharding(mesh, ("batch",) + (None,) * (ndim - 1), None, rules)


# batch entries every example shares (a packed batch's common prompt prefix): replicated
# over the mesh and given whole to every micro-batch
SHARED_BATCH_KEYS = frozenset({"prefix_ids"})


def shard_batch(batch, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
    """Place every array of a batch pytree on the mesh, leading dimension sharded (the
    entries of a batch dict named in ``SHARED_BATCH_KEYS``: replicated)."""

    def put(x, shared: bool = False):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        sharding = (replicated(mesh) if shared else
                    named_sharding(mesh, ("batch",) + (None,) * (x.ndim - 1), x.shape, rules))
        return jax.device_put(x, sharding)

    if isinstance(batch, dict):
        return {k: put(v, shared=True) if k in SHARED_BATCH_KEYS else jax.tree.map(put, v)
                for k, v in batch.items()}
    return jax.tree.map(put, batch)


def variable_shardings(state, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
    """For an ``nnx.State``: the same tree with each variable's NamedSharding as its value."""
    from flax import nnx

    def to_sharding(var):
        axes = var.get_metadata().get("out_sharding")
        return var.replace(value=named_sharding(mesh, axes, var.get_value().shape, rules))

    return jax.tree.map(to_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def host_copy(module):
    """A copy of an nnx module whose arrays are whole host (NumPy) arrays.

    On a multi-host mesh a parameter's shards live on several hosts and no single process can
    read it; this gathers every array that is not fully addressable (a collective: *every*
    process must call it, in the same order) so that one process can then write files.
    """
    from flax import nnx
    from jax.experimental import multihost_utils

    graphdef, state = nnx.split(module)

    def gather(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x)) if isinstance(x, jax.Array) else x

    return nnx.merge(graphdef, jax.tree.map(gather, state))
