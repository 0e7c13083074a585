"""Gaussian priors as lineax operators, and PSD-preserving scaling."""

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PyTree

from ._checks import _check_params
from ._operators import _AbstractScalable, with_scale
from ._queries import register_symmetric_psd


def _is_scalar(x) -> bool:
    return eqx.is_array_like(x) and jnp.ndim(x) == 0


def _broadcast_precision(params: PyTree, precision) -> PyTree:
    if _is_scalar(precision):  # kept as one 0-d array: `λ` reads back as given
        return jnp.asarray(precision, jnp.result_type(*jtu.tree_leaves(params)))
    try:
        return jtu.tree_map(
            lambda p, x: _leaf_precision(p, x), params, precision, is_leaf=_is_scalar
        )
    except ValueError as error:
        if "precision" in str(error):
            raise
        raise ValueError(
            "precision must be a scalar, a pytree of scalars with the structure of "
            "params, or a params-shaped pytree of arrays; got structure "
            f"{jtu.tree_structure(precision)} for params "
            f"{jtu.tree_structure(params)}."
        ) from None


def _leaf_precision(param, value):
    value = jnp.asarray(value, param.dtype)
    if value.shape not in ((), param.shape):
        raise ValueError(
            f"precision leaves must be scalars or shaped like params; got shape "
            f"{value.shape} for a params leaf of shape {param.shape}."
        )
    return value


class PriorPrecision(lx.AbstractLinearOperator):
    r"""The precision of a zero-mean Gaussian prior `N(0, Λ^{-1})` on the params.

    `Λ` is diagonal: `precision` is a scalar (isotropic, `Λ = λ I`; held as a
    0-d array), a pytree of scalars with the structure of `params` (one `λ` per
    leaf, "layerwise"), or a params-shaped pytree of arrays (a full diagonal).
    Precisions must be non-negative.

    Symmetric and positive semidefinite for lineax, so `fisher + prior` and
    `prior + fisher` go straight into `lineax.CG` and `lineax.Cholesky`.

    **Arguments:**

    - `params`: the params pytree (only its structure, shapes and dtypes are used).
    - `precision`: as above.
    """

    precision: PyTree[Float[Array, "..."]]
    _leaves: tuple[jax.ShapeDtypeStruct, ...] = eqx.field(static=True)
    _treedef: jtu.PyTreeDef = eqx.field(static=True)

    def __init__(self, params: PyTree[Float[ArrayLike, "..."]], precision):
        params = _check_params(params)
        self.precision = _broadcast_precision(params, precision)
        structure = jtu.tree_map(
            lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params
        )
        self._leaves, self._treedef = jtu.tree_flatten(structure)
        self._leaves = tuple(self._leaves)
        for leaf in jtu.tree_leaves(self.precision):
            if not isinstance(leaf, jax.core.Tracer) and not np.all(
                np.asarray(leaf) >= 0
            ):
                raise ValueError(f"precision must be >= 0 and not NaN; got {leaf}.")

    def per_leaf(self) -> PyTree[Float[Array, "..."]]:
        """`precision` with one entry per params leaf (a scalar `λ` repeated), in
        each leaf's dtype."""
        structure = self.in_structure()
        if eqx.is_array(self.precision):
            return jtu.tree_map(lambda s: self.precision.astype(s.dtype), structure)
        return self.precision

    def full_diagonal(self) -> PyTree[Float[Array, "..."]]:
        """The diagonal of `Λ` as a params-shaped pytree."""
        return jtu.tree_map(
            lambda lam, s: jnp.broadcast_to(lam, s.shape),
            self.per_leaf(),
            self.in_structure(),
        )

    def diagonal(self) -> Float[Array, " P"]:
        """The diagonal of `Λ`, flat `(P,)` in `ravel_pytree` order (as
        `lineax.diagonal`)."""
        return jfu.ravel_pytree(self.full_diagonal())[0]

    def mv(self, vector):
        return jtu.tree_map(lambda lam, v: lam * v, self.per_leaf(), vector)

    def as_matrix(self):
        return jnp.diag(lx.diagonal(self))

    def transpose(self):
        return self

    def in_structure(self):
        return jtu.tree_unflatten(self._treedef, self._leaves)

    def out_structure(self):
        return self.in_structure()


@lx.diagonal.register(PriorPrecision)
def _(operator):
    return operator.diagonal()


@lx.tridiagonal.register(PriorPrecision)
def _(operator):
    diagonal = lx.diagonal(operator)
    off = jnp.zeros(diagonal.size - 1, diagonal.dtype)
    return diagonal, off, off


@lx.linearise.register(PriorPrecision)
@lx.materialise.register(PriorPrecision)
@lx.conj.register(PriorPrecision)
def _(operator):
    return operator


register_symmetric_psd(PriorPrecision, diagonal=True)


def scale(
    operator: lx.AbstractLinearOperator, scalar: Float[ArrayLike, ""]
) -> lx.AbstractLinearOperator:
    """`scalar * operator`, still symmetric positive semidefinite for lineax.

    lineax drops the PSD property of `scalar * operator` when `scalar` is a JAX
    value (it cannot see its sign), so CG and Cholesky would refuse it. Use this for
    a temperature or a noise precision: `fisherops.scale(fisher, 1 / T) + prior`.

    A fisherops curvature operator comes back as the same kind of operator with
    its `scale` multiplied, so `sqrt_mv`, `diagonal` and chunking are kept; any
    other PSD operator comes back tagged symmetric PSD.

    **Arguments:**

    - `operator`: a symmetric PSD operator (a curvature operator, a prior, a sum).
    - `scalar`: a non-negative scalar (checked when it is a concrete value).
    """
    if not lx.is_positive_semidefinite(operator):
        raise ValueError(
            "operator must be positive semidefinite for lineax (a fisherops "
            "operator, a PriorPrecision or a sum of them); got "
            f"{type(operator).__name__}."
        )
    if jnp.ndim(scalar) != 0:
        raise ValueError(f"scalar must be a scalar; got shape {jnp.shape(scalar)}.")
    if not isinstance(scalar, jax.core.Tracer) and np.asarray(scalar) < 0:
        raise ValueError(f"scalar must be non-negative; got {scalar}.")
    if isinstance(operator, _AbstractScalable):
        return with_scale(operator, scalar)
    return lx.TaggedLinearOperator(
        operator * scalar, (lx.symmetric_tag, lx.positive_semidefinite_tag)
    )
