"""The one piece of maths every curvature operator shares.

    C v = factor * sum_n J_n^T B_n B_n^T J_n v

`J_n` is the Jacobian of the network output for datum `n` with respect to the
params, `B_n` an `(O, K)` factor from the likelihood. Everything here works on a
*batch* of data at once: one linearised forward pass (`jvp`) and one transpose
(`vjp`) over the whole batch, never per-datum pairs. Chunking splits the data
into equal slices processed by `lax.scan`, so memory is bounded by the chunk.
"""

import functools as ft
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax import lax
from jaxtyping import Array, Bool, Float, Int, PyTree

# A function `(outputs (n, *O), targets, indices (n,)) -> B (n, O, K)`.
FactorFn = Callable[[Array, PyTree, Int[Array, " n"]], Float[Array, "n O K"]]


def batched_model(model_fn: Callable, vmap_over_data: bool) -> Callable:
    """`(inputs (n, ...), params) -> outputs (n, *O)` from the user's `model_fn`."""
    if vmap_over_data:
        return jax.vmap(model_fn, in_axes=(0, None))
    return model_fn


def bbt(factors: Float[Array, "n O K"], tangents: Array) -> Array:
    """`B_n B_n^T t_n` for every datum `n`; `tangents` is shaped `(n, *O)`."""
    flat = tangents.reshape(factors.shape[:2])
    coefficients = jnp.einsum("no,nok->nk", flat, factors)
    return jnp.einsum("nok,nk->no", factors, coefficients).reshape(tangents.shape)


def linearised_mv(jvp_fn, params: PyTree, factors: Array, vector: PyTree) -> PyTree:
    """`sum_n J_n^T B_n B_n^T J_n v` from a linearised batched model."""
    (result,) = jax.linear_transpose(jvp_fn, params)(bbt(factors, jvp_fn(vector)))
    return result


def weighted_outputs(factors: Float[Array, "n O K"], coefficients, shape) -> Array:
    """`B_n e_n` for every datum, shaped like the outputs."""
    return jnp.einsum("nok,nk->no", factors, coefficients).reshape(shape)


def batch_factor_mv(
    model: Callable,
    params: PyTree,
    inputs: PyTree,
    factors: Callable[[Array], Float[Array, "n O K"]],
    coefficients: Float[Array, "n K"],
) -> PyTree:
    """`sum_n J_n^T B_n e_n`: one forward pass and one `vjp` over a batch."""
    outputs, vjp_fn = jax.vjp(lambda p: model(inputs, p), params)
    (result,) = vjp_fn(weighted_outputs(factors(outputs), coefficients, outputs.shape))
    return result


def batch_mv(
    model: Callable,
    params: PyTree,
    inputs: PyTree,
    factors: Callable[[Array], Float[Array, "n O K"]],
    vector: PyTree,
) -> PyTree:
    """One forward pass, one `jvp`, one `vjp` over a batch.

    `factors(outputs)` gives `B_n` from the batch's outputs `(n, *O)`.
    """
    outputs, jvp_fn = jax.linearize(lambda p: model(inputs, p), params)
    return linearised_mv(jvp_fn, params, factors(outputs), vector)


def per_datum_gradients(
    model_fn: Callable,
    vmap_over_data: bool,
    params: PyTree,
    inputs: PyTree,
    targets: PyTree,
    indices: Int[Array, " n"],
    factor_fn: FactorFn,
) -> PyTree[Float[Array, "n K ..."]]:
    """The rows `B_n^T J_n`: params-shaped, each leaf `(n, K, *leaf.shape)`.

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
