r"""Log-determinants `log det(C + Λ)` of a curvature `C` plus a diagonal prior
precision `Λ = diag(d)`, `d > 0`.

- `"dense"`: Cholesky of `C.as_matrix() + Λ`; exact, and an error (never a NaN)
  when the sum is not positive definite in the working precision.
- `"eigh"`: the eigendecomposition of `I + Λ^{-1/2} C Λ^{-1/2}` with its
  eigenvalues clipped at 1 (rounding can push them below): finite for every
  `d > 0`, also in float32 where the Cholesky breaks down for small `d`.
- `"slq"`: stochastic Lanczos quadrature, without a `P x P` matrix.
- `"auto"`: `"dense"` up to 8192 params, falling back to `"eigh"` where the
  Cholesky breaks down; `"slq"` above.
- A `fisherops.KFACOperator` uses its exact Kronecker log-determinant whenever
  the prior is constant within its blocks (scalar and layerwise priors).

Resolution. A decomposition in a dtype with unit roundoff `eps` knows each
eigenvalue `θ_i` of the matrix it factorises (`C + Λ`, or `I + Λ^{-1/2} C
Λ^{-1/2}`) only to about `eps θ_max` (the curvature's own rounding is of the
same size), so `log θ_i` to `eps θ_max / θ_i`, and the log-determinant to
`eps θ_max sum_i 1 / θ_i` (`_rounding_error`). Where that exceeds one nat (a
prior precision below the rounding level of the curvature: float32 with a
small `λ`, or any dtype with `λ = 1e-30`) the number is meaningless, and every
method says so (an error naming the fix: float64, or a larger prior precision)
instead of returning it. The estimate comes from the factorisation itself:
Cholesky pivots `L_ii^2` against `max_i P_ii`, the eigenvalues `θ`, or SLQ's
Ritz values and its solves `M^{-1} v`.

Every method is differentiable in `d` and in the curvature's arrays: the dense
ones exactly (`d log det P = tr(P^{-1} dP)` from the same factorisation), SLQ
by the same probes' estimate of `tr(P^{-1} dP)`.

Vectors here are flat `(P,)` in `jax.flatten_util.ravel_pytree` order.
"""

import functools
from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Scalar

from . import _linalg
from ._checks import _check_key, _check_method, _check_positive_int
from ._kfac import KFACOperator
from ._lanczos import _lanczos, _tridiagonal_eigh
from ._priors import PriorPrecision

# `"auto"` is dense up to this many params (a float64 `P x P` matrix of this
# size is 0.5 GB), stochastic above it.
_DENSE_MAX_SIZE = 8192

LogdetMethod = Literal["auto", "dense", "eigh", "slq"]
_METHODS = ("auto", "dense", "eigh", "slq")


def _unraveller(structure: PyTree[jax.ShapeDtypeStruct]) -> Callable:
    zeros = jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), structure)
    return jfu.ravel_pytree(zeros)[1]


def _ravel(tree: PyTree) -> Array:
    return jfu.ravel_pytree(tree)[0]


def _dtype(operator: lx.AbstractLinearOperator) -> jnp.dtype:
    return jnp.result_type(*jtu.tree_leaves(operator.in_structure()))


class _FlatMV(eqx.Module):
    """`v -> C v` on flat `(P,)` vectors, for an operator on params pytrees."""

    operator: lx.AbstractLinearOperator

    def __call__(self, vector: Float[Array, " P"]) -> Float[Array, " P"]:
        unravel = _unraveller(self.operator.in_structure())
        return _ravel(self.operator.mv(unravel(vector)))


def _stop_gradient(tree: PyTree) -> PyTree:
    arrays, static = eqx.partition(tree, eqx.is_inexact_array)
    return eqx.combine(lax.stop_gradient(arrays), static)


# --------------------------------------------------------------------------- #
# Dense: Cholesky or eigendecomposition, with the exact derivative.
# --------------------------------------------------------------------------- #

# The largest estimated rounding error (nats) of a log-determinant returned.
_MAX_ROUNDING_ERROR = 1.0


def _rounding_error(largest: Scalar, inverse_trace: Scalar) -> Scalar:
    """`eps θ_max sum_i 1 / θ_i`: the rounding error of `sum_i log θ_i` (nats) when
    each `θ_i` is known to `eps θ_max` (see the module docstring)."""
    return jnp.finfo(largest.dtype).eps * largest * inverse_trace


