"""The curvature operators: empirical Fisher, Monte-Carlo Fisher and GGN.

All three are `factor * sum_n J_n^T B_n B_n^T J_n` (see `_core`) and differ only
in the factor `B_n` they ask of the likelihood:

| operator                  | `B_n`                                        |
|---------------------------|----------------------------------------------|
| `EmpiricalFisherOperator` | `g_n = ∇_f c(y_n, f_n)`                      |
| `MCFisherOperator`        | `[g_n1 .. g_nM] / sqrt(M)`, `y~_nm ~ r(y|f_n)` |
| `GGNOperator`             | `H_n^{1/2}`, `H_n = ∇²_f c(y_n, f_n)`          |
"""

import abc
import functools as ft
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree, Real

from . import _core
from ._likelihoods import (
    AbstractLikelihood,
    as_likelihood,
    has_sampler,
)
from ._queries import register_symmetric_psd
from ._sharding import check_chunking

Data = dict[str, Any] | tuple[Any, Any]
ModelFn = Callable[[Any, PyTree], Array]


# --------------------------------------------------------------------------- #
# Argument checking, shared by the three operators.
# --------------------------------------------------------------------------- #


def _check_params(params: PyTree) -> PyTree:
    def check(path, leaf):
        if not (
            eqx.is_array_like(leaf)
            and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
        ):
            kind = getattr(leaf, "dtype", type(leaf).__name__)
            raise TypeError(
                "params must be a pytree of floating arrays; got "
                f"{kind} at params{jtu.keystr(path)}."
            )
        return jnp.asarray(leaf)

    return jtu.tree_map_with_path(check, params)


def _split_data(data: Data) -> tuple[PyTree, PyTree]:
    if isinstance(data, dict) and set(data) >= {"input", "target"}:
        return data["input"], data["target"]
    if isinstance(data, tuple | list) and len(data) == 2:
        return tuple(data)
    raise TypeError(
        "data must be {'input': X, 'target': Y} or a tuple (X, Y); got "
        f"{type(data).__name__}"
        + (f" with keys {sorted(data)}" if isinstance(data, dict) else "")
        + "."
    )


def _leading(tree: PyTree, what: str) -> int:
    sizes = {
        jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jtu.tree_leaves(tree)
    }
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"data {what} must be arrays with one leading data axis of the same "
            f"length; got leading sizes {sorted(map(str, sizes))}."
        )
    return sizes.pop()


class _UnbatchedModel(eqx.Module):
    model_fn: ModelFn

    def __call__(self, inputs, params):
        one = jtu.tree_map(lambda leaf: leaf[0], inputs)
        return self.model_fn(one, params)[None]


class _UnbatchedGrad(eqx.Module):
    loss_grad_fn: Callable

    def __call__(self, outputs, targets):
        one = jtu.tree_map(lambda leaf: leaf[0], targets)
        return self.loss_grad_fn(outputs[0], one)[None]


def _check_count(name: str, value) -> None:
    if value is None or isinstance(value, jax.core.Tracer):
        return
    if np.ndim(value) != 0 or not np.all(np.asarray(value) > 0):
        raise ValueError(f"{name} must be a positive number; got {value!r}.")


class _Setup(eqx.Module):
    model_fn: ModelFn
    params: PyTree
    data: tuple[PyTree, PyTree]
    factor: Array
    num_data: int
    loss_grad_fn: Callable | None


