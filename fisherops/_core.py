"""The one piece of maths every curvature operator shares.

    C v = scale * sum_n J_n^T B_n B_n^T J_n v

`J_n` is the Jacobian of the network output for datum `n` with respect to the
params, `B_n` an `(O, K)` likelihood factor. Everything here works on a *batch* of
data at once: one linearised forward pass (`jvp`) and one transpose (`vjp`) over
the whole batch, never per-datum pairs. The output-space product `B_n B_n^T t_n`
is passed in as a function, so an operator that knows `B_n B_n^T` without its
factor (the GGN, through the likelihood's `hessian_mv`) never forms `B_n`.
Chunking splits the data into equal slices processed by `lax.scan`, so memory is
bounded by the chunk.

Dense matrices (`as_matrix`, `diagonal`) have two routes: the per-datum rows
`R_n = B_n^T J_n` accumulated as `sum_n R_n^T R_n`, or `P` linearised products
with the basis vectors. `dense_route` picks the cheaper one.
"""

import functools as ft
from collections.abc import Callable

import jax
import jax.extend as jex
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int, PyTree

# A function `(outputs (n, *O), targets, indices (n,)) -> B (n, O, K)`.
FactorFn = Callable[[Array, PyTree, Int[Array, " n"]], Float[Array, "n O K"]]


def batched_model(model_fn: Callable, vmap_over_data: bool) -> Callable:
    """`(inputs (n, ...), params) -> outputs (n, *O)` from the user's `model_fn`."""
    if vmap_over_data:
        return jax.vmap(model_fn, in_axes=(0, None))
    return model_fn


def is_batch(inputs: PyTree, targets: PyTree, outputs: jax.ShapeDtypeStruct) -> bool:
    """Whether data given to a batched `model_fn` (`vmap_over_data=False`) is a batch.

    The number of data points comes from the data, never from the rank of the
    outputs (a per-datum output may be a scalar, so a batch's outputs may be
    `(N,)`): the data is a batch when the outputs' leading axis is the inputs'
    leading axis and every target has a leading axis. Otherwise it is one
    unbatched datum (its input `(D,)` gives an output `(O,)` with `O != D`, or a
    scalar; or its target is a scalar label).
    """
    sizes = {
        jnp.shape(leaf)[0] if jnp.ndim(leaf) else None
        for leaf in jtu.tree_leaves(inputs)
    }
    return (
        len(sizes) == 1
        and outputs.ndim >= 1
        and sizes == {outputs.shape[0]}
        and all(jnp.ndim(leaf) for leaf in jtu.tree_leaves(targets))
    )


def scale_dtype(params: PyTree) -> jnp.dtype:
    """The dtype of `num_total / num_curv`: the params' dtype, at least float32."""
    return jnp.promote_types(jnp.result_type(*jtu.tree_leaves(params)), jnp.float32)


def scaled(tree: PyTree, scale: Array) -> PyTree:
    """`scale * tree`, computed in at least float32, in the leaves' dtypes."""

    def one(leaf):
        wide = jnp.promote_types(leaf.dtype, scale.dtype)
        return (leaf.astype(wide) * scale.astype(wide)).astype(leaf.dtype)

    return jtu.tree_map(one, tree)


def bbt(factors: Float[Array, "n O K"], tangents: Array) -> Array:
    """`B_n B_n^T t_n` for every datum `n`; `tangents` is shaped `(n, *O)`."""
    flat = tangents.reshape(factors.shape[:2])
    coefficients = jnp.einsum("no,nok->nk", flat, factors)
    return jnp.einsum("nok,nk->no", factors, coefficients).reshape(tangents.shape)


def weighted(weights: Bool[Array, " n"], values: Array) -> Array:
    """`values` (axis 0 indexing data points) times the points' weights (1 or 0)."""
    return values * weights.astype(values.dtype).reshape(-1, *(1,) * (values.ndim - 1))


def linearised_mv(
    jvp_fn: Callable, params: PyTree, output_mv: Callable[[Array], Array], vector
) -> PyTree:
    """`sum_n J_n^T M_n J_n v` from a linearised batched model.

    `output_mv(t)` gives `M_n t_n` for the batch of output tangents `t (n, *O)`.
    """
    (result,) = jax.linear_transpose(jvp_fn, params)(output_mv(jvp_fn(vector)))
    return result


def weighted_outputs(factors: Float[Array, "n O K"], coefficients, shape) -> Array:
    """`B_n e_n` for every datum, shaped like the outputs."""
    return jnp.einsum("nok,nk->no", factors, coefficients).reshape(shape)