def _cholesky_rounding_error(factor: Float[Array, "P P"]) -> Scalar:
    """`_rounding_error` of `2 sum log L_ii` from the Cholesky factor `L` alone:
    pivots `L_ii^2` each known to `eps max_j P_jj`, `P_jj = |L_j|^2`."""
    largest = jnp.max(jnp.sum(factor**2, axis=1))
    return _rounding_error(largest, jnp.sum(1 / jnp.diagonal(factor) ** 2))


def _resolved(value: Scalar, rounding_error: Scalar) -> Scalar:
    """`value`, or an error where its estimated rounding error exceeds a nat or
    is not finite (an overflow on the way)."""
    name = jnp.dtype(value.dtype).name
    return eqx.error_if(
        value,
        ~(rounding_error <= _MAX_ROUNDING_ERROR),  # NaN: overflow, unresolved
        f"log det(C + Λ) is not resolved in {name}: the prior precision is below "
        f"the rounding level of the curvature (eigenvalues of I + Λ^(-1/2) C "
        f"Λ^(-1/2) near 1/eps of {name}; estimated rounding error above "
        f"{_MAX_ROUNDING_ERROR:g} nat), so the log-determinant and the evidence "
        "would be wrong numbers. Use float64 (jax.config.update('jax_enable_x64', "
        "True) with float64 params and data) or a larger prior precision.",
    )


_NOT_POSITIVE_DEFINITE = (
    "log det(C + Λ) by Cholesky: C + Λ is not positive definite in this "
    "precision (a prior precision near the rounding level of the curvature, e.g. "
    "float32 with a small one). Use float64 or a larger prior precision; "
    "logdet_method='eigh' (or 'auto') also works where the Cholesky breaks down "
    "but the log-determinant is still resolved (it raises where it is not)."
)


def _cholesky_logdet(
    matrix: Float[Array, "P P"], diagonal: Float[Array, " P"], inverse: bool
) -> tuple[Scalar, Scalar, Float[Array, "P P"] | None]:
    factor = _linalg.cholesky(matrix + jnp.diag(diagonal))
    value = 2 * jnp.sum(jnp.log(jnp.diagonal(factor)))
    error = _cholesky_rounding_error(factor)
    if not inverse:
        return value, error, None
    identity = jnp.eye(diagonal.size, dtype=diagonal.dtype)
    return value, error, _linalg.cho_solve(factor, identity)


def _eigh_logdet(
    matrix: Float[Array, "P P"], diagonal: Float[Array, " P"], inverse: bool
) -> tuple[Scalar, Scalar, Float[Array, "P P"] | None]:
    """`log det(C + D) = sum log d + sum log θ`, `θ` the eigenvalues of
    `M = I + D^{-1/2} C D^{-1/2}`, clipped at 1; `P^{-1} = D^{-1/2} M^{-1} D^{-1/2}`."""
    scale = lax.rsqrt(diagonal)
    whitened = scale[:, None] * matrix * scale[None, :]
    theta, vectors = _linalg.eigh(
        whitened + jnp.eye(diagonal.size, dtype=diagonal.dtype)
    )
    theta = jnp.maximum(theta, 1)
    value = jnp.sum(jnp.log(diagonal)) + jnp.sum(jnp.log(theta))
    error = _rounding_error(jnp.max(theta), jnp.sum(1 / theta))
    if not inverse:
        return value, error, None
    half = scale[:, None] * vectors * lax.rsqrt(theta)[None, :]
    return value, error, half @ half.T


def _factorised(
    matrix: Float[Array, "P P"],
    diagonal: Float[Array, " P"],
    method: str,
    inverse: bool,
) -> tuple[Scalar, Scalar, Float[Array, "P P"] | None]:
    """`log det(matrix + diag(diagonal))`, its estimated rounding error and, if
    asked, the inverse of the sum.

    Under a `vmap` (over prior precisions, say) it runs one matrix after another
    (`_linalg.unbatched`): the Cholesky-else-`eigh` choice of `"auto"` stays a
    branch per matrix instead of a select computing both, and no decomposition is
    a batched LAPACK call.
    """

    def one(matrix, diagonal):
        if method == "eigh":
            return _eigh_logdet(matrix, diagonal, inverse)
        cholesky = _cholesky_logdet(matrix, diagonal, inverse)
        if method == "dense":
            return cholesky
        # "auto": the Cholesky unless it broke down.
        return lax.cond(
            jnp.isfinite(cholesky[0]),
            lambda: cholesky,
            lambda: _eigh_logdet(matrix, diagonal, inverse),
        )

    value, error, inv = _linalg.unbatched(one)(matrix, diagonal)
    if method == "dense":
        value = eqx.error_if(value, ~jnp.isfinite(value), _NOT_POSITIVE_DEFINITE)
    return value, error, inv


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _dense_logdet(
    matrix: Float[Array, "P P"], diagonal: Float[Array, " P"], method: str
) -> tuple[Scalar, Scalar]:
    """`log det(C + diag(d))` and its estimated rounding error; the derivative
    `tr(P^{-1} dC) + diag(P^{-1}) . dd` comes from the same factorisation, so it
    is finite wherever the value is (the error estimate carries none)."""
    return _factorised(matrix, diagonal, method, inverse=False)[:2]


