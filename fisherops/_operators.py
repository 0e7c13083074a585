"""The curvature operators: empirical Fisher, Monte-Carlo Fisher and GGN.

All three are `scale * sum_n J_n^T B_n B_n^T J_n` (see `_core`) and differ only
in the likelihood factor `B_n` they ask of the likelihood:

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
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree, Real, UInt

from . import _core
from ._checks import (
    Data,
    ModelFn,
    _check_vector,
    _setup,
    empirical_likelihood,
    mc_arguments,
)
from ._likelihoods import AbstractLikelihood, as_likelihood
from ._queries import register_symmetric_psd


def _structure(params: PyTree) -> PyTree[jax.ShapeDtypeStruct]:
    return jtu.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), params
    )


def _check_algorithm(algorithm: str | None) -> str | None:
    if algorithm not in (None, "rows", "mv"):
        raise ValueError(
            f"algorithm must be None (choose by cost), 'rows' or 'mv'; got "
            f"{algorithm!r}."
        )
    return algorithm


class _Shown:
    """A scalar that a repr prints by value."""

    def __init__(self, value: float):
        self.value = value

    def __repr__(self):
        return repr(self.value)


# --------------------------------------------------------------------------- #
# The operators.
# --------------------------------------------------------------------------- #


class _AbstractScalable(lx.AbstractLinearOperator):
    """Multiplying by a non-negative Python, numpy or concrete JAX scalar gives the
    same kind of fisherops operator with its `scale` multiplied (still PSD for
    lineax, `sqrt_mv` and chunking kept); any other scalar gives lineax's product.
    """

    def __mul__(self, other) -> lx.AbstractLinearOperator:
        if _is_concrete_nonnegative(other):
            return with_scale(self, other)
        return super().__mul__(other)

    def __rmul__(self, other) -> lx.AbstractLinearOperator:
        return self * other

    def __truediv__(self, other) -> lx.AbstractLinearOperator:
        if _is_concrete_nonnegative(other) and np.asarray(other) > 0:
            return with_scale(self, 1 / np.asarray(other, np.float64))
        return super().__truediv__(other)


class AbstractCurvatureOperator(_AbstractScalable):
    """`scale * sum_n J_n^T B_n B_n^T J_n` as a symmetric PSD lineax operator.

    The concrete operators differ only in how they make `B_n`. Vectors are
    params-shaped pytrees; `as_matrix()` is `(P, P)` and `diagonal()` is `(P,)`,
    both in `ravel_pytree` order. Every method that does array work is compiled
    once per shape (`eqx.filter_jit`): repeated eager calls with new arrays of the
    same shapes compile nothing.
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

    # The output-space products go through a per-datum "state": by default the
    # factors `B_n` themselves, with `B_n B_n^T t_n` as the product. The GGN keeps
    # the outputs instead and multiplies by the likelihood's Hessian (O(O) for the
    # built-in losses, where forming `B_n` costs O(O^2)).

    def _output_state(
        self, outputs: Array, targets: PyTree, indices: Int[Array, " n"]
    ) -> PyTree:
        """What `_state_mv` and `_state_factors` need of a batch (axis 0: data)."""
        return self._likelihood_factors(outputs, targets, indices)

    def _state_factors(self, state: PyTree) -> Float[Array, "n O K"]:
        """`B_n` from the state."""
        return state

    def _state_mv(self, state: PyTree, tangents: Array) -> Array:
        """`B_n B_n^T t_n` for output tangents `t` shaped `(n, *O)`."""
        return _core.bbt(state, tangents)

    @eqx.filter_jit
    def mv(self, vector: PyTree[Float[Array, "..."]]) -> PyTree[Float[Array, "..."]]:
        vector = _check_vector(self, vector)
        model = self._model()

        def on_chunk(data, indices, weights):
            inputs, targets = data
            outputs, jvp_fn = jax.linearize(lambda p: model(inputs, p), self.params)
            state = self._output_state(outputs, targets, indices)
            return _core.linearised_mv(
                jvp_fn,
                self.params,
                lambda t: _core.weighted(weights, self._state_mv(state, t)),
                vector,
            )

        total = _core.chunked_sum(on_chunk, self.data, self.num_data, self.chunk_size)
        return _core.scaled(total, self.scale)

    @eqx.filter_jit
    def sqrt_mv(self, coefficients: Float[Array, "N K"]) -> PyTree[Float[Array, "..."]]:
        """`A e` for the square root `A` of this operator (`A A^T = C`).

        `A = sqrt(scale) [J_1^T B_1, ..., J_N^T B_N]` maps `e` of shape `(N, K)`
        (see `sqrt_shape`) to a params-shaped pytree. With `e` standard normal,
        `A e ~ N(0, C)`: the curvature part of an exact posterior sample.
        """
        coefficients = self._check_coefficients(coefficients)
        model = self._model()

        def on_chunk(data, indices, weights):
            (inputs, targets), chunk_coefficients = data
            outputs, vjp_fn = jax.vjp(lambda p: model(inputs, p), self.params)
            factors = self._likelihood_factors(outputs, targets, indices)
            cotangents = _core.weighted_outputs(
                factors,
                _core.weighted(weights, chunk_coefficients).astype(factors.dtype),
                outputs.shape,
            )
            (result,) = vjp_fn(cotangents)
            return result

        total = _core.chunked_sum(
            on_chunk, (self.data, coefficients), self.num_data, self.chunk_size
        )
        return _core.scaled(total, jnp.sqrt(self.scale))

    def sqrt_shape(self) -> tuple[int, int]:
        """`(N, K)`: the shape of the coefficients `sqrt_mv` takes."""
        return (self.num_data, self._num_columns())

    @eqx.filter_jit
    def as_matrix(self, algorithm: str | None = None) -> Float[Array, "P P"]:
        """The dense `(P, P)` matrix, in `ravel_pytree` order.

        `algorithm="rows"`: the per-datum rows `R_n = B_n^T J_n` (`K` `vjp`s per
        datum), accumulated as `sum_chunks R_c^T R_c` in chunks of data, so memory
        is `chunk K P + P^2`. `"mv"`: `P` linearised products with the basis
        vectors. `None` (default): the cheaper of the two, estimated from XLA's
        cost analysis of the model's forward, `mv` and rows computations.
        """
        if self._dense_route(_check_algorithm(algorithm)) == "mv":
            return _core.dense_from_mv(self.linearise().mv, self.in_structure())

        def gram(rows):
            flat = _core.flat_rows(rows)
            return flat.T @ flat

        matrix = self._rows_sum(gram, self._rows_chunk_size(_GRAM_BYTES))
        return _core.scaled(matrix, self.scale)

    @eqx.filter_jit
    def diagonal(self, algorithm: str | None = None) -> Float[Array, " P"]:
        """The exact diagonal, flat `(P,)` in `ravel_pytree` order.

        `algorithm="rows"`: `scale * sum_{n,k} (R_n)_{k,:}^2` from the per-datum
        rows, squared and accumulated chunk by chunk; `"mv"`: from `P` linearised
        products; `None`: the cheaper (see `as_matrix`).
        """
        if self._dense_route(_check_algorithm(algorithm), diagonal=True) == "mv":
            return _core.dense_from_mv(
                self.linearise().mv, self.in_structure(), diagonal_only=True
            )
        squares = self._rows_sum(
            ft.partial(jtu.tree_map, jnp.square), self._rows_chunk_size(_ROWS_BYTES)
        )
        diag = jfu.ravel_pytree(jtu.tree_map(_core.sum_rows, squares))[0]
        return _core.scaled(diag, self.scale)

    @eqx.filter_jit
    def linearise(self) -> "LinearisedCurvatureOperator":
        """Do the primal work once: the forward pass and the output-space state.

        Returns an operator with the same numbers whose `mv` costs one linear
        `jvp` and one `vjp`. With `chunk_size` set, only the per-datum state is
        kept (activations would grow with the data) and each `mv` redoes the
        forward pass chunk by chunk. Equal to `lineax.linearise(operator)`.
        """
        return LinearisedCurvatureOperator(self)

    def transpose(self) -> "AbstractCurvatureOperator":
        return self

    def in_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        return _structure(self.params)

    def out_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        return _structure(self.params)

    def __repr__(self) -> str:
        if isinstance(self.scale, jax.core.Tracer):
            return eqx.tree_pformat(self)
        shown = _Shown(float(np.asarray(self.scale)))
        return eqx.tree_pformat(eqx.tree_at(lambda o: o.scale, self, shown))

    def _model(self) -> Callable:
        return _core.batched_model(self.model_fn, self.vmap_over_data)

    def _num_columns(self) -> int:
        inputs, targets = jtu.tree_map(lambda leaf: leaf[:1], self.data)
        shape = jax.eval_shape(
            lambda: self._likelihood_factors(
                self._model()(inputs, self.params), targets, jnp.zeros(1, int)
            )
        ).shape
        return shape[-1]

    def _check_coefficients(self, coefficients: Array) -> Array:
        if jnp.shape(coefficients) != self.sqrt_shape():
            raise ValueError(
                f"coefficients must have shape sqrt_shape() = {self.sqrt_shape()}; "
                f"got {jnp.shape(coefficients)}."
            )
        return coefficients

    def _rows_chunk_size(self, budget: int) -> int:
        """Data points per chunk whose rows `B_n^T J_n` take about `budget` bytes."""
        row_bytes = self._num_columns() * sum(
            leaf.size * leaf.dtype.itemsize for leaf in jtu.tree_leaves(self.params)
        )
        if jax.default_backend() != "cpu":
            budget = max(budget, _ACCELERATOR_ROWS_BYTES)
        size = max(1, budget // row_bytes)
        if self.chunk_size is not None:
            size = min(size, self.chunk_size)
        return _core.layout_chunk_size(self.num_data, size)

    def _rows(self, inputs, targets, indices) -> PyTree[Float[Array, "n K ..."]]:
        return _core.per_datum_rows(
            self.model_fn,
            self.vmap_over_data,
            self.params,
            inputs,
            targets,
            indices,
            self._likelihood_factors,
        )

    def _rows_sum(
        self, reduce: Callable[[PyTree[Array]], PyTree[Array]], chunk_size: int | None
    ) -> PyTree[Array]:
        """`sum_chunks reduce(rows)`; `rows` is params-shaped, leaves `(n, K, ...)`."""

        def on_chunk(data, indices, weights):
            rows = self._rows(*data, indices)
            return reduce(jtu.tree_map(ft.partial(_core.weighted, weights), rows))

        return _core.chunked_sum(on_chunk, self.data, self.num_data, chunk_size)

    def _dense_route(self, algorithm: str | None, *, diagonal: bool = False) -> str:
        """`algorithm`, or the cheaper route for a dense matrix (or its diagonal).

        An honest operation count (`_core.estimated_seconds`: the matrix-product,
        convolution and other operations of the traced computations over the
        whole data, each at its own rate): the rows route is the per-datum rows
        plus their accumulation (`2 N K P^2` flops for the matrix, `2 N K P` for
        the diagonal); the `mv` route is `P` linearised products (an `mv` less
        its forward pass).
        """
        if algorithm is not None:
            return algorithm
        dynamic, static = eqx.partition(self, eqx.is_array)
        abstract = jtu.tree_map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), dynamic
        )

        def seconds(method, *args, **kwargs):
            def fn(dynamic, *args):
                return method(eqx.combine(dynamic, static), *args)

            return _core.estimated_seconds(fn, abstract, *args, **kwargs)

        size, columns = self.in_size(), self._num_columns()
        accumulate = 2 * self.num_data * columns * size * (1 if diagonal else size)
        indices = jax.ShapeDtypeStruct((self.num_data,), jnp.int32)
        rows = seconds(
            lambda op, i: op._rows(*op.data, i), indices, matmul_flops=accumulate
        )
        forward = seconds(lambda op: op._model()(op.data[0], op.params))
        mv = seconds(lambda op, v: op.mv(v), self.in_structure())
        return "rows" if rows <= size * max(mv - forward, 0.0) else "mv"