def per_datum_rows(
    model_fn: Callable,
    vmap_over_data: bool,
    params: PyTree,
    inputs: PyTree,
    targets: PyTree,
    indices: Int[Array, " n"],
    factor_fn: FactorFn,
) -> PyTree[Float[Array, "n K ..."]]:
    """The rows `R_n = B_n^T J_n`: params-shaped, each leaf `(n, K, *leaf.shape)`.

    One forward pass per datum (vmapped), then `K` `vjp`s (vmapped). The rows stay
    a pytree: flattening them here would copy every row once more.
    """
    batch_of_one = ft.partial(jtu.tree_map, lambda leaf: leaf[None])
    if vmap_over_data:
        single = model_fn
    else:

        def single(x, p):
            return model_fn(batch_of_one(x), p)[0]

    def one(x, y, index):
        output, vjp_fn = jax.vjp(lambda p: single(x, p), params)
        b = factor_fn(output[None], batch_of_one(y), index[None])[0]
        cotangents = b.T.reshape((b.shape[1], *output.shape))
        (rows,) = jax.vmap(vjp_fn)(cotangents)
        return rows

    return jax.vmap(one)(inputs, targets, indices)


def flat_rows(rows: PyTree[Float[Array, "n K ..."]]) -> Float[Array, "nK P"]:
    """The rows as one `(n K, P)` matrix, columns in `ravel_pytree` order."""
    return jnp.concatenate(
        [row.reshape(row.shape[0] * row.shape[1], -1) for row in jtu.tree_leaves(rows)],
        axis=1,
    )


def sum_rows(leaf: Float[Array, "n K ..."]) -> Float[Array, "..."]:
    """`leaf.sum((0, 1))`, as a matrix-vector product: XLA:CPU is slow to reduce
    over leading axes."""
    rows = leaf.shape[0] * leaf.shape[1]
    return (jnp.ones(rows, leaf.dtype) @ leaf.reshape(rows, -1)).reshape(leaf.shape[2:])