@_dense_logdet.defjvp
def _dense_logdet_jvp(method, primals, tangents):
    matrix, diagonal = primals
    matrix_tangent, diagonal_tangent = tangents
    value, error, inverse = _factorised(matrix, diagonal, method, inverse=True)
    tangent = (
        jnp.sum(inverse * matrix_tangent) + jnp.diagonal(inverse) @ diagonal_tangent
    )
    return (value, error), (tangent, jnp.zeros_like(error))


# --------------------------------------------------------------------------- #
# Stochastic Lanczos quadrature.
# --------------------------------------------------------------------------- #


def _probe(key: PRNGKeyArray, index: Array, size: int, dtype) -> Float[Array, " P"]:
    return jax.random.rademacher(jax.random.fold_in(key, index), (size,), dtype)


def _slq_logdet(
    curvature: lx.AbstractLinearOperator,
    diagonal: Float[Array, " P"],
    key: PRNGKeyArray,
    num_probes: int,
    num_steps: int,
) -> tuple[Scalar, Scalar]:
    r"""`log det(C + D)` by stochastic Lanczos quadrature, `D = diag(d) > 0`, and
    its estimated rounding error.

    With `M = I + D^{-1/2} C D^{-1/2}` (eigenvalues >= 1),
    `log det(C + D) = sum_i log d_i + tr log M`; for each Rademacher probe `v`,
    `v^T log(M) v ≈ |v|^2 sum_k U_{0k}^2 log θ_k` from the Lanczos tridiagonal
    `T = U diag(θ) U^T` started at `v`, and the trace is the probes' mean
    (Hutchinson). The probes run one after another (`lax.scan`), so the memory is
    one Lanczos basis, `num_steps x P`, whatever `num_probes`.

    Derivative: `d log det P = tr(P^{-1} dC) + diag(P^{-1}) . dd`, estimated with
    the same probes and the Lanczos solves `y ≈ M^{-1} v = |v| Q^T T^{-1} e_1`:
    `tr(P^{-1} dC) ≈ mean (D^{-1/2} y)^T dC (D^{-1/2} v)` and
    `diag(P^{-1}) ≈ mean y * v / d`. The value is the estimate; the gradient is
    that of the estimator `mean_v (D^{-1/2} y)^T C (D^{-1/2} v)` in the
    curvature's arrays (one extra `mv` per probe) plus the diagonal term.

    Rounding: `_rounding_error` with the largest Ritz value of all probes and
    the probes' estimate `mean v^T y` of `tr M^{-1}`.
    """
    size = diagonal.size
    fixed_diagonal = lax.stop_gradient(diagonal)
    scale = lax.rsqrt(fixed_diagonal)
    curvature_mv = _FlatMV(curvature)
    fixed_mv = _FlatMV(_stop_gradient(curvature))

    def preconditioned_mv(v):
        return v + scale * fixed_mv(scale * v)

    def one_probe(carry, index):
        log_forms, inverse_diagonal, coupling, largest = carry
        probe = _probe(key, index, size, diagonal.dtype)
        basis, alphas, betas = _lanczos(preconditioned_mv, probe, num_steps)
        theta, vectors = _tridiagonal_eigh(alphas, betas)
        theta = jnp.maximum(theta, 1)
        first = vectors[0]
        norm = jnp.sqrt(jnp.asarray(size, diagonal.dtype))  # |v| of a Rademacher probe
        log_form = size * jnp.sum(first**2 * jnp.log(theta))
        solution = lax.stop_gradient(norm * ((vectors @ (first / theta)) @ basis))
        # Only the curvature's arrays carry a derivative here.
        coupling = coupling + (scale * solution) @ curvature_mv(scale * probe)
        return (
            log_forms + log_form,
            inverse_diagonal + solution * probe,
            coupling,
            jnp.maximum(largest, jnp.max(theta)),
        ), None

    zero = jnp.zeros((), diagonal.dtype)
    (log_forms, inverse_diagonal, coupling, largest), _ = lax.scan(
        one_probe,
        (zero, jnp.zeros_like(diagonal), zero, zero),
        jnp.arange(num_probes),
    )
    estimate = jnp.sum(jnp.log(fixed_diagonal)) + log_forms / num_probes
    # Lanczos's norms square the vectors `M q`: beyond `sqrt(max float)` they
    # overflowed (a false breakdown, one node holding the probe's whole weight).
    largest = jnp.where(jnp.isfinite(largest**2), largest, jnp.inf)
    error = _rounding_error(largest, jnp.sum(inverse_diagonal) / num_probes)
    inverse_diagonal = lax.stop_gradient(inverse_diagonal / num_probes / fixed_diagonal)
    coupling = coupling / num_probes
    value = (
        lax.stop_gradient(estimate)
        + (coupling - lax.stop_gradient(coupling))
        + (diagonal - fixed_diagonal) @ inverse_diagonal
    )
    return value, lax.stop_gradient(error)


