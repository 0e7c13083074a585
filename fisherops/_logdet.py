"""Log-determinants `log det(C + diag(d))` of a curvature operator plus a
diagonal: dense (Cholesky) or stochastic Lanczos quadrature.

Vectors here are flat `(P,)` in `jax.flatten_util.ravel_pytree` order.
"""

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

from ._checks import _check_key, _check_method, _check_positive_int

# `method="auto"` is dense up to this many params (a float64 `P x P` matrix of
# this size is 0.5 GB), stochastic above it.
_DENSE_MAX_SIZE = 8192

LogdetMethod = Literal["auto", "dense", "slq"]


def _unraveller(structure: PyTree[jax.ShapeDtypeStruct]) -> Callable:
    zeros = jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), structure)
    return jfu.ravel_pytree(zeros)[1]


def _ravel(tree: PyTree) -> Array:
    return jfu.ravel_pytree(tree)[0]


class _FlatMV(eqx.Module):
    """`v -> C v` on flat `(P,)` vectors, for an operator on params pytrees."""

    operator: lx.AbstractLinearOperator

    def __call__(self, vector: Float[Array, " P"]) -> Float[Array, " P"]:
        unravel = _unraveller(self.operator.in_structure())
        return _ravel(self.operator.mv(unravel(vector)))


def _dense_logdet(
    curvature: Float[Array, "P P"], prior_diagonal: Float[Array, " P"]
) -> Scalar:
    """`log det(C + diag(d))` by Cholesky; differentiable in both."""
    factor = jnp.linalg.cholesky(curvature + jnp.diag(prior_diagonal))
    return 2 * jnp.sum(jnp.log(jnp.diagonal(factor)))


def _lanczos(
    matvec: Callable[[Array], Array], starts: Float[Array, "S P"], num_steps: int
) -> tuple[Float[Array, "S m P"], Float[Array, "S m"], Float[Array, "S m-1"]]:
    """`num_steps` of fully reorthogonalised Lanczos from each row of `starts`.

    All `S` runs advance together (one vmapped `matvec` per step). Returns the
    orthonormal bases `Q` (`Q[s]` the rows of run `s`) and the tridiagonals
    `T = Q M Q^T` as diagonals and off-diagonals. On breakdown (an invariant
    subspace found before `num_steps`) the remaining rows of `Q` are zero and `T`
    continues with a decoupled identity block, which carries zero quadrature
    weight.
    """
    dtype = starts.dtype
    eps = jnp.finfo(dtype).eps
    batched_matvec = jax.vmap(matvec)
    num_runs, size = starts.shape
    basis = jnp.zeros((num_runs, num_steps + 1, size), dtype)
    basis = basis.at[:, 0].set(starts / jnp.linalg.norm(starts, axis=1, keepdims=True))

    def step(i, carry):
        basis, diagonal, off, alive = carry
        q = basis[:, i]
        w = batched_matvec(q)
        alpha = jnp.sum(q * w, axis=1)
        size = jnp.linalg.norm(w, axis=1)
        # The three-term recurrence, then one classical Gram-Schmidt pass against
        # the whole basis (rows not reached yet are zero).
        previous = basis[:, jnp.maximum(i - 1, 0)]
        w = w - alpha[:, None] * q - off[jnp.maximum(i - 1, 0)][:, None] * previous
        w = w - jnp.einsum("sk,skp->sp", jnp.einsum("skp,sp->sk", basis, w), basis)
        beta = jnp.linalg.norm(w, axis=1)
        broken = ~alive | (beta <= 100 * eps * size)
        scale = jnp.where(broken, 0, 1 / jnp.where(broken, 1, beta))
        basis = basis.at[:, i + 1].set(w * scale[:, None])
        diagonal = diagonal.at[i].set(jnp.where(alive, alpha, 1))
        off = off.at[i].set(jnp.where(broken, 0, beta))
        return basis, diagonal, off, ~broken

    zeros = jnp.zeros((num_steps, num_runs), dtype)
    alive = jnp.ones(num_runs, bool)
    basis, diagonal, off, _ = lax.fori_loop(
        0, num_steps, step, (basis, zeros, zeros, alive)
    )
    return basis[:, :num_steps], diagonal.T, off[: num_steps - 1].T


