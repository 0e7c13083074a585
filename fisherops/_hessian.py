r"""The exact Hessian of the summed loss as a lineax operator.

$$H v = \text{scale}\, \nabla^2_\theta \Big[\sum_n c(y_n, f(x_n, \theta))\Big] v
      = \text{scale} \sum_n \big(J_n^\top H_n J_n
        + \textstyle\sum_o (g_n)_o \nabla^2_\theta f_{n,o}\big) v,$$

the GGN plus the residual term of the network's own curvature, by
forward-over-reverse (`jvp` of the gradient): about two to three gradients per
product. Symmetric but indefinite away from a minimum, so it is registered as
symmetric and NOT positive semidefinite: `lineax.CG` refuses it (with lineax's
message), `lineax.GMRES`, `lineax.SVD` and `lineax.LU` solve with it.
"""

import functools as ft
from collections.abc import Callable

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, Bool, Float, PyTree, Real, Scalar

from . import _core
from ._checks import Data, ModelFn, _check_vector, _setup
from ._likelihoods import AbstractLikelihood, as_likelihood
from ._operators import _AbstractScalable, _linearised, _structure
from ._queries import register_symmetric


def _check_algorithm(algorithm: str | None) -> None:
    if algorithm not in (None, "mv"):
        raise ValueError(
            "algorithm must be None or 'mv' for the Hessian (its dense matrix comes "
            f"only from products: it has no per-datum rows); got {algorithm!r}."
        )


class HessianOperator(_AbstractScalable):
    r"""The Hessian of the summed loss in the params, as a lineax operator.

    $$H v = \text{scale}\; \nabla^2_\theta \Big[\sum_n c\big(y_n,
    f(x_n, \theta)\big)\Big]\, v,$$

    with `scale = num_total_samples / num_curv_samples` (by default 1: the plain
    sum over the data given), the same convention as
    [`fisherops.GGNOperator`][]. `mv` is forward-over-reverse (the `jvp` of the
    gradient), about 2-3 gradients on a CPU. Unlike the Fisher and the GGN the
    Hessian is indefinite in general: lineax is told it is symmetric but not
    positive semidefinite, so `lineax.CG` and `lineax.Cholesky` refuse it and
    `lineax.GMRES`, `lineax.LU` or `lineax.SVD` solve with it. The
    [`fisherops.estimate`](analysis.md) functions (trace, diagonal, spectral
    density, eigenpairs) work on it.

    **Arguments:** as [`fisherops.GGNOperator`][]: `model_fn`, `params`, `data`,
    `loss_fn` (a loss name, a per-datum callable `c(output, target)` or a
    likelihood), `num_curv_samples`, `num_total_samples`, `vmap_over_data`,
    `chunk_size` (the products and dense matrices are summed chunk by chunk with
    `lax.scan`; memory is bounded by one chunk's forward and backward pass).
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
        loss_fn: "str | Callable | AbstractLikelihood",
        *,
        num_curv_samples: Real[Array, ""] | float | None = None,
        num_total_samples: Real[Array, ""] | float | None = None,
        vmap_over_data: bool = True,
        chunk_size: int | None = None,
    ):
        if loss_fn is None:
            raise ValueError("HessianOperator needs loss_fn; got None.")
        setup = _setup(
            model_fn,
            params,
            data,
            as_likelihood(loss_fn),
            num_curv_samples,
            num_total_samples,
            vmap_over_data,
            chunk_size,
        )
        setup.fill(self)

    def _loss(
        self, params: PyTree, data: tuple[PyTree, PyTree], weights: Bool[Array, " n"]
    ) -> Scalar:
        """`sum_n w_n c(y_n, f(x_n, params))` over one chunk (weights 1 or 0)."""
        inputs, targets = data
        outputs = _core.batched_model(self.model_fn, self.vmap_over_data)(
            inputs, params
        )
        targets = self.likelihood.prepare_targets(targets, outputs)
        losses = jax.vmap(self.likelihood.loss)(outputs, targets)
        return jnp.sum(_core.weighted(weights, losses))

    def _linearised_gradient(self, data, weights) -> Callable[[PyTree], PyTree]:
        """`v -> ∇²(chunk loss) v` with the chunk's forward and backward done."""
        gradient = jax.grad(ft.partial(self._loss, data=data, weights=weights))
        return jax.linearize(gradient, self.params)[1]

    def _chunked(self, fn: Callable[[Callable], PyTree]) -> PyTree:
        """`scale * sum_chunks fn(chunk Hessian-vector product)`."""

        def on_chunk(data, indices, weights):
            del indices
            return fn(self._linearised_gradient(data, weights))

        total = _core.chunked_sum(on_chunk, self.data, self.num_data, self.chunk_size)
        return _core.scaled(total, self.scale)

    @eqx.filter_jit
    def mv(self, vector: PyTree[Float[Array, "..."]]) -> PyTree[Float[Array, "..."]]:
        vector = _check_vector(self, vector)

        def on_chunk(data, indices, weights):
            del indices
            gradient = jax.grad(ft.partial(self._loss, data=data, weights=weights))
            return jax.jvp(gradient, (self.params,), (vector,))[1]

        total = _core.chunked_sum(on_chunk, self.data, self.num_data, self.chunk_size)
        return _core.scaled(total, self.scale)

    @eqx.filter_jit
    def as_matrix(self, algorithm: str | None = None) -> Float[Array, "P P"]:
        """The dense `(P, P)` Hessian, in `ravel_pytree` order: per chunk of data,
        the forward and backward pass once, then `P` linearised products with the
        basis vectors (64 at a time). `algorithm`: `None` or `"mv"` (the only
        route: the Hessian has no per-datum rows)."""
        _check_algorithm(algorithm)
        structure = self.in_structure()
        return self._chunked(lambda hvp: _core.dense_from_mv(hvp, structure))

    @eqx.filter_jit
    def diagonal(self, algorithm: str | None = None) -> Float[Array, " P"]:
        """The exact diagonal, flat `(P,)` in `ravel_pytree` order, from `P`
        linearised products as in `as_matrix` (use
        [`fisherops.estimate.diagonal`](analysis.md) for an estimate from few)."""
        _check_algorithm(algorithm)
        structure = self.in_structure()
        return self._chunked(
            lambda hvp: _core.dense_from_mv(hvp, structure, diagonal_only=True)
        )

    @eqx.filter_jit
    def linearise(self) -> "LinearisedHessianOperator":
        """Do the forward and backward pass once: each `mv` then costs one
        linearised `jvp` of the gradient. With `chunk_size` set, nothing is kept
        (the residuals grow with the data) and each `mv` redoes the passes chunk
        by chunk. Equal to `lineax.linearise(operator)`."""
        return LinearisedHessianOperator(self)

    def transpose(self) -> "HessianOperator":
        return self

    def in_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        return _structure(self.params)

    def out_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        return _structure(self.params)