@eqx.filter_jit
def _slq_spectrum(
    curvature: lx.AbstractLinearOperator,
    key: PRNGKeyArray,
    num_probes: int,
    num_steps: int,
) -> tuple[Float[Array, "S m"], Float[Array, "S m"]]:
    """Gauss quadrature nodes and weights of the spectral measure of `C` from the
    same probes as `_slq_logdet`: `tr f(C) ≈ sum w f(nodes)` for any `f`, so
    `log det(C + λ I)` for every `λ` comes from one Lanczos run per probe."""
    size = curvature.in_size()
    dtype = _dtype(curvature)
    curvature_mv = _FlatMV(_stop_gradient(curvature))

    def one_probe(index):
        probe = _probe(key, index, size, dtype)
        _, alphas, betas = _lanczos(curvature_mv, probe, num_steps)
        theta, vectors = _tridiagonal_eigh(alphas, betas)
        return jnp.maximum(theta, 0), size * vectors[0] ** 2 / num_probes

    return lax.map(one_probe, jnp.arange(num_probes))


# --------------------------------------------------------------------------- #
# The log-determinant as a function of the prior precision.
# --------------------------------------------------------------------------- #


class _Spectrum(eqx.Module):
    """`λ -> sum_k w_k log(ν_k + λ)`: `log det(C + λ I)` from `C`'s spectrum
    (its eigenvalues with weights 1, or SLQ's nodes and weights); `O(P)` per `λ`,
    finite for every `λ > 0`."""

    nodes: Array
    weights: Array

    def __call__(self, precisions: Float[Array, " 1"]) -> Scalar:
        return jnp.sum(self.weights * jnp.log(self.nodes + precisions[0]))


class _MatrixLogdet(eqx.Module):
    """`λ_g -> log det(C + diag(λ[groups]))` with `C`'s dense matrix held."""

    matrix: Float[Array, "P P"]
    groups: Array
    method: str = eqx.field(static=True)

    def __call__(self, precisions: Float[Array, " G"]) -> Scalar:
        return _dense_logdet(self.matrix, precisions[self.groups], self.method)[0]


class _SLQLogdet(eqx.Module):
    """`λ_g -> log det(C + diag(λ[groups]))` by SLQ with fixed probes."""

    curvature: lx.AbstractLinearOperator
    groups: Array
    key: PRNGKeyArray
    num_probes: int = eqx.field(static=True)
    num_steps: int = eqx.field(static=True)

    def __call__(self, precisions: Float[Array, " G"]) -> Scalar:
        return _slq_logdet(
            self.curvature,
            precisions[self.groups],
            self.key,
            self.num_probes,
            self.num_steps,
        )[0]


class _KFACLogdet(eqx.Module):
    """`λ_g -> log det(K + Λ)`, exact, for a scalar (`G = 1`) or layerwise
    (`G` = number of params leaves) prior on a KFAC curvature."""

    curvature: KFACOperator
    params: PyTree

    def __call__(self, precisions: Float[Array, " G"]) -> Scalar:
        if precisions.size == 1:
            precision = precisions[0]
        else:
            treedef = jtu.tree_structure(self.params)
            precision = jtu.tree_unflatten(treedef, list(precisions))
        return self.curvature.logdet(PriorPrecision(self.params, precision))


