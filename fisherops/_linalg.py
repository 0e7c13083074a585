r"""Dense decompositions that never become batched LAPACK calls.

jaxlib's CPU LAPACK kernels run a stack of decompositions as tasks on XLA's
intra-op thread pool and block until they finish; two such calls at once can
deadlock a small machine (`tests/repro_lapack_deadlock.py`). A user's `vmap`
over something a decomposition depends on (a prior precision, a dataset) would
turn every decomposition in fisherops into such a call, and a `lax.cond`
between two of them into a select holding both. Every dense decomposition of
the library therefore goes through this module:

- `cholesky`, `eigh`, `solve_triangular` (and `cho_solve` built from it) are
  `jnp.linalg`'s, except that under `vmap` they run one matrix after another
  (`lax.map`), and that their derivatives (JVP rules, hence also reverse mode)
  use only matrix products on the tangents, so a vmapped gradient holds no
  batched decomposition either;
- `unbatched(fn)` makes any function of arrays (e.g. one that chooses between a
  Cholesky and an `eigh` with `lax.cond`) run element by element under `vmap`,
  so the choice stays a branch, not a select. It is for values only: it is not
  differentiable (call it inside a `jax.custom_jvp` whose rule gives the
  derivative, as `_logdet._dense_logdet` does).
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jaxtyping import Array, Float


def unbatched(fn: Callable) -> Callable:
    """`fn` (a function of arrays) that under `vmap` runs `lax.map` over the
    batch: one unbatched call per element, never a batched LAPACK call."""
    return jax.custom_batching.sequential_vmap(fn)


_unbatched_cholesky = unbatched(jnp.linalg.cholesky)
_unbatched_eigh = unbatched(lambda matrix: tuple(jnp.linalg.eigh(matrix)))


@functools.cache
def _unbatched_solve(lower: bool, transpose: bool) -> Callable:
    return unbatched(
        lambda matrix, rhs: jsl.solve_triangular(
            matrix, rhs, lower=lower, trans=int(transpose)
        )
    )


def _symmetric(matrix: Array) -> Array:
    return (matrix + matrix.T) / 2


# --------------------------------------------------------------------------- #
# Cholesky
# --------------------------------------------------------------------------- #


@jax.custom_jvp
def cholesky(matrix: Float[Array, "P P"]) -> Float[Array, "P P"]:
    r"""The lower Cholesky factor `L` of `(A + A^T) / 2 = L L^T`; NaNs where `A`
    is not positive definite in the working precision (as `jnp.linalg`).

    Derivative: `dL = L Φ(L^{-1} dA_s L^{-T})`, `dA_s` the symmetric part of
    `dA` and `Φ` the lower triangle with the diagonal halved; `L^{-1}` from one
    triangular solve of the primal.
    """
    return _unbatched_cholesky(matrix)


@cholesky.defjvp
def _cholesky_jvp(primals, tangents):
    (matrix,), (tangent,) = primals, tangents
    factor = cholesky(matrix)
    inverse = solve_triangular(
        factor, jnp.eye(matrix.shape[-1], dtype=factor.dtype), lower=True
    )
    middle = inverse @ _symmetric(tangent) @ inverse.T
    phi = jnp.tril(middle) - jnp.diag(jnp.diagonal(middle)) / 2
    return factor, factor @ phi


# --------------------------------------------------------------------------- #
# Symmetric eigendecomposition
# --------------------------------------------------------------------------- #


@jax.custom_jvp
def eigh(
    matrix: Float[Array, "P P"],
) -> tuple[Float[Array, " P"], Float[Array, "P P"]]:
    r"""Eigenvalues `w` (ascending) and orthonormal eigenvectors `V` (columns) of
    the symmetric part of `A`, `A_s = V diag(w) V^T`.

    Derivative: with `S = V^T dA_s V`, `dw = diag(S)` and `dV = V (F ∘ S)`,
    `F_ij = 1 / (w_j - w_i)` off the diagonal; `F_ij = 0` where the two
    eigenvalues coincide to rounding (the eigenvectors of a repeated eigenvalue
    are not differentiable; functions of the spectrum that are, such as a
    log-determinant, are unaffected).
    """
    return _unbatched_eigh(_symmetric(matrix))


@eigh.defjvp
def _eigh_jvp(primals, tangents):
    (matrix,), (tangent,) = primals, tangents
    values, vectors = eigh(matrix)
    projected = vectors.T @ _symmetric(tangent) @ vectors
    gaps = values[None, :] - values[:, None]
    scale = jnp.max(jnp.abs(values), initial=1)
    coincide = jnp.abs(gaps) <= 8 * jnp.finfo(values.dtype).eps * scale
    inverse_gaps = jnp.where(coincide, 0, 1 / jnp.where(coincide, 1, gaps))
    return (values, vectors), (
        jnp.diagonal(projected),
        vectors @ (inverse_gaps * projected),
    )


# --------------------------------------------------------------------------- #
# Triangular solves
# --------------------------------------------------------------------------- #


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _solve_triangular(matrix, rhs, lower, transpose):
    return _unbatched_solve(lower, transpose)(matrix, rhs)


@_solve_triangular.defjvp
def _solve_triangular_jvp(lower, transpose, primals, tangents):
    (matrix, rhs), (matrix_tangent, rhs_tangent) = primals, tangents
    solution = _solve_triangular(matrix, rhs, lower, transpose)
    # op(T) X = B  =>  dX = op(T)^{-1} (dB - op(dT) X), with only T's triangle.
    inverse = _solve_triangular(
        matrix, jnp.eye(matrix.shape[-1], dtype=solution.dtype), lower, False
    )
    triangle = jnp.tril(matrix_tangent) if lower else jnp.triu(matrix_tangent)
    if transpose:
        inverse, triangle = inverse.T, triangle.T
    return solution, inverse @ (rhs_tangent - triangle @ solution)


def solve_triangular(
    matrix: Float[Array, "P P"],
    rhs: Float[Array, "P ..."],
    *,
    lower: bool,
    transpose: bool = False,
) -> Float[Array, "P ..."]:
    r"""`X` with `op(T) X = B`, `T` the lower (`lower=True`) or upper triangle of
    `matrix`, `op(T) = T^T` if `transpose`; `B` is `(P,)` or `(P, K)`.

    Derivative: `dX = op(T)^{-1} (dB - op(dT) X)`, with `T^{-1}` from one
    triangular solve of the primal.
    """
    return _solve_triangular(matrix, rhs, lower, transpose)


def cho_solve(
    factor: Float[Array, "P P"], rhs: Float[Array, "P ..."]
) -> Float[Array, "P ..."]:
    """`(L L^T)^{-1} B` from the lower Cholesky factor `L`: two triangular solves."""
    half = solve_triangular(factor, rhs, lower=True)
    return solve_triangular(factor, half, lower=True, transpose=True)