# Per-datum rows are computed in chunks of about this many bytes: on a CPU, small
# enough to stay in cache (a diagonal) or large enough for an efficient matrix
# product (a dense matrix); on an accelerator, large enough that the scan over the
# chunks takes few steps (each step costs kernel launches).
_ROWS_BYTES = 2**22
_GRAM_BYTES = 2**24
_ACCELERATOR_ROWS_BYTES = 2**28


def _is_concrete_nonnegative(value) -> bool:
    """A Python, numpy or concrete JAX real scalar `>= 0`."""
    if isinstance(value, jax.core.Tracer) or not eqx.is_array_like(value):
        return False
    value = np.asarray(value)
    return value.ndim == 0 and np.isrealobj(value) and bool(value >= 0)


def with_scale(
    operator: "AbstractCurvatureOperator | LinearisedCurvatureOperator", scalar
) -> "AbstractCurvatureOperator | LinearisedCurvatureOperator":
    """The same operator with its `scale` multiplied by `scalar` (at least float32)."""
    if isinstance(operator, MaterialisedCurvatureOperator):
        scaled = with_scale(operator.operator, scalar)
        factor = jnp.asarray(scalar, operator.scale.dtype)
        return MaterialisedCurvatureOperator(
            scaled, factor.astype(operator.matrix.dtype) * operator.matrix
        )
    if isinstance(operator, LinearisedCurvatureOperator):
        return eqx.tree_at(
            lambda o: o.operator, operator, with_scale(operator.operator, scalar)
        )
    scale = operator.scale
    return eqx.tree_at(
        lambda o: o.scale, operator, (scale * jnp.asarray(scalar, scale.dtype))
    )