def _setup(
    model_fn,
    params,
    data,
    likelihood: AbstractLikelihood | None,
    num_curv_samples,
    num_total_samples,
    vmap_over_data: bool,
    chunk_size,
    loss_grad_fn=None,
) -> _Setup:
    if not callable(model_fn):
        raise TypeError(
            "model_fn must be a callable model_fn(input, params); got "
            f"{type(model_fn).__name__}."
        )
    params = _check_params(params)
    inputs, targets = _split_data(data)
    if vmap_over_data:
        num_data = _leading(inputs, "input")
        num_targets = _leading(targets, "target")
    else:
        outputs = jax.eval_shape(model_fn, inputs, params)
        if outputs.ndim <= 1:  # one unbatched datum
            add_axis = ft.partial(jtu.tree_map, lambda leaf: jnp.asarray(leaf)[None])
            inputs, targets = add_axis(inputs), add_axis(targets)
            model_fn = _UnbatchedModel(model_fn)
            if loss_grad_fn is not None:
                loss_grad_fn = _UnbatchedGrad(loss_grad_fn)
        num_data = _leading(inputs, "input")
        num_targets = _leading(targets, "target")
    if num_targets != num_data:
        raise ValueError(
            f"data input has {num_data} data points but data target has "
            f"{num_targets}; axis 0 must index the same data points."
        )
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(
            f"chunk_size must be None or a positive int; got {chunk_size!r}."
        )
    check_chunking((inputs, targets), num_data, chunk_size)
    outputs = jax.eval_shape(
        _core.batched_model(model_fn, vmap_over_data), inputs, params
    )
    if likelihood is not None:
        jax.eval_shape(likelihood.prepare_targets, targets, outputs)
    _check_count("num_curv_samples", num_curv_samples)
    _check_count("num_total_samples", num_total_samples)
    num_curv = num_data if num_curv_samples is None else num_curv_samples
    num_total = num_curv if num_total_samples is None else num_total_samples
    dtype = jnp.result_type(*jtu.tree_leaves(params))
    factor = jnp.asarray(num_total, dtype) / jnp.asarray(num_curv, dtype)
    return _Setup(model_fn, params, (inputs, targets), factor, num_data, loss_grad_fn)


def _structure(params: PyTree) -> PyTree[jax.ShapeDtypeStruct]:
    return jtu.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), params
    )


def _check_vector(operator: lx.AbstractLinearOperator, vector: PyTree) -> None:
    expected = operator.in_structure()
    if jtu.tree_structure(vector) != jtu.tree_structure(expected):
        raise ValueError(
            "vector must have the structure of params "
            f"{jtu.tree_structure(expected)}; got {jtu.tree_structure(vector)}."
        )
    for path, leaf, want in zip(
        (p for p, _ in jtu.tree_leaves_with_path(expected)),
        jtu.tree_leaves(vector),
        jtu.tree_leaves(expected),
        strict=True,
    ):
        shape, dtype = jnp.shape(leaf), jnp.result_type(leaf)
        if shape != want.shape or dtype != want.dtype:
            raise ValueError(
                f"vector{jtu.keystr(path)} must be {want.dtype}{list(want.shape)} "
                f"like params; got {dtype}{list(shape)}."
            )


def _scale(tree: PyTree, factor: Array) -> PyTree:
    return jtu.tree_map(lambda leaf: leaf * factor.astype(leaf.dtype), tree)


# --------------------------------------------------------------------------- #
# The operators.
# --------------------------------------------------------------------------- #


