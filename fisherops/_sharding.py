"""Data sharded over devices and processes.

The curvature operators need nothing special for this: a Fisher-vector product is
a sum over data points, so with the data sharded along axis 0 and the params
replicated, XLA's SPMD partitioner has every device work on its own shard and sums
the results with one all-reduce. This module only helps to put the data there.
"""

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


def data_shards(data: PyTree) -> int:
    """How many pieces a data set's leading axis is split into across devices.

    1 for traced or unsharded data; only concrete `jax.Array`s know their sharding.
    """
    counts = {1}
    for leaf in jtu.tree_leaves(data):
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
            if np.ndim(leaf) and not leaf.sharding.is_fully_replicated:
                shard = leaf.sharding.shard_shape(leaf.shape)[0]
                counts.add(leaf.shape[0] // shard)
    return max(counts)


def check_chunking(data: PyTree, num_data: int, chunk_size: int | None) -> None:
    """Refuse a `chunk_size` that would make XLA gather sharded data.

    Chunks keep a data set's sharding when `chunk_size` divides the number of data
    points and is a multiple of the number of shards (see `_core.chunker`).
    """
    shards = data_shards(data)
    if chunk_size is None or chunk_size >= num_data or shards == 1:
        return
    if num_data % chunk_size or chunk_size % shards:
        per_device = num_data // shards
        raise ValueError(
            f"chunk_size must divide the number of data points ({num_data}) and be "
            f"a multiple of the number of devices the data is sharded over "
            f"({shards}), i.e. chunk_size / {shards} must divide the {per_device} "
            f"points per device; got chunk_size={chunk_size}. Other values would "
            "gather the whole data set onto every device."
        )