@eqx.filter_jit
def _as_matrix(operator: lx.AbstractLinearOperator) -> Float[Array, "P P"]:
    return operator.as_matrix()


def _resolve_method(curvature: lx.AbstractLinearOperator, method: str) -> str:
    method = _check_method("logdet_method", method, _METHODS)
    if method == "auto" and curvature.in_size() > _DENSE_MAX_SIZE:
        return "slq"
    return method


def _slq_arguments(
    key: PRNGKeyArray | None, num_probes: int, num_lanczos_steps: int, size: int
) -> tuple[PRNGKeyArray, int, int]:
    num_probes = _check_positive_int("num_probes", num_probes)
    num_lanczos_steps = _check_positive_int("num_lanczos_steps", num_lanczos_steps)
    if key is None:
        key = jax.random.key(0)
    _check_key(key)
    return key, num_probes, min(num_lanczos_steps, size)


def _exact_kfac(curvature: lx.AbstractLinearOperator, prior_precision) -> bool:
    return isinstance(curvature, KFACOperator) and curvature.is_exact(prior_precision)


_NOT_POSITIVE = (
    "log det(C + Λ) needs a positive prior precision Λ; got a zero, negative or "
    "non-finite entry."
)


def _checked_diagonal(prior_precision: PriorPrecision) -> Float[Array, " P"]:
    diagonal = _ravel(prior_precision.full_diagonal())
    return eqx.error_if(
        diagonal, ~jnp.all(jnp.isfinite(diagonal) & (diagonal > 0)), _NOT_POSITIVE
    )


@eqx.filter_jit
def _logdet(
    curvature: lx.AbstractLinearOperator,
    prior_precision: PriorPrecision,
    method: str,
    key: PRNGKeyArray | None,
    num_probes: int,
    num_steps: int,
    exact_kfac: bool,
) -> Scalar:
    diagonal = _checked_diagonal(prior_precision)
    if exact_kfac:
        return curvature.logdet(prior_precision)
    if method == "slq":
        value, error = _slq_logdet(
            lx.linearise(curvature), diagonal, key, num_probes, num_steps
        )
    else:
        value, error = _dense_logdet(curvature.as_matrix(), diagonal, method)
    return _resolved(value, error)


def logdet(
    curvature: lx.AbstractLinearOperator,
    prior_precision: PriorPrecision,
    *,
    logdet_method: LogdetMethod = "auto",
    key: PRNGKeyArray | None = None,
    num_probes: int = 32,
    num_lanczos_steps: int = 64,
) -> Scalar:
    r"""`log det(C + Λ)`, the log-determinant of the Laplace posterior precision.

    `LaplacePosterior.logdet` calls this. Compiled once per operator type, shapes
    and static arguments.

    **Arguments:**

    - `curvature`: the curvature `C`, a symmetric PSD lineax operator on params.
    - `prior_precision`: `Λ`, a [`fisherops.PriorPrecision`][] on the same params;
      every entry must be positive (a zero gives `-inf`, which is an error).
    - `logdet_method`: `"auto"`, `"dense"`, `"eigh"` or `"slq"` (see the module
      docstring). A `fisherops.KFACOperator` with a scalar or layerwise prior
      uses its exact Kronecker log-determinant whatever the method.
    - `key`: the SLQ probes' key (default `jax.random.key(0)`); probe `s` is
      `rademacher(fold_in(key, s))`, so a fixed key gives a deterministic,
      differentiable estimate.
    - `num_probes`, `num_lanczos_steps`: SLQ's probes and Lanczos steps (each
      step one curvature `mv`; the steps are capped at `P`). Memory:
      `num_lanczos_steps x P` (the probes run one after another).

    **Returns:** the scalar `log det(C + Λ)`. Differentiable in the prior
    precision and in the curvature's arrays with every method (SLQ: the same
    probes' unbiased estimate of `tr(P^{-1} dP)`).
    """
    method = _resolve_method(curvature, logdet_method)
    if not isinstance(prior_precision, PriorPrecision):
        raise TypeError(
            "prior_precision must be a fisherops.PriorPrecision; got "
            f"{type(prior_precision).__name__}."
        )
    if method == "slq":
        key, num_probes, num_steps = _slq_arguments(
            key, num_probes, num_lanczos_steps, curvature.in_size()
        )
    else:
        key, num_probes, num_steps = None, 0, 0
    return _logdet(
        curvature,
        prior_precision,
        method,
        key,
        num_probes,
        num_steps,
        _exact_kfac(curvature, prior_precision),
    )