class AbstractCurvatureOperator(lx.AbstractLinearOperator):
    """`factor * sum_n J_n^T B_n B_n^T J_n` as a symmetric PSD lineax operator.

    The concrete operators differ only in how they make `B_n`. Vectors are
    params-shaped pytrees; `as_matrix()` is `(P, P)` in `ravel_pytree` order.
    """

    model_fn: eqx.AbstractVar[ModelFn]
    params: eqx.AbstractVar[PyTree[Float[Array, "..."]]]
    data: eqx.AbstractVar[tuple[PyTree, PyTree]]
    scale: eqx.AbstractVar[Float[Array, ""]]
    num_data: eqx.AbstractVar[int]
    vmap_over_data: eqx.AbstractVar[bool]
    chunk_size: eqx.AbstractVar[int | None]

    @abc.abstractmethod
    def _likelihood_factors(
        self, outputs: Array, targets: PyTree, indices: Int[Array, " n"]
    ) -> Float[Array, "n O K"]:
        """`B_n` for a batch of outputs `(n, *O)`, their targets and data indices."""

    def mv(self, vector: PyTree[Float[Array, "..."]]) -> PyTree[Float[Array, "..."]]:
        _check_vector(self, vector)
        model = _core.batched_model(self.model_fn, self.vmap_over_data)

        def on_chunk(data, indices, weights):
            inputs, targets = data

            def factors(outputs):
                scaled = self._likelihood_factors(outputs, targets, indices)
                return scaled * weights[:, None, None].astype(scaled.dtype)

            return _core.batch_mv(model, self.params, inputs, factors, vector)

        total = _core.chunked_sum(on_chunk, self.data, self.num_data, self.chunk_size)
        return _scale(total, self.scale)

    def sqrt_mv(
        self, coefficients: Float[Array, "N K"]
    ) -> PyTree[Float[Array, "..."]]:
        """`A e` for the square-root factor `A` of this operator (`A A^T = C`).

        `A = sqrt(factor) [J_1^T B_1, ..., J_N^T B_N]` maps `e` of shape
        `(N, K)` (see `sqrt_shape`) to a params-shaped pytree. With `e` standard
        normal, `A e ~ N(0, C)`: the curvature part of an exact posterior sample.
        """
        model = _core.batched_model(self.model_fn, self.vmap_over_data)

        def on_chunk(data, indices, weights):
            (inputs, targets), chunk_coefficients = data

            def factors(outputs):
                scaled = self._likelihood_factors(outputs, targets, indices)
                return scaled * weights[:, None, None].astype(scaled.dtype)

            return _core.batch_sqrt_mv(
                model, self.params, inputs, factors, chunk_coefficients
            )

        total = _core.chunked_sum(
            on_chunk, (self.data, coefficients), self.num_data, self.chunk_size
        )
        return _scale(total, jnp.sqrt(self.scale))

    def sqrt_shape(self) -> tuple[int, int]:
        """`(N, K)`: the shape of the coefficients `sqrt_mv` takes."""
        return (self.num_data, self._num_columns())

    def as_matrix(self) -> Float[Array, "P P"]:
        size = self.in_size()
        if self.num_data * self._num_columns() < size:

            def gram(rows):
                flat = jnp.concatenate(
                    [row.reshape(-1, row[0, 0].size) for row in jtu.tree_leaves(rows)],
                    axis=1,
                )  # (n K, P), in ravel_pytree order
                return flat.T @ flat

            gram = self._per_datum_sum(gram, self.chunk_size)
            return gram * self.scale.astype(gram.dtype)
        return _dense_from_mv(self.linearise())

    def diagonal(self) -> Float[Array, " P"]:
        """The exact diagonal `factor * sum_{n,k} (J_n^T B_n)_{:,k}^2`, flattened.

        The squared rows are accumulated chunk by chunk, elementwise, in a buffer
        of about `_ROWS_BYTES` (CPU) or `_ACCELERATOR_ROWS_BYTES`; only then are its
        rows summed.
        """
        squares = self._per_datum_sum(
            ft.partial(jtu.tree_map, jnp.square), self._rows_chunk_size()
        )
        diag = jfu.ravel_pytree(jtu.tree_map(_sum_rows, squares))[0]
        return diag * self.scale.astype(diag.dtype)

    def linearise(self) -> "LinearisedCurvatureOperator":
        """Do the primal work once: the forward pass and the factors `B_n`.

        Returns an operator with the same numbers whose `mv` costs one linear
        `jvp` and one `vjp`. With `chunk_size` set, only the factors are kept
        (activations would grow with the data) and each `mv` redoes the forward
        pass chunk by chunk. Equal to `lineax.linearise(operator)`.
        """
        return LinearisedCurvatureOperator(self)

    def transpose(self) -> "AbstractCurvatureOperator":
        return self

    def in_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        return _structure(self.params)

    def out_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        return _structure(self.params)

    def _num_columns(self) -> int:
        inputs, targets = jtu.tree_map(lambda leaf: leaf[:1], self.data)
        model = _core.batched_model(self.model_fn, self.vmap_over_data)
        shape = jax.eval_shape(
            lambda: self._likelihood_factors(
                model(inputs, self.params), targets, jnp.zeros(1, int)
            )
        ).shape
        return shape[-1]

    def _rows_chunk_size(self) -> int:
        """Data points per chunk whose rows `B_n^T J_n` take about `_ROWS_BYTES`."""
        row_bytes = self._num_columns() * sum(
            leaf.size * leaf.dtype.itemsize for leaf in jtu.tree_leaves(self.params)
        )
        cpu = jax.default_backend() == "cpu"
        budget = _ROWS_BYTES if cpu else _ACCELERATOR_ROWS_BYTES
        size = max(1, budget // row_bytes)
        if self.chunk_size is not None:
            size = min(size, self.chunk_size)
        return _core.layout_chunk_size(self.num_data, size)

    def _per_datum_sum(
        self, reduce: Callable[[PyTree[Array]], PyTree[Array]], chunk_size: int | None
    ) -> PyTree[Array]:
        """`sum_chunks reduce(rows)`; `rows` is params-shaped, leaves `(n, K, ...)`."""

        def on_chunk(data, indices, weights):
            inputs, targets = data
            rows = _core.per_datum_gradients(
                self.model_fn,
                self.vmap_over_data,
                self.params,
                inputs,
                targets,
                indices,
                self._likelihood_factors,
            )

            def weigh(row):
                return row * weights.astype(row.dtype).reshape(
                    -1, *(1,) * (row.ndim - 1)
                )

            return reduce(jtu.tree_map(weigh, rows))

        return _core.chunked_sum(on_chunk, self.data, self.num_data, chunk_size)


# Per-datum gradients are computed in chunks of about this many bytes: on a CPU,
# small enough to stay in cache; on an accelerator, large enough that the scan over
# the chunks takes few steps (each step costs kernel launches).
_ROWS_BYTES = 2**22
_ACCELERATOR_ROWS_BYTES = 2**28


def _sum_rows(leaf: Float[Array, "n K ..."]) -> Float[Array, "..."]:
    """`leaf.sum((0, 1))`, as a matrix-vector product: XLA:CPU is slow to reduce
    over leading axes."""
    rows = leaf.shape[0] * leaf.shape[1]
    return (jnp.ones(rows, leaf.dtype) @ leaf.reshape(rows, -1)).reshape(leaf.shape[2:])


def _dense_from_mv(operator: lx.AbstractLinearOperator) -> Array:
    structure = operator.in_structure()
    zeros = jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), structure)
    flat, unravel = jfu.ravel_pytree(zeros)
    basis = jnp.eye(flat.size, dtype=flat.dtype)
    columns = jax.lax.map(
        lambda e: jfu.ravel_pytree(operator.mv(unravel(e)))[0],
        basis,
        batch_size=min(flat.size, 64),
    )
    return columns.T