class _AbstractWrapper(_AbstractScalable):
    """A curvature operator with some of its work done once (`linearise()`,
    `lineax.materialise`): the same numbers, and what the operator holds (its
    model, params, data, scale) read through."""

    operator: eqx.AbstractVar["AbstractCurvatureOperator | _AbstractWrapper"]

    # What the curvature operator holds, read through.

    @property
    def scale(self) -> Float[Array, ""]:
        return self.operator.scale

    @property
    def model_fn(self) -> ModelFn:
        return self.operator.model_fn

    @property
    def params(self) -> PyTree[Float[Array, "..."]]:
        return self.operator.params

    @property
    def data(self) -> tuple[PyTree, PyTree]:
        return self.operator.data

    @property
    def num_data(self) -> int:
        return self.operator.num_data

    @property
    def vmap_over_data(self) -> bool:
        return self.operator.vmap_over_data

    @property
    def chunk_size(self) -> int | None:
        return self.operator.chunk_size

    def sqrt_shape(self) -> tuple[int, int]:
        return self.operator.sqrt_shape()

    def linearise(self) -> "_AbstractWrapper":
        return self

    def transpose(self) -> "_AbstractWrapper":
        return self

    def in_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        return self.operator.in_structure()

    def out_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        return self.operator.out_structure()


