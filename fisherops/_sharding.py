"""Data sharded over devices and processes.

The curvature operators need nothing special for this: a Fisher-vector product is
a sum over data points, so with the data sharded along axis 0 and the params
replicated, XLA's SPMD partitioner has every device work on its own shard and sums
the results with one all-reduce. This module only helps to put the data there.
"""

import math

import jax
import jax.tree_util as jtu
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree


def shard_data(
    data: PyTree,
    mesh: Mesh | None = None,
    axis_name: str = "data",
    *,
    process_local: bool = False,
) -> PyTree:
    """Shard every array of a data set along its leading (data) axis.

    **Arguments:**

    - `data`: `{"input": X, "target": Y}`, `(X, Y)` or any pytree of arrays whose
      axis 0 indexes data points.
    - `mesh`: the device mesh; by default a one-axis mesh named `axis_name` over
      all devices (of all processes). On a mesh with more axes, the arrays are
      replicated along the others.
    - `axis_name`: the mesh axis to shard the data axis over.
    - `process_local`: `False`: `data` is the whole data set (the same on every
      process). `True`: `data` is this process's part of it, the processes' parts
      in the order of their `jax.process_index()`, and the global data set is their
      concatenation (built with `jax.make_array_from_process_local_data`).

    **Returns:** the same pytree of global `jax.Array`s, sharded as
    `NamedSharding(mesh, PartitionSpec(axis_name))`. The number of data points must
    be a multiple of the mesh's size along `axis_name`.
    """
    if mesh is None:
        mesh = jax.make_mesh(
            (jax.device_count(),), (axis_name,), (jax.sharding.AxisType.Auto,)
        )
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"axis_name must be an axis of mesh; got {axis_name!r} for a mesh with "
            f"axes {mesh.axis_names}."
        )
    sharding = NamedSharding(mesh, PartitionSpec(axis_name))
    shards = mesh.shape[axis_name] // (jax.process_count() if process_local else 1)

    def put(path, leaf):
        size = np.shape(leaf)[0] if np.ndim(leaf) else None
        if size is None or size % shards:
            raise ValueError(
                f"data{jtu.keystr(path)} must have a leading data axis whose length "
                f"is a multiple of {shards} (the shards along {axis_name!r}"
                f"{' on this process' if process_local else ''}); got shape "
                f"{np.shape(leaf)}."
            )
        if process_local:
            return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))
        return jax.device_put(leaf, sharding)

    return jtu.tree_map_with_path(put, data)


def _leaf_shards(leaf) -> int | None:
    """How many pieces `leaf`'s axis 0 is split into; None when not known.

    A concrete `jax.Array` knows its sharding. A traced array knows it only when
    its type carries one (explicit mesh axes); under `jit` with the default
    (automatic) axes it does not, and then, on more than one device, it is None.
    """
    if not np.ndim(leaf):
        return 1
    if isinstance(leaf, jax.core.Tracer):
        sharding = getattr(jax.typeof(leaf), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        axis_types = getattr(mesh, "axis_types", ())
        explicit = [t == jax.sharding.AxisType.Explicit for t in axis_types]
        if mesh is None or not any(explicit):
            return None if jax.device_count() > 1 else 1
        names = sharding.spec[0] if len(sharding.spec) else None
        names = () if names is None else (names,) if isinstance(names, str) else names
        return math.prod(mesh.shape[name] for name in names)
    if isinstance(leaf, jax.Array) and not leaf.sharding.is_fully_replicated:
        return leaf.shape[0] // leaf.sharding.shard_shape(leaf.shape)[0]
    return 1


def check_chunking(data: PyTree, num_data: int, chunk_size: int | None) -> None:
    """Refuse a `chunk_size` that would make XLA gather sharded data.

    Chunks keep a data set's sharding when `chunk_size` divides the number of data
    points and is a multiple of the number of shards (see `_core.chunker`). The
    shards come from the arrays' shardings; for traced data (under `jit`) whose
    type carries no sharding, on more than one device, the data is taken to be
    sharded over all devices (the check runs at trace time, from static shapes).
    """
    if chunk_size is None or chunk_size >= num_data:
        return
    counts = [_leaf_shards(leaf) for leaf in jtu.tree_leaves(data)]
    assumed = None in counts
    shards = jax.device_count() if assumed else max(counts, default=1)
    if assumed and num_data % shards:
        return  # data that cannot be split evenly over the devices is not sharded
    if shards == 1 or not (num_data % chunk_size or chunk_size % shards):
        return
    per_device = num_data // shards
    note = (
        " Under jit the data's sharding is not known while tracing, so it is taken "
        f"to be sharded over all {shards} devices; build the operator outside jit "
        "if it is not."
        if assumed
        else ""
    )
    raise ValueError(
        f"chunk_size must divide the number of data points ({num_data}) and be "
        f"a multiple of the number of devices the data is sharded over "
        f"({shards}), i.e. chunk_size / {shards} must divide the {per_device} "
        f"points per device; got chunk_size={chunk_size}. Other values would "
        f"gather the whole data set onto every device.{note}"
    )