class LinearisedCurvatureOperator(lx.AbstractLinearOperator):
    """A curvature operator with its primal work done: see `linearise()`."""

    operator: AbstractCurvatureOperator
    likelihood_factors: Float[Array, "N O K"]
    jvp_fn: Callable | None

    def __init__(self, operator: AbstractCurvatureOperator):
        self.operator = operator
        inputs, targets = operator.data
        model = _core.batched_model(operator.model_fn, operator.vmap_over_data)
        if _core.num_chunks(operator.num_data, operator.chunk_size) == 1:
            outputs, self.jvp_fn = jax.linearize(
                lambda p: model(inputs, p), operator.params
            )
            self.likelihood_factors = operator._likelihood_factors(
                outputs, targets, jnp.arange(operator.num_data)
            )
        else:
            self.jvp_fn = None

            def on_chunk(data, indices):
                outputs = model(data[0], operator.params)
                return operator._likelihood_factors(outputs, data[1], indices)

            self.likelihood_factors = _core.chunked_map(
                on_chunk, operator.data, operator.num_data, operator.chunk_size
            )

    def mv(self, vector):
        _check_vector(self, vector)
        operator = self.operator
        if self.jvp_fn is not None:
            total = _core.linearised_mv(
                self.jvp_fn, operator.params, self.likelihood_factors, vector
            )
        else:
            model = _core.batched_model(operator.model_fn, operator.vmap_over_data)

            num_data, *shape = self.likelihood_factors.shape

            def on_chunk(data, indices, weights):
                inputs, factors = data
                factors = factors.reshape(-1, *shape)

                def scaled(outputs):
                    del outputs
                    return factors * weights[:, None, None].astype(factors.dtype)

                return _core.batch_mv(model, operator.params, inputs, scaled, vector)

            # The factors travel as `(N, O K)`: XLA copies an `(N, O, 1)` array
            # (for its layout) on every `mv`.
            total = _core.chunked_sum(
                on_chunk,
                (operator.data[0], self.likelihood_factors.reshape(num_data, -1)),
                operator.num_data,
                operator.chunk_size,
            )
        return _scale(total, operator.scale)

    def sqrt_mv(self, coefficients: Float[Array, "N K"]) -> PyTree:
        """As `AbstractCurvatureOperator.sqrt_mv`, with the stored factors."""
        operator = self.operator
        if self.jvp_fn is None:
            return operator.sqrt_mv(coefficients)
        (total,) = jax.linear_transpose(self.jvp_fn, operator.params)(
            _core.weighted_outputs(
                self.likelihood_factors,
                coefficients,
                jax.eval_shape(self.jvp_fn, operator.params).shape,
            )
        )
        return _scale(total, jnp.sqrt(operator.scale))

    def sqrt_shape(self) -> tuple[int, int]:
        return self.likelihood_factors.shape[0], self.likelihood_factors.shape[2]

    def as_matrix(self):
        return self.operator.as_matrix()

    def transpose(self):
        return self

    def in_structure(self):
        return self.operator.in_structure()

    def out_structure(self):
        return self.operator.out_structure()