class LinearisedCurvatureOperator(_AbstractWrapper):
    """A curvature operator with its primal work done: see `linearise()`.

    It has every method of the curvature operator it came from, with the same
    numbers. It keeps the per-datum output-space state (the factors `B_n`, or for
    the GGN the outputs: O(N O), not O(N O^2)) and, without chunking, the
    linearised model.
    """

    operator: AbstractCurvatureOperator
    output_state: PyTree
    jvp_fn: Callable | None

    def __init__(self, operator: AbstractCurvatureOperator):
        self.operator = operator
        inputs, targets = operator.data
        model = operator._model()
        if _core.num_chunks(operator.num_data, operator.chunk_size) == 1:
            outputs, self.jvp_fn = jax.linearize(
                lambda p: model(inputs, p), operator.params
            )
            self.output_state = operator._output_state(
                outputs, targets, jnp.arange(operator.num_data)
            )
        else:
            self.jvp_fn = None

            def on_chunk(data, indices):
                outputs = model(data[0], operator.params)
                return operator._output_state(outputs, data[1], indices)

            self.output_state = _core.chunked_map(
                on_chunk, operator.data, operator.num_data, operator.chunk_size
            )

    def __reduce__(self):
        # The linearised model holds a jaxpr, which does not pickle: a pickle
        # holds the operator, and loading it linearises again.
        return _linearised, (self.operator,)

    @eqx.filter_jit
    def mv(self, vector):
        vector = _check_vector(self, vector)
        operator = self.operator
        if self.jvp_fn is not None:
            total = _core.linearised_mv(
                self.jvp_fn,
                operator.params,
                ft.partial(operator._state_mv, self.output_state),
                vector,
            )
            return _core.scaled(total, operator.scale)
        model = operator._model()
        # The state travels as `(N, -1)` arrays: XLA copies an `(N, O, 1)` array
        # (for its layout) on every `mv`.
        leaves, treedef = jtu.tree_flatten(self.output_state)
        shapes = [leaf.shape[1:] for leaf in leaves]
        flat = [leaf.reshape(operator.num_data, -1) for leaf in leaves]

        def on_chunk(data, indices, weights):
            inputs, chunk_state = data
            state = jtu.tree_unflatten(
                treedef,
                [
                    leaf.reshape(-1, *shape)
                    for leaf, shape in zip(chunk_state, shapes, strict=True)
                ],
            )
            _, jvp_fn = jax.linearize(lambda p: model(inputs, p), operator.params)
            return _core.linearised_mv(
                jvp_fn,
                operator.params,
                lambda t: _core.weighted(weights, operator._state_mv(state, t)),
                vector,
            )

        total = _core.chunked_sum(
            on_chunk,
            (operator.data[0], flat),
            operator.num_data,
            operator.chunk_size,
        )
        return _core.scaled(total, operator.scale)

    @eqx.filter_jit
    def sqrt_mv(self, coefficients: Float[Array, "N K"]) -> PyTree:
        """As `AbstractCurvatureOperator.sqrt_mv`, from the stored state."""
        operator = self.operator
        if self.jvp_fn is None:
            return operator.sqrt_mv(coefficients)
        coefficients = operator._check_coefficients(coefficients)
        factors = operator._state_factors(self.output_state)
        shape = jax.eval_shape(self.jvp_fn, operator.params).shape
        (total,) = jax.linear_transpose(self.jvp_fn, operator.params)(
            _core.weighted_outputs(factors, coefficients.astype(factors.dtype), shape)
        )
        return _core.scaled(total, jnp.sqrt(operator.scale))

    @eqx.filter_jit
    def as_matrix(self, algorithm: str | None = None):
        """As `AbstractCurvatureOperator.as_matrix`; the `mv` route uses this
        operator's (linearised) products."""
        if self.operator._dense_route(_check_algorithm(algorithm)) == "rows":
            return self.operator.as_matrix("rows")
        return _core.dense_from_mv(self.mv, self.in_structure())

    @eqx.filter_jit
    def diagonal(self, algorithm: str | None = None):
        """As `AbstractCurvatureOperator.diagonal`, flat `(P,)`."""
        route = self.operator._dense_route(_check_algorithm(algorithm), diagonal=True)
        if route == "rows":
            return self.operator.diagonal("rows")
        return _core.dense_from_mv(self.mv, self.in_structure(), diagonal_only=True)