def dense_from_mv(
    mv: Callable[[PyTree], PyTree], structure: PyTree, *, diagonal_only: bool = False
) -> Array:
    """The `(P, P)` matrix of a linear map (or its diagonal) from `P` products.

    The basis vectors go through `mv` in batches of up to 64 (vmapped).
    """
    zeros = jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), structure)
    flat, unravel = jfu.ravel_pytree(zeros)
    size = flat.size
    batch = min(size, 64)
    count = -(-size // batch)

    def block(start):
        basis = (
            jnp.arange(size)[None, :] == start + jnp.arange(batch)[:, None]
        ).astype(flat.dtype)
        columns = jax.vmap(lambda e: jfu.ravel_pytree(mv(unravel(e)))[0])(basis)
        if diagonal_only:
            return jnp.sum(columns * basis, axis=1)
        return columns

    # The last block is shifted back to end at `size` (its overlap is rewritten).
    starts = jnp.minimum(jnp.arange(count) * batch, size - batch)
    blocks = lax.map(block, starts)
    if count * batch == size:
        return blocks.reshape(size) if diagonal_only else blocks.reshape(size, size).T
    overlap = count * batch - size
    joined = jnp.concatenate(
        [blocks[:-1].reshape(-1, *blocks.shape[2:]), blocks[-1, overlap:]]
    )
    return joined if diagonal_only else joined.T


# The cost model of the dense routes: operations per second of a matrix product
# (flops), a convolution (flops) and anything else (output elements). On a CPU,
# XLA runs the convolutions of a network's `jvp`/`vjp` (batched over tangents) far
# below its matrix-product rate; on an accelerator both run on the same units.
_CPU_RATES = (1e11, 3e9, 4e9)
_ACCELERATOR_RATES = (1e13, 1e13, 1e11)


def _operation_counts(jaxpr: "jex.core.Jaxpr") -> np.ndarray:
    """`(matrix-product flops, convolution flops, other output elements)`."""
    counts = np.zeros(3)
    for eqn in jaxpr.eqns:
        outputs = sum(
            np.prod(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")
        )
        name = eqn.primitive.name
        if name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            counts[0] += 2 * outputs * np.prod([lhs[i] for i in contracting])
        elif name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape
            out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
            counts[1] += 2 * outputs * np.prod(kernel) / out_features
        else:
            inner = [
                sub
                for value in eqn.params.values()
                for sub in (value if isinstance(value, tuple | list) else (value,))
                if isinstance(sub, jex.core.Jaxpr | jex.core.ClosedJaxpr)
            ]
            if not inner:
                counts[2] += outputs
            repeats = eqn.params.get("length", 1) if name == "scan" else 1
            for sub in inner:
                counts += repeats * _operation_counts(getattr(sub, "jaxpr", sub))
    return counts


def estimated_seconds(fn: Callable, *args, matmul_flops: float = 0.0) -> float:
    """The cost model's time for `fn(*args)` (abstract arguments suffice), plus
    `matmul_flops` more flops of large matrix products."""
    counts = _operation_counts(jax.make_jaxpr(fn)(*args).jaxpr)
    counts[0] += matmul_flops
    rates = _CPU_RATES if jax.default_backend() == "cpu" else _ACCELERATOR_RATES
    return float(np.sum(counts / np.asarray(rates)))


Chunk = tuple[PyTree, Int[Array, " c"], Bool[Array, " c"]]


def num_chunks(num_data: int, chunk_size: int | None) -> int:
    if chunk_size is None or chunk_size >= num_data:
        return 1
    return -(-num_data // chunk_size)


def layout_chunk_size(num_data: int, target: int) -> int:
    """A chunk size for about `target` points that keeps a sharded data layout.

    For a chunk size picked automatically (not by the user): with several
    devices, the largest multiple of the device count that divides `num_data` and
    is at most `max(target, device count)`, so that data sharded over the devices
    (or over a divisor of them) is chunked where it lies (see `chunker`). `target`
    itself on one device, or when `num_data` is not a multiple of the device count.
    """
    devices = jax.device_count()
    if devices == 1 or target >= num_data or num_data % devices:
        return target
    largest = max(target, devices) // devices * devices
    return next(n for n in range(largest, 0, -devices) if num_data % n == 0)


def chunker(
    data: PyTree, num_data: int, chunk_size: int | None
) -> tuple[int, Callable[[Int[Array, ""]], Chunk]]:
    """Split the data into `count` chunks of `chunk_size` points, without copying.

    Returns `count` and `take(index) -> (chunk_data, indices, weights)`: the points
    of chunk `index`, their global indices and their weights (1 or 0).

    When `chunk_size` divides `num_data`, chunk `c` holds the points
    `c, c + count, c + 2 count, ...`: a reshape of axis 0 into
    `(chunk_size, count)` followed by an index along the second axis. A data set
    sharded along axis 0 over `S` devices, with `S` dividing `chunk_size`, keeps
    that sharding through the reshape, so every device scans its own shard and
    the data never moves between devices. Otherwise the chunks are contiguous and
    the last one is shifted back to end at `num_data`; the points it shares with
    the previous chunk get weight zero.
    """
    count = num_chunks(num_data, chunk_size)
    if count == 1:
        whole = (data, jnp.arange(num_data), jnp.ones(num_data, dtype=bool))
        return 1, lambda index: whole
    if num_data % chunk_size == 0:
        strided = jtu.tree_map(
            lambda leaf: leaf.reshape(chunk_size, count, *leaf.shape[1:]), data
        )

        def take(index):
            sliced = jtu.tree_map(
                lambda leaf: lax.dynamic_index_in_dim(leaf, index, 1, False), strided
            )
            indices = index + count * jnp.arange(chunk_size)
            return sliced, indices, jnp.ones(chunk_size, dtype=bool)

        return count, take

    def take(index):
        start = jnp.minimum(index * chunk_size, num_data - chunk_size)
        sliced = jtu.tree_map(
            lambda leaf: lax.dynamic_slice_in_dim(leaf, start, chunk_size), data
        )
        indices = start + jnp.arange(chunk_size)
        return sliced, indices, indices >= index * chunk_size

    return count, take


def chunked_sum(
    fn: Callable[[PyTree, Int[Array, " c"], Bool[Array, " c"]], PyTree],
    data: PyTree,
    num_data: int,
    chunk_size: int | None,
) -> PyTree:
    """`sum_chunks fn(chunk_data, indices, weights)` with a `lax.scan` over chunks."""
    count, take = chunker(data, num_data, chunk_size)
    if count == 1:
        return fn(*take(0))

    def body(total, index):
        term = fn(*take(index))
        return jtu.tree_map(jnp.add, total, term), None

    first = jax.eval_shape(fn, *take(jnp.asarray(0)))
    zeros = jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), first)
    total, _ = lax.scan(body, zeros, jnp.arange(count))
    return total


def chunked_map(
    fn: Callable[[PyTree, Int[Array, " c"]], PyTree],
    data: PyTree,
    num_data: int,
    chunk_size: int | None,
) -> PyTree:
    """`fn(chunk_data, indices)` over the chunks, per-point results `(num_data, ...)`.

    `fn` returns arrays whose axis 0 indexes the chunk's points; they are put back
    in data order.
    """
    count, take = chunker(data, num_data, chunk_size)
    if count == 1:
        return fn(*take(0)[:2])
    blocks = lax.map(lambda index: fn(*take(index)[:2]), jnp.arange(count))
    if num_data % chunk_size == 0:
        return jtu.tree_map(
            lambda block: jnp.swapaxes(block, 0, 1).reshape(num_data, *block.shape[2:]),
            blocks,
        )
    overlap = count * chunk_size - num_data
    return jtu.tree_map(
        lambda block: jnp.concatenate(
            [block[:-1].reshape(-1, *block.shape[2:]), block[-1, overlap:]]
        ),
        blocks,
    )