def empirical_likelihood(loss_fn, loss_grad_fn) -> AbstractLikelihood | None:
    """Check the empirical Fisher's loss arguments; the likelihood of `loss_fn`."""
    if (loss_fn is None) == (loss_grad_fn is None):
        raise ValueError(
            "the empirical Fisher needs exactly one of loss_fn and loss_grad_fn; "
            f"got {'both' if loss_fn is not None else 'neither'}."
        )
    if loss_grad_fn is not None and not callable(loss_grad_fn):
        raise TypeError(
            f"loss_grad_fn must be callable; got {type(loss_grad_fn).__name__}."
        )
    return as_likelihood(loss_fn)


def mc_arguments(loss_fn, key, mc_samples) -> tuple[AbstractLikelihood, int]:
    """Check the Monte-Carlo Fisher's arguments; its likelihood and `mc_samples`."""
    if loss_fn is None:
        raise ValueError("the Monte-Carlo Fisher needs loss_fn; got None.")
    likelihood = as_likelihood(loss_fn)
    if not has_sampler(likelihood):
        raise ValueError(
            "the Monte-Carlo Fisher needs a loss_fn it can sample labels from: a "
            "built-in loss name or a fisherops.Likelihood(loss, sample=...); "
            "got a callable loss without a sampler."
        )
    _check_key(key)
    mc_samples = 1 if mc_samples is None else mc_samples  # laplax allows None
    if (
        isinstance(mc_samples, bool)
        or not isinstance(mc_samples, int | np.integer)
        or mc_samples < 1
    ):
        raise ValueError(f"mc_samples must be an int >= 1; got {mc_samples!r}.")
    return likelihood, int(mc_samples)