def _slq_logdet(
    curvature_mv: Callable[[Array], Array],
    prior_diagonal: Float[Array, " P"],
    probes: Float[Array, "S P"],
    num_steps: int,
) -> Scalar:
    r"""`log det(C + D)` by stochastic Lanczos quadrature, `D = diag(d) > 0`.

    With `M = I + D^{-1/2} C D^{-1/2}` (all eigenvalues >= 1),
    `log det(C + D) = sum_i log d_i + tr log M`, and for each probe `v`
    `v^T log(M) v ≈ |v|^2 sum_k U_{0k}^2 log θ_k` from the Lanczos tridiagonal
    `T = U diag(θ) U^T` started at `v`. The trace is the mean over the
    Rademacher probes (Hutchinson).

    The gradient in `d` is `diag(P^{-1})`, estimated with the same probes from the
    Lanczos solves `M^{-1} v ≈ |v| Q^T T^{-1} e_1`:
    `diag(P^{-1})_i ≈ mean_s v_i (M^{-1} v)_i / d_i`. No gradient flows into `C`.
    """
    diagonal = lax.stop_gradient(prior_diagonal)
    scale = lax.rsqrt(diagonal)

    def preconditioned_mv(v):
        return v + scale * curvature_mv(scale * v)

    basis, alphas, betas = _lanczos(preconditioned_mv, probes, num_steps)

    def quadrature(alphas, betas):
        tridiagonal = jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)
        theta, vectors = jnp.linalg.eigh(tridiagonal)
        theta = jnp.maximum(theta, jnp.finfo(theta.dtype).tiny)
        first = vectors[0]
        # e_1^T log(T) e_1 and T^{-1} e_1
        return jnp.sum(first**2 * jnp.log(theta)), vectors @ (first / theta)

    log_forms, inverse_first = jax.vmap(quadrature)(alphas, betas)
    norm2 = jnp.sum(probes**2, axis=1)
    solutions = jnp.sqrt(norm2)[:, None] * jnp.einsum(
        "sk,skp->sp", inverse_first, basis
    )
    estimate = jnp.sum(jnp.log(diagonal)) + jnp.mean(norm2 * log_forms)
    inverse_diagonal = jnp.mean(probes * solutions, axis=0) / diagonal
    # Value: the estimate. Gradient in `d`: the estimate of diag(P^{-1}).
    return lax.stop_gradient(estimate) + (prior_diagonal - diagonal) @ (
        lax.stop_gradient(inverse_diagonal)
    )


class _DenseLogdet(eqx.Module):
    """`d -> log det(C + diag(d))` with the dense `C` computed once."""

    curvature: Float[Array, "P P"]

    def __call__(self, prior_diagonal: Float[Array, " P"]) -> Scalar:
        return _dense_logdet(self.curvature, prior_diagonal)


class _SLQLogdet(eqx.Module):
    """`d -> log det(C + diag(d))` by SLQ with fixed probes, `C` linearised once."""

    curvature_mv: _FlatMV
    probes: Float[Array, "S P"]
    num_steps: int = eqx.field(static=True)

    def __call__(self, prior_diagonal: Float[Array, " P"]) -> Scalar:
        return _slq_logdet(
            self.curvature_mv, prior_diagonal, self.probes, self.num_steps
        )


@eqx.filter_jit
def _as_matrix(operator: lx.AbstractLinearOperator) -> Array:
    return operator.as_matrix()


def _make_logdet(
    curvature: lx.AbstractLinearOperator,
    method: LogdetMethod,
    key: PRNGKeyArray | None,
    num_probes: int,
    num_lanczos_steps: int,
) -> _DenseLogdet | _SLQLogdet:
    """The curvature work of a log-determinant, done once for many priors."""
    method = _check_method("method", method, ("auto", "dense", "slq"))
    size = curvature.in_size()
    if method == "auto":
        method = "dense" if size <= _DENSE_MAX_SIZE else "slq"
    if method == "dense":
        return _DenseLogdet(_as_matrix(curvature))
    num_probes = _check_positive_int("num_probes", num_probes)
    num_lanczos_steps = _check_positive_int("num_lanczos_steps", num_lanczos_steps)
    if key is None:
        key = jax.random.key(0)
    _check_key(key)
    dtype = jnp.result_type(*jtu.tree_leaves(curvature.in_structure()))
    probes = jax.random.rademacher(key, (num_probes, size), dtype)
    return _SLQLogdet(
        _FlatMV(lx.linearise(curvature)), probes, min(num_lanczos_steps, size)
    )