def _linearised(operator: lx.AbstractLinearOperator) -> lx.AbstractLinearOperator:
    """`operator.linearise()`: how a linearised operator loads from a pickle."""
    return operator.linearise()


class EmpiricalFisherOperator(AbstractCurvatureOperator):
    r"""The empirical Fisher as a lineax operator.

    $$F v = \text{scale} \sum_n J_n^\top g_n g_n^\top J_n v, \qquad
    g_n = \nabla_{f} c(y_n, f_n),$$

    with `J_n` the Jacobian of `model_fn(x_n, ·)` at `params` and
    `scale = num_total_samples / num_curv_samples` (by default 1: a plain sum
    over the data given).

    **Arguments:**

    - `model_fn`: `model_fn(input, params) -> output`. With `vmap_over_data=True`
      it sees one datum and returns `(O,)` (or a scalar, or a structured output
      such as a sequence's `(T, C)` logits: see the likelihoods); with `False` it
      sees the batch `(N, ...)` and returns `(N, O)` (or `(N,)`, `(N, T, C)`).
      The number of data points always comes from the data: with `False`, the
      data is one unbatched datum unless the outputs' leading axis is the inputs'
      and every target has a leading axis (for one datum whose input length
      equals its output length, e.g. one sequence, add a batch axis of 1).
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
        setup.fill(self)
        self.loss_grad_fn = setup.loss_grad_fn

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


class MCFisherOperator(AbstractCurvatureOperator):
    r"""The Monte-Carlo Fisher as a lineax operator.

    $$F v = \frac{\text{scale}}{M} \sum_{n,m} J_n^\top g_{nm} g_{nm}^\top J_n v,
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
    # The key as its raw data (a typed key is no array `eqx.tree_serialise_leaves`
    # can save) and its implementation (None for a raw `PRNGKey`): see `key`.
    _key_data: UInt[Array, "..."]
    _key_impl: Any = eqx.field(static=True)
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
            key=key,
        )
        setup.fill(self)
        typed = jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key)
        self._key_data = jax.random.key_data(key) if typed else key
        self._key_impl = jax.random.key_impl(key) if typed else None
        self.first_index = jnp.asarray(first_index, dtype=int)
        self.mc_samples = int(mc_samples)

    @property
    def key(self) -> PRNGKeyArray:
        """The key the samples are drawn with, as given (typed or raw)."""
        if self._key_impl is None:
            return self._key_data
        return jax.random.wrap_key_data(self._key_data, impl=self._key_impl)

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

    $$G v = \text{scale} \sum_n J_n^\top H_n J_n v, \qquad
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
        setup.fill(self)

    def _likelihood_factors(self, outputs, targets, indices):
        return self._state_factors(self._output_state(outputs, targets, indices))

    def _output_state(self, outputs, targets, indices):
        del indices
        return outputs, self.likelihood.prepare_targets(targets, outputs)

    def _state_factors(self, state):
        outputs, targets = state
        factors = jax.vmap(self.likelihood.hessian_sqrt)(outputs, targets)
        return factors.astype(outputs.dtype)

    def _state_mv(self, state, tangents):
        outputs, targets = state
        products = jax.vmap(self.likelihood.hessian_mv)(outputs, targets, tangents)
        return products.astype(tangents.dtype)