class EmpiricalFisherOperator(AbstractCurvatureOperator):
    r"""The empirical Fisher as a lineax operator.

    $$F v = \text{factor} \sum_n J_n^\top g_n g_n^\top J_n v, \qquad
    g_n = \nabla_{f} c(y_n, f_n),$$

    with `J_n` the Jacobian of `model_fn(x_n, ·)` at `params` and
    `factor = num_total_samples / num_curv_samples` (by default 1: a plain sum
    over the data given).

    **Arguments:**

    - `model_fn`: `model_fn(input, params) -> output`. With `vmap_over_data=True`
      it sees one datum and returns `(O,)`; with `False` it sees the batch
      `(N, ...)` and returns `(N, O)` (a single unbatched datum is also accepted).
    - `params`: a pytree of floating arrays, the point of linearisation.
    - `data`: `{"input": X, "target": Y}` or `(X, Y)`; axis 0 indexes data points.
    - `loss_fn`: `"mse"`, `"cross_entropy"`, `"binary_cross_entropy"`, a per-datum
      callable `c(output, target) -> scalar`, or a
      [`fisherops.AbstractLikelihood`][]. Give exactly one of `loss_fn` and
      `loss_grad_fn`.
    - `num_curv_samples`: defaults to the number of data points `N`.
    - `num_total_samples`: defaults to `num_curv_samples`.
    - `vmap_over_data`: whether `model_fn` (and `loss_grad_fn`) see one datum
      (`True`) or the whole batch (`False`). Both give the same matrix.
    - `loss_grad_fn`: `loss_grad_fn(output, target) -> ∇_f c`, instead of `loss_fn`.
    - `chunk_size`: evaluate the data in chunks of this many points (`None`: all at
      once). Memory is then bounded by the chunk, not by `N`; the matrix is the same.
    """

    model_fn: ModelFn
    params: PyTree[Float[Array, "..."]]
    data: tuple[PyTree, PyTree]
    scale: Float[Array, ""]
    likelihood: AbstractLikelihood | None
    loss_grad_fn: Callable | None
    num_data: int = eqx.field(static=True)
    vmap_over_data: bool = eqx.field(static=True)
    chunk_size: int | None = eqx.field(static=True)

    def __init__(
        self,
        model_fn: ModelFn,
        params: PyTree[Float[Array, "..."]],
        data: Data,
        loss_fn: "str | Callable | AbstractLikelihood | None" = None,
        *,
        num_curv_samples: Real[Array, ""] | float | None = None,
        num_total_samples: Real[Array, ""] | float | None = None,
        vmap_over_data: bool = True,
        loss_grad_fn: Callable | None = None,
        chunk_size: int | None = None,
    ):
        self.likelihood = empirical_likelihood(loss_fn, loss_grad_fn)
        setup = _setup(
            model_fn,
            params,
            data,
            self.likelihood,
            num_curv_samples,
            num_total_samples,
            vmap_over_data,
            chunk_size,
            loss_grad_fn,
        )
        self.model_fn = setup.model_fn
        self.params = setup.params
        self.data = setup.data
        self.scale = setup.factor
        self.num_data = setup.num_data
        self.loss_grad_fn = setup.loss_grad_fn
        self.vmap_over_data = vmap_over_data
        self.chunk_size = chunk_size

    def _likelihood_factors(self, outputs, targets, indices):
        del indices
        if self.loss_grad_fn is not None:
            grad_fn = self.loss_grad_fn
            if self.vmap_over_data:
                grad_fn = jax.vmap(grad_fn)
            grads = grad_fn(outputs, targets)
        else:
            targets = self.likelihood.prepare_targets(targets, outputs)
            grads = jax.vmap(self.likelihood.output_grad)(outputs, targets)
        return grads.reshape(grads.shape[0], -1, 1).astype(outputs.dtype)


def _check_key(key) -> None:
    if key is None:
        raise ValueError(
            "MCFisherOperator needs key, a jax.random.key (or PRNGKey) to draw "
            "its samples; got None."
        )
    typed = jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key)
    raw = jnp.result_type(key) == jnp.uint32 and jnp.shape(key) == (2,)
    if not (typed or raw) or (typed and jnp.shape(key) != ()):
        raise ValueError(
            "key must be one jax.random.key (or PRNGKey); got "
            f"{jnp.result_type(key)}{list(jnp.shape(key))}."
        )