class LinearisedHessianOperator(lx.AbstractLinearOperator):
    """A [`fisherops.HessianOperator`][] with its forward and backward pass done
    (see `HessianOperator.linearise`): the same numbers, cheaper products."""

    operator: HessianOperator
    hvp: Callable | None

    def __init__(self, operator: HessianOperator):
        self.operator = operator
        if _core.num_chunks(operator.num_data, operator.chunk_size) == 1:
            self.hvp = operator._linearised_gradient(
                operator.data, jnp.ones(operator.num_data, dtype=bool)
            )
        else:
            self.hvp = None

    def __reduce__(self):
        # As `LinearisedCurvatureOperator`: `hvp` holds a jaxpr, which does not
        # pickle; loading linearises the operator again.
        return _linearised, (self.operator,)

    @eqx.filter_jit
    def mv(self, vector):
        if self.hvp is None:
            return self.operator.mv(vector)
        vector = _check_vector(self, vector)
        return _core.scaled(self.hvp(vector), self.operator.scale)

    def as_matrix(self, algorithm: str | None = None) -> Float[Array, "P P"]:
        """As `HessianOperator.as_matrix`."""
        return self.operator.as_matrix(algorithm)

    def diagonal(self, algorithm: str | None = None) -> Float[Array, " P"]:
        """As `HessianOperator.diagonal`."""
        return self.operator.diagonal(algorithm)

    def linearise(self) -> "LinearisedHessianOperator":
        return self

    def transpose(self) -> "LinearisedHessianOperator":
        return self

    def in_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        return self.operator.in_structure()

    def out_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        return self.operator.out_structure()


def _pytree_operator(
    matrix: Float[Array, "P P"], structure: PyTree[jax.ShapeDtypeStruct]
) -> lx.PyTreeLinearOperator:
    """A flat `(P, P)` matrix in `ravel_pytree` order as lineax's pytree-of-blocks
    operator on `structure` (leaf `i`, `j` block: `shape_i + shape_j`), symmetric."""
    zeros = jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), structure)
    unravel = jfu.ravel_pytree(zeros)[1]
    columns = jax.vmap(unravel, in_axes=1, out_axes=-1)(matrix)  # leaves (*s_i, P)

    def blocks(leaf):
        unravel_rows = unravel
        for _ in range(leaf.ndim - 1):
            unravel_rows = jax.vmap(unravel_rows)
        return unravel_rows(leaf)

    return lx.PyTreeLinearOperator(
        jtu.tree_map(blocks, columns), structure, lx.symmetric_tag
    )


# --------------------------------------------------------------------------- #
# lineax's single-dispatch queries.
# --------------------------------------------------------------------------- #


@lx.linearise.register(HessianOperator)
def _(operator):
    return operator.linearise()


@lx.linearise.register(LinearisedHessianOperator)
def _(operator):
    return operator


@lx.materialise.register(HessianOperator)
@lx.materialise.register(LinearisedHessianOperator)
def _(operator):
    return _pytree_operator(operator.as_matrix(), operator.in_structure())


@lx.diagonal.register(HessianOperator)
@lx.diagonal.register(LinearisedHessianOperator)
def _(operator):
    return operator.diagonal()


@lx.tridiagonal.register(HessianOperator)
@lx.tridiagonal.register(LinearisedHessianOperator)
def _(operator):
    matrix = operator.as_matrix()
    return jnp.diagonal(matrix), jnp.diagonal(matrix, -1), jnp.diagonal(matrix, 1)


@lx.conj.register(HessianOperator)
@lx.conj.register(LinearisedHessianOperator)
def _(operator):
    return operator


register_symmetric(
    HessianOperator, LinearisedHessianOperator, positive_semidefinite=False
)