class MaterialisedCurvatureOperator(_AbstractWrapper):
    """A curvature operator with its dense matrix computed once: see
    `lineax.materialise(operator)`.

    It has every method of the curvature operator it came from, with the same
    numbers: `as_matrix()` and `diagonal()` are read off the held `(P, P)` matrix,
    `mv` is one matrix-vector product, and `sqrt_mv`, the model and the data are
    the original operator's. Everything downstream that needs the dense matrix
    (prior tuning, `LaplacePosterior.factorise()`, the log determinant) then
    reuses it instead of computing it again.
    """

    operator: "AbstractCurvatureOperator | LinearisedCurvatureOperator"
    matrix: Float[Array, "P P"]

    def __check_init__(self):
        size = self.operator.in_size()
        if jnp.shape(self.matrix) != (size, size):
            raise ValueError(
                f"matrix must be the operator's (P, P) = ({size}, {size}) matrix; "
                f"got shape {jnp.shape(self.matrix)}."
            )

    @eqx.filter_jit
    def mv(self, vector):
        vector = _check_vector(self, vector)
        flat, unravel = jfu.ravel_pytree(vector)
        return unravel(self.matrix @ flat.astype(self.matrix.dtype))

    def sqrt_mv(self, coefficients: Float[Array, "N K"]) -> PyTree:
        """As `AbstractCurvatureOperator.sqrt_mv`, from the original operator."""
        return self.operator.sqrt_mv(coefficients)

    def as_matrix(self, algorithm: str | None = None) -> Float[Array, "P P"]:
        """The held `(P, P)` matrix (`algorithm` is checked, then ignored)."""
        _check_algorithm(algorithm)
        return self.matrix

    @eqx.filter_jit
    def diagonal(self, algorithm: str | None = None) -> Float[Array, " P"]:
        """The held matrix's diagonal, flat `(P,)`."""
        _check_algorithm(algorithm)
        return jnp.diagonal(self.matrix)


def unwrapped(operator: lx.AbstractLinearOperator) -> lx.AbstractLinearOperator:
    """The curvature operator under `linearise()` and `lineax.materialise`
    wrappers (itself for any other operator): its likelihood and model."""
    while isinstance(operator, _AbstractWrapper):
        operator = operator.operator
    return operator


# --------------------------------------------------------------------------- #
# lineax's single-dispatch queries.
# --------------------------------------------------------------------------- #


@lx.linearise.register(AbstractCurvatureOperator)
def _(operator):
    return operator.linearise()


@lx.linearise.register(_AbstractWrapper)
@lx.materialise.register(MaterialisedCurvatureOperator)
def _(operator):
    return operator


@lx.materialise.register(AbstractCurvatureOperator)
@lx.materialise.register(LinearisedCurvatureOperator)
def _(operator):
    # Only the matrix is computed (compiled); the operator is kept as it is.
    return MaterialisedCurvatureOperator(operator, operator.as_matrix())


@lx.diagonal.register(AbstractCurvatureOperator)
@lx.diagonal.register(_AbstractWrapper)
def _(operator):
    return operator.diagonal()


@lx.tridiagonal.register(AbstractCurvatureOperator)
@lx.tridiagonal.register(_AbstractWrapper)
def _(operator):
    matrix = operator.as_matrix()
    return jnp.diagonal(matrix), jnp.diagonal(matrix, -1), jnp.diagonal(matrix, 1)


@lx.conj.register(AbstractCurvatureOperator)
@lx.conj.register(_AbstractWrapper)
def _(operator):
    return operator


register_symmetric_psd(AbstractCurvatureOperator, _AbstractWrapper)