class MCFisherOperator(AbstractCurvatureOperator):
    r"""The Monte-Carlo Fisher as a lineax operator.

    $$F v = \frac{\text{factor}}{M} \sum_{n,m} J_n^\top g_{nm} g_{nm}^\top J_n v,
    \qquad g_{nm} = \nabla_f c(\tilde y_{nm}, f_n),\quad
    \tilde y_{nm} \sim r(y \mid f_n) \propto e^{-c(y, f_n)},$$

    with `M = mc_samples`. The sample `ỹ_nm` depends only on `(key, n, m)`, so for
    one `key` this is one fixed matrix, whatever `vmap_over_data`, `chunk_size` or
    sharding. Its expectation over keys is the GGN (for the built-in losses).

    **Arguments:** as [`fisherops.EmpiricalFisherOperator`][], plus

    - `loss_fn`: a loss name or a likelihood with a sampler (a plain callable loss
      cannot be sampled from).
    - `key`: a `jax.random.key`.
    - `mc_samples`: `M >= 1`, the number of label samples per datum.
    - `first_index`: the global index of `data`'s first point, when `data` is one
      batch of a larger data set: the samples then depend on
      `(key, first_index + n, m)`, so batches of one data set draw the samples the
      whole data set would. [`fisherops.StreamedOperator`][] sets it for you.
    """

    model_fn: ModelFn
    params: PyTree[Float[Array, "..."]]
    data: tuple[PyTree, PyTree]
    scale: Float[Array, ""]
    likelihood: AbstractLikelihood
    key: PRNGKeyArray
    first_index: Int[Array, ""]
    num_data: int = eqx.field(static=True)
    vmap_over_data: bool = eqx.field(static=True)
    chunk_size: int | None = eqx.field(static=True)
    mc_samples: int = eqx.field(static=True)

    def __init__(
        self,
        model_fn: ModelFn,
        params: PyTree[Float[Array, "..."]],
        data: Data,
        loss_fn: "str | AbstractLikelihood",
        key: PRNGKeyArray,
        *,
        num_curv_samples: Real[Array, ""] | float | None = None,
        num_total_samples: Real[Array, ""] | float | None = None,
        vmap_over_data: bool = True,
        mc_samples: int | None = 1,
        chunk_size: int | None = None,
        first_index: Int[Array, ""] | int = 0,
    ):
        likelihood, mc_samples = mc_arguments(loss_fn, key, mc_samples)
        setup = _setup(
            model_fn,
            params,
            data,
            likelihood,
            num_curv_samples,
            num_total_samples,
            vmap_over_data,
            chunk_size,
        )
        self.model_fn = setup.model_fn
        self.params = setup.params
        self.data = setup.data
        self.scale = setup.factor
        self.num_data = setup.num_data
        self.likelihood = likelihood
        self.key = key
        self.first_index = jnp.asarray(first_index, dtype=int)
        self.vmap_over_data = vmap_over_data
        self.chunk_size = chunk_size
        self.mc_samples = int(mc_samples)

    def _likelihood_factors(self, outputs, targets, indices):
        del targets
        likelihood = self.likelihood
        samples = jnp.arange(self.mc_samples)

        def one_datum(output, index):
            datum_key = jax.random.fold_in(self.key, self.first_index + index)

            def one_sample(m):
                draw = likelihood.sample(jax.random.fold_in(datum_key, m), output)
                return likelihood.output_grad(output, draw).reshape(-1)

            return jax.vmap(one_sample, out_axes=1)(samples)

        grads = jax.vmap(one_datum)(outputs, indices)
        return grads.astype(outputs.dtype) / math.sqrt(self.mc_samples)


