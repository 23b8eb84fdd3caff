"""One device mesh for policy, PRM and reference; logical axis names mapped onto mesh axes by one table.

Params carry logical axes (`embed`, `mlp`, `heads`, `kv_heads`, `vocab`, `layers`, ...). `RULES`
maps each onto zero or more mesh axes. A dimension that a mesh axis does not divide evenly stays
replicated on that axis (e.g. 4 KV heads on an 8-way tensor axis), so one table serves one CPU
device, 8 fake CPU devices, a GPU box and a TPU pod.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

# Batch dimensions are split over both data-parallel axes.
BATCH_AXES = ("data", "fsdp")

RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("layers", ()),
    ("head_dim", ()),
    ("norm", ()),
)


def make_mesh(axes: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with named axes in the given order; one size may be -1 ("all remaining devices").

    `devices` defaults to all devices (of every process); pass a TPU topology's devices for AOT.
    """
    devices = list(jax.devices() if devices is None else devices)
    names, sizes = tuple(axes), [int(s) for s in axes.values()]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(axes)}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
        raise ValueError(f"mesh: axis sizes {dict(axes)} do not divide the {len(devices)} devices")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh: axis sizes {dict(zip(names, sizes))} use {math.prod(sizes)} devices, but there are {len(devices)}")
    try:
        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, tuple[str, ...]]] = RULES) -> P:
    """PartitionSpec for an array with the given logical axes; each mesh axis used at most once,
    and only where it divides the dimension."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape, strict=True):
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no rule (known: {sorted(table)})")
        chosen: list[str] = []
        for ax in table.get(name, ()) if name else ():
            if ax in mesh.shape and ax not in used and mesh.shape[ax] > 1 and dim % (math.prod(mesh.shape[a] for a in chosen) * mesh.shape[ax]) == 0:
                chosen.append(ax)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return P(*spec)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Sequence[tuple[str, tuple[str, ...]]] = RULES) -> nnx.State:
    """NamedShardings for every variable of a (real or abstract) model state, from its `axes` metadata.
    Variables without `axes` are replicated. The result is a pytree prefix of `state`, usable as jit shardings."""

    def one(v: nnx.Variable) -> NamedSharding:
        shape = v.get_value().shape
        axes = v.get_metadata().get("axes", (None,) * len(shape))
        return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=_is_var)


def shard_state(state: nnx.State, mesh: Mesh) -> nnx.State:
    """Places a state onto the mesh per the rules (moves data; use load_pretrained to avoid host copies)."""
    return jax.device_put(state, state_shardings(state, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dim split over the data-parallel axes, the rest replicated."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    return NamedSharding(mesh, P(axes or None, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways a batch is split."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def batch_split(rows: int) -> tuple[tuple[str, ...], int]:
    """Inside a jit under `jax.set_mesh(mesh)`: the batch axes a batch of `rows` rows is split over and how many ways
    (`((), 1)` without a mesh, or when the rows do not divide)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), 1
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    return ((), 1) if not axes or rows % size else (axes, size)


def constrain_batch(x: jax.Array) -> jax.Array:
    """Inside a jit under `jax.set_mesh(mesh)`: keep activations split over the batch axes (as MaxText
    constrains activations), so GSPMD never prefers sharding them over the model dims. No-op without a mesh
    or when the batch does not divide."""
    axes, _ = batch_split(x.shape[0])
    return jax.lax.with_sharding_constraint(x, P(axes, *([None] * (x.ndim - 1)))) if axes else x


def replicate(x: jax.Array) -> jax.Array:
    """Inside a jit under `jax.set_mesh(mesh)`: x whole on every device (gathered once). No-op without a mesh."""
    return x if jax.sharding.get_abstract_mesh().empty else jax.lax.with_sharding_constraint(x, P())


def host_to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from host data every process holds in full (each device takes its own slice).
    Single-process this is `device_put`; multi-process nothing crosses the network."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def global_to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) array on every host."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def process_rows(num_rows: int) -> slice:
    """This process's share of `num_rows` host-side rows (e.g. responses to verify): every P-th row from its
    process index, so that any prefix of the rows (what a sampler call stopped early hands over) splits evenly."""
    return slice(jax.process_index(), num_rows, jax.process_count())


def allgather_rows(local: np.ndarray, num_rows: int) -> np.ndarray:
    """Interleaves every process's `process_rows` share back into all `num_rows` rows, on every host."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils
    per = -(-num_rows // jax.process_count())
    padded = np.zeros((per, *local.shape[1:]), local.dtype)
    padded[: len(local)] = local
    gathered = np.asarray(multihost_utils.process_allgather(padded))  # [P, per, ...]: process p's j-th is row p + P*j
    return gathered.swapaxes(0, 1).reshape(-1, *local.shape[1:])[:num_rows]
