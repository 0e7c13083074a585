r"""Lanczos on flat vectors: the one implementation behind stochastic Lanczos
quadrature (`_logdet`), spectral densities and top eigenpairs (`estimate`) and
the low-rank curvature.

`M` is a symmetric `P x P` matrix given by `matvec: (P,) -> (P,)`. `m` steps from
a start vector `q_0` build an orthonormal basis `Q = [q_0 .. q_{m-1}]` (rows) and
the tridiagonal `T = Q M Q^T`, whose eigenpairs `(θ_k, u_k)` are the Ritz pairs:
`θ_k` approximates an eigenvalue of `M` with the vector `Q^T u_k`, and
`|q_0|^2 sum_k u_{0k}^2 f(θ_k)` is the Gauss quadrature of `q_0^T f(M) q_0`.

Why not matfree (installed, measured in `benchmarks/bench_hessian.py`):
matfree's stochastic estimators `vmap` the integrand over the probes, so the
tridiagonal `eigh` of every probe becomes ONE batched LAPACK call (which can
deadlock jaxlib's CPU thread pool, see `tests/repro_lapack_deadlock.py`) and all
probes' bases live at once (`num_probes x m x P` memory instead of `m x P`); its
fully reorthogonalised tridiagonalisation goes through the general Arnoldi
(`hessenberg`) with an `m x m` Hessenberg matrix per probe. The recurrence here
is twenty lines; the probes run one after another with `lax.scan`/`lax.map`.
"""

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from . import _linalg

# Restart vectors after a breakdown: a fixed stream, so a run is deterministic
# whatever the caller's key.
_RESTART_KEY = 20260


def _orthogonalised(
    vector: Float[Array, " P"], basis: Float[Array, "n P"]
) -> Float[Array, " P"]:
    """`vector` minus its projection on the rows of `basis` (orthonormal rows, or
    zero rows), by classical Gram-Schmidt applied twice ("twice is enough")."""
    vector = vector - (basis @ vector) @ basis
    return vector - (basis @ vector) @ basis


def _lanczos(
    matvec: Callable[[Array], Array], start: Float[Array, " P"], num_steps: int
) -> tuple[Float[Array, "m P"], Float[Array, " m"], Float[Array, " m-1"]]:
    """`num_steps` (`m <= P`) of fully reorthogonalised Lanczos from `start`.

    Returns the orthonormal basis `Q` (`(m, P)`, rows, `Q[0] = start/|start|`)
    and `T = Q M Q^T` as its diagonal `(m,)` and off-diagonal `(m-1,)`.

    On breakdown (the Krylov space of `start` is invariant after `j < m` steps:
    `M` of low rank, or few distinct eigenvalues) the off-diagonal entry is
    zero and the basis continues from a fresh pseudo-random vector orthogonal
    to it. `T` is then block diagonal: the blocks after the first carry no
    quadrature weight for `start` (SLQ is unchanged), and their Ritz pairs are
    eigenpairs of `M` on the rest of the space, so with `m = P` the Ritz pairs
    are all of `M`'s eigenpairs. Memory: `(m + 1) x P`.
    """
    dtype = start.dtype
    size = start.size
    tiny = 100 * jnp.finfo(dtype).eps
    basis = jnp.zeros((num_steps + 1, size), dtype)
    basis = basis.at[0].set(start / jnp.linalg.norm(start))

    def step(i, carry):
        basis, diagonal, off, scale = carry
        q = basis[i]
        w = matvec(q)
        alpha = q @ w
        scale = jnp.maximum(scale, jnp.linalg.norm(w))
        # The three-term recurrence, then reorthogonalisation against the whole
        # basis (rows not reached yet are zero).
        previous = jnp.maximum(i - 1, 0)
        w = w - alpha * q - off[previous] * basis[previous]
        w = _orthogonalised(w, basis)
        beta = jnp.linalg.norm(w)
        broken = beta <= tiny * scale
        restart = jax.random.normal(
            jax.random.fold_in(jax.random.key(_RESTART_KEY), i), (size,), dtype
        )
        restart = _orthogonalised(restart, basis)
        following = jnp.where(
            broken,
            restart / jnp.linalg.norm(restart),
            w / jnp.where(broken, 1, beta),
        )
        basis = basis.at[i + 1].set(following)
        diagonal = diagonal.at[i].set(alpha)
        off = off.at[i].set(jnp.where(broken, 0, beta))
        return basis, diagonal, off, scale

    zeros = jnp.zeros(num_steps, dtype)
    basis, diagonal, off, _ = lax.fori_loop(
        0, num_steps, step, (basis, zeros, zeros, jnp.zeros((), dtype))
    )
    return basis[:num_steps], diagonal, off[: num_steps - 1]


def _tridiagonal_eigh(
    diagonal: Float[Array, " m"], off: Float[Array, " m-1"]
) -> tuple[Float[Array, " m"], Float[Array, "m m"]]:
    """Eigenvalues (ascending) and eigenvectors (columns) of one `m x m`
    symmetric tridiagonal: one unbatched LAPACK call, also under a user's `vmap`
    (`_linalg.eigh`)."""
    tridiagonal = jnp.diag(diagonal) + jnp.diag(off, 1) + jnp.diag(off, -1)
    return _linalg.eigh(tridiagonal)


Which = Literal["largest", "smallest", "magnitude"]


def _ritz_pairs(
    matvec: Callable[[Array], Array],
    start: Float[Array, " P"],
    num_steps: int,
    num_pairs: int,
    which: Which = "largest",
) -> tuple[Float[Array, " k"], Float[Array, "k P"]]:
    """`num_pairs` (`k <= num_steps`) Ritz pairs of `M` from `num_steps` Lanczos
    steps: the largest eigenvalues (`"largest"`, descending), the smallest
    (`"smallest"`, ascending) or the largest in magnitude (`"magnitude"`,
    descending `|θ|`), with orthonormal vectors as rows `(k, P)`. Exact (to
    rounding) with `num_steps = P`; the extreme pairs converge first."""
    basis, diagonal, off = _lanczos(matvec, start, num_steps)
    theta, vectors = _tridiagonal_eigh(diagonal, off)
    if which == "largest":
        order = jnp.argsort(-theta)
    elif which == "smallest":
        order = jnp.argsort(theta)
    else:
        order = jnp.argsort(-jnp.abs(theta))
    order = order[:num_pairs]
    return theta[order], vectors[:, order].T @ basis