class GGNOperator(AbstractCurvatureOperator):
    r"""The generalised Gauss-Newton matrix (the exact Fisher) as a lineax operator.

    $$G v = \text{factor} \sum_n J_n^\top H_n J_n v, \qquad
    H_n = \nabla^2_f c(y_n, f_n) = B_n B_n^\top,$$

    with `B_n` the likelihood's `hessian_sqrt`: `sqrt(2) I` for mse,
    `diag(sqrt p) - p sqrt(p)^T` for cross-entropy, `diag(sqrt(p (1 - p)))` for
    binary cross-entropy. The Monte-Carlo Fisher is an unbiased estimate of it.

    **Arguments:** as [`fisherops.EmpiricalFisherOperator`][]; `loss_fn` is a loss
    name, a callable loss (its Hessian by autodiff) or a likelihood.
    """

    model_fn: ModelFn
    params: PyTree[Float[Array, "..."]]
    data: tuple[PyTree, PyTree]
    scale: Float[Array, ""]
    likelihood: AbstractLikelihood
    num_data: int = eqx.field(static=True)
    vmap_over_data: bool = eqx.field(static=True)
    chunk_size: int | None = eqx.field(static=True)

    def __init__(
        self,
        model_fn: ModelFn,
        params: PyTree[Float[Array, "..."]],
        data: Data,
        loss_fn: "str | AbstractLikelihood",
        *,
        num_curv_samples: Real[Array, ""] | float | None = None,
        num_total_samples: Real[Array, ""] | float | None = None,
        vmap_over_data: bool = True,
        chunk_size: int | None = None,
    ):
        if loss_fn is None:
            raise ValueError("GGNOperator needs loss_fn; got None.")
        likelihood = as_likelihood(loss_fn)
        setup = _setup(
            model_fn,
            params,
            data,
            likelihood,
            num_curv_samples,
            num_total_samples,
            vmap_over_data,
            chunk_size,
        )
        self.model_fn = setup.model_fn
        self.params = setup.params
        self.data = setup.data
        self.scale = setup.factor
        self.num_data = setup.num_data
        self.likelihood = likelihood
        self.vmap_over_data = vmap_over_data
        self.chunk_size = chunk_size

    def _likelihood_factors(self, outputs, targets, indices):
        del indices
        targets = self.likelihood.prepare_targets(targets, outputs)
        factors = jax.vmap(self.likelihood.hessian_sqrt)(outputs, targets)
        return factors.astype(outputs.dtype)


# --------------------------------------------------------------------------- #
# lineax's single-dispatch queries.
# --------------------------------------------------------------------------- #

_Curvature = AbstractCurvatureOperator | LinearisedCurvatureOperator


@lx.linearise.register(AbstractCurvatureOperator)
def _(operator):
    return operator.linearise()


@lx.linearise.register(LinearisedCurvatureOperator)
def _(operator):
    return operator


@lx.materialise.register(AbstractCurvatureOperator)
@lx.materialise.register(LinearisedCurvatureOperator)
def _(operator):
    matrix = operator.as_matrix()
    structure = operator.in_structure()
    _, unravel = jfu.ravel_pytree(
        jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), structure)
    )
    leaves, treedef = jtu.tree_flatten(structure)
    starts = np.cumsum([0] + [leaf.size for leaf in leaves])
    rows = [
        jtu.tree_map(
            lambda block, leaf=leaf: block.reshape(leaf.shape + block.shape[1:]),
            jax.vmap(unravel)(matrix[start : start + leaf.size]),
        )
        for leaf, start in zip(leaves, starts, strict=False)
    ]
    return lx.PyTreeLinearOperator(
        jtu.tree_unflatten(treedef, rows),
        operator.out_structure(),
        (lx.symmetric_tag, lx.positive_semidefinite_tag),
    )


@lx.diagonal.register(AbstractCurvatureOperator)
def _(operator):
    return operator.diagonal()


@lx.diagonal.register(LinearisedCurvatureOperator)
def _(operator):
    return operator.operator.diagonal()


@lx.tridiagonal.register(AbstractCurvatureOperator)
@lx.tridiagonal.register(LinearisedCurvatureOperator)
def _(operator):
    matrix = operator.as_matrix()
    return jnp.diagonal(matrix), jnp.diagonal(matrix, -1), jnp.diagonal(matrix, 1)


@lx.conj.register(AbstractCurvatureOperator)
@lx.conj.register(LinearisedCurvatureOperator)
def _(operator):
    return operator


register_symmetric_psd(AbstractCurvatureOperator, LinearisedCurvatureOperator)
