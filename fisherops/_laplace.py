r"""The Laplace approximation on top of the curvature operators.

The posterior over the params is approximated by the Gaussian

$$q(\theta) = \mathcal N(\theta^*, P^{-1}), \qquad P = C + \Lambda,$$

with `θ*` the trained params (`mean`), `C` a curvature operator (empirical
Fisher, Monte-Carlo Fisher or GGN, summed over the training data) and `Λ` the
diagonal precision of a zero-mean Gaussian prior. Nothing here forms a `P x P`
matrix unless asked to (`method="dense"`): solves are CG, samples are
perturb-and-solve, log-determinants are stochastic Lanczos quadrature.

Vectors are params-shaped pytrees; "flat" vectors are `(P,)` in
`jax.flatten_util.ravel_pytree` order.
"""

import math
from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree, Scalar

from ._priors import PriorPrecision

# `method="auto"` is dense up to this many params (a float64 `P x P` matrix of
# this size is 0.5 GB), stochastic above it.
_DENSE_MAX_SIZE = 8192

LogdetMethod = Literal["auto", "dense", "slq"]
# A prior precision, or what `PriorPrecision(params, ·)` accepts.
PriorLike = PriorPrecision | Float[ArrayLike, ""] | PyTree[Float[ArrayLike, "..."]]


# --------------------------------------------------------------------------- #
# Argument checking.
# --------------------------------------------------------------------------- #


def _leaf_signature(tree: PyTree) -> list[tuple[tuple[int, ...], np.dtype]]:
    return [(tuple(jnp.shape(x)), jnp.result_type(x)) for x in jtu.tree_leaves(tree)]


def _check_like(name: str, tree: PyTree, structure: PyTree) -> None:
    if jtu.tree_structure(tree) != jtu.tree_structure(structure) or _leaf_signature(
        tree
    ) != [(s.shape, s.dtype) for s in jtu.tree_leaves(structure)]:
        expected = jtu.tree_map(lambda s: f"{s.dtype}{list(s.shape)}", structure)
        got = jtu.tree_map(lambda x: f"{jnp.result_type(x)}{list(jnp.shape(x))}", tree)
        raise ValueError(
            f"{name} must have the curvature's params structure {expected}; got {got}."
        )


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}.")
    return int(value)


def _check_key(key) -> None:
    if key is None:
        raise ValueError("key must be a jax.random.key (or PRNGKey); got None.")
    dtype, shape = jnp.result_type(key), jnp.shape(key)
    typed = jnp.issubdtype(dtype, jax.dtypes.prng_key) and shape == ()
    raw = dtype == jnp.uint32 and shape == (2,)
    if not (typed or raw):
        raise ValueError(
            f"key must be one jax.random.key (or PRNGKey); got {dtype}{list(shape)}."
        )


def _check_method(name: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}.")
    return value


def _check_scalar(name: str, value) -> Array:
    if not (eqx.is_array_like(value) and jnp.ndim(value) == 0):
        shape = f" of shape {jnp.shape(value)}" if eqx.is_array_like(value) else ""
        raise ValueError(
            f"{name} must be a scalar (a float or a 0-d array); got "
            f"{type(value).__name__}{shape}."
        )
    return jnp.asarray(value)


# --------------------------------------------------------------------------- #
# Flat vectors and log-determinants of `C + diag(d)`.
# --------------------------------------------------------------------------- #


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


def _log_evidence(
    log_likelihood: Scalar,
    mean: Float[Array, " P"],
    prior_diagonal: Float[Array, " P"],
    logdet: Scalar,
) -> Scalar:
    r"""`log p(D|θ*) + log N(θ*; 0, Λ^{-1}) - 1/2 log det(P / 2π)`.

    The `2π` terms of the prior density and of the determinant cancel.
    """
    return (
        log_likelihood
        - 0.5 * jnp.sum(prior_diagonal * mean**2)
        + 0.5 * jnp.sum(jnp.log(prior_diagonal))
        - 0.5 * logdet
    )


def _default_solver(structure: PyTree[jax.ShapeDtypeStruct]) -> lx.CG:
    dtype = jnp.result_type(*jtu.tree_leaves(structure))
    tolerance = float(np.sqrt(np.finfo(dtype).eps))
    return lx.CG(rtol=tolerance, atol=tolerance)


# --------------------------------------------------------------------------- #
# The posterior.
# --------------------------------------------------------------------------- #


class LaplacePosterior(eqx.Module):
    r"""The Laplace posterior `N(θ*, P^{-1})`, `P = C + Λ`.

    **Arguments:**

    - `curvature`: the curvature `C`, summed over the training data: a
      [`fisherops.EmpiricalFisherOperator`][], [`fisherops.MCFisherOperator`][] or
      [`fisherops.GGNOperator`][] (or its `linearise()`; any symmetric PSD lineax
      operator on params works for everything but `sample`).
    - `prior`: the prior precision `Λ`: a [`fisherops.PriorPrecision`][], or what
      `PriorPrecision(mean, ·)` accepts (a scalar, one scalar per params leaf, a
      params-shaped pytree).
    - `mean`: `θ*`, a params pytree with the curvature's structure and dtypes.

    On GPUs, float32 CG and Lanczos need full-precision matmuls: set
    `jax.config.update("jax_default_matmul_precision", "highest")`. With TF32, the
    default, each product is only ~1e-3 accurate and CG stalls short of its
    tolerance (on an H200, 3000+ steps instead of 70 for a 6922-param MLP).
    """

    curvature: lx.AbstractLinearOperator
    prior: PriorPrecision
    mean: PyTree[Float[Array, "..."]]

    def __init__(
        self,
        curvature: lx.AbstractLinearOperator,
        prior: PriorLike,
        mean: PyTree[Float[ArrayLike, "..."]],
    ):
        if not isinstance(curvature, lx.AbstractLinearOperator):
            raise TypeError(
                "curvature must be a lineax operator (e.g. a "
                f"fisherops.GGNOperator); got {type(curvature).__name__}."
            )
        if not (lx.is_symmetric(curvature) and lx.is_positive_semidefinite(curvature)):
            raise ValueError(
                "curvature must be symmetric positive semidefinite for lineax; got "
                f"{type(curvature).__name__} without those tags."
            )
        mean = jtu.tree_map(jnp.asarray, mean)
        _check_like("mean", mean, curvature.in_structure())
        if not isinstance(prior, PriorPrecision):
            prior = PriorPrecision(mean, prior)
        _check_like("prior", prior.full_diagonal(), curvature.in_structure())
        self.curvature = curvature
        self.prior = prior
        self.mean = mean

    @property
    def precision(self) -> lx.AbstractLinearOperator:
        """`P = C + Λ`, symmetric PSD for lineax: `CG` and `Cholesky` accept it."""
        return self.curvature + self.prior

    def solve(
        self,
        vector: PyTree[Float[Array, "..."]],
        solver: lx.AbstractLinearSolver | None = None,
    ) -> PyTree[Float[Array, "..."]]:
        """`P^{-1} b` for a params-shaped `b`.

        **Arguments:**

        - `vector`: `b`, a params-shaped pytree.
        - `solver`: any lineax solver for symmetric PSD operators; default
          `lx.CG` with `rtol = atol = sqrt(eps)` of the params dtype.
        """
        _check_like("vector", vector, self.curvature.in_structure())
        if solver is None:
            solver = _default_solver(self.curvature.in_structure())
        return lx.linear_solve(self.precision, vector, solver).value

    def sample(
        self,
        key: PRNGKeyArray,
        num_samples: int,
        *,
        solver: lx.AbstractLinearSolver | None = None,
    ) -> PyTree[Float[Array, "S ..."]]:
        r"""`num_samples` exact draws from `N(θ*, P^{-1})`, without a `P x P` matrix.

        Perturb-and-solve: with `e_1 ~ N(0, I_P)` and `e_2 ~ N(0, I_{NK})`
        (shape `curvature.factor_shape()`), `r = Λ^{1/2} e_1 + A e_2` has
        covariance `Λ + A A^T = P` (`A` the curvature's square-root factor,
        `factor_mv`), so `θ* + P^{-1} r ~ N(θ*, P^{-1} P P^{-1}) = N(θ*, P^{-1})`.
        Each sample costs one `vjp` (`A e_2`) and one CG solve; the curvature is
        linearised once and the samples are vmapped.

        **Arguments:**

        - `key`: a `jax.random.key`.
        - `num_samples`: `S >= 1`.
        - `solver`: as in `solve`; its tolerance is the only approximation.

        **Returns:** a params-shaped pytree with a leading axis of size `S`.
        """
        _check_key(key)
        num_samples = _check_positive_int("num_samples", num_samples)
        curvature = lx.linearise(self.curvature)
        if not (hasattr(curvature, "factor_mv") and hasattr(curvature, "factor_shape")):
            raise TypeError(
                "sample needs a curvature with a square-root factor (factor_mv, "
                "factor_shape): an EmpiricalFisherOperator, MCFisherOperator or "
                f"GGNOperator; got {type(self.curvature).__name__}."
            )
        structure = self.curvature.in_structure()
        if solver is None:
            solver = _default_solver(structure)
        precision = curvature + self.prior
        prior_sqrt = _ravel(jtu.tree_map(jnp.sqrt, self.prior.full_diagonal()))
        unravel = _unraveller(structure)
        key_prior, key_curvature = jax.random.split(key)
        prior_noise = jax.random.normal(
            key_prior, (num_samples, prior_sqrt.size), prior_sqrt.dtype
        )
        coefficients = jax.random.normal(
            key_curvature, (num_samples, *curvature.factor_shape()), prior_sqrt.dtype
        )

        def one_sample(prior_noise, coefficients):
            rhs = jtu.tree_map(
                jnp.add,
                unravel(prior_sqrt * prior_noise),
                curvature.factor_mv(coefficients),
            )
            offset = lx.linear_solve(precision, rhs, solver).value
            return jtu.tree_map(jnp.add, self.mean, offset)

        return jax.vmap(one_sample)(prior_noise, coefficients)

    def logdet(
        self,
        method: LogdetMethod = "auto",
        *,
        key: PRNGKeyArray | None = None,
        num_probes: int = 32,
        num_lanczos_steps: int = 64,
    ) -> Scalar:
        r"""`log det P`.

        - `"dense"`: exact, by Cholesky of `C.as_matrix() + Λ` (`O(P^2)` memory).
        - `"slq"`: stochastic Lanczos quadrature on
          `M = I + Λ^{-1/2} C Λ^{-1/2}`: `log det P = sum log Λ_ii + tr log M`, the
          trace by `num_probes` Rademacher probes, each `v^T log(M) v` by
          `num_lanczos_steps` steps of fully reorthogonalised Lanczos (one
          curvature `mv` each) and Gauss quadrature. Unbiased up to the
          quadrature error; needs `Λ > 0`.
        - `"auto"`: dense for `P <= 8192`, SLQ above.

        Differentiable in the prior precision (SLQ: the gradient is the same
        probes' estimate of `diag(P^{-1})`, and none flows into the curvature).

        **Arguments:**

        - `method`: as above.
        - `key`: the probes' key (SLQ; default `jax.random.key(0)`).
        - `num_probes`, `num_lanczos_steps`: SLQ's probes and Lanczos steps.
        """
        logdet = _make_logdet(
            self.curvature, method, key, num_probes, num_lanczos_steps
        )
        return logdet(_ravel(self.prior.full_diagonal()))

    def log_marginal_likelihood(
        self,
        log_likelihood: Float[ArrayLike, ""],
        method: LogdetMethod = "auto",
        *,
        key: PRNGKeyArray | None = None,
        num_probes: int = 32,
        num_lanczos_steps: int = 64,
    ) -> Scalar:
        r"""The Laplace evidence

        $$\log p(D) \approx \log p(D \mid \theta^*) + \log p(\theta^*)
        - \tfrac12 \log\det(P / 2\pi),$$

        with `log p(θ*) = log N(θ*; 0, Λ^{-1})`. Differentiable in the prior
        precision (e.g. `jax.grad` through `PriorPrecision(params, λ)`).

        **Arguments:**

        - `log_likelihood`: the scalar `log p(D | θ*)` of the training data. For
          the built-in losses it is `-sum_n c(y_n, f_n)` up to a constant (`"mse"`:
          `- sum_n c - N O log(π) / 2`, since `r = N(f, I/2)`).
        - `method`, `key`, `num_probes`, `num_lanczos_steps`: as in `logdet`.
        """
        log_likelihood = _check_scalar("log_likelihood", log_likelihood)
        prior_diagonal = _ravel(self.prior.full_diagonal())
        logdet = _make_logdet(
            self.curvature, method, key, num_probes, num_lanczos_steps
        )
        return _log_evidence(
            log_likelihood, _ravel(self.mean), prior_diagonal, logdet(prior_diagonal)
        )

    def predictive(
        self,
        model_fn: Callable,
        inputs: PyTree[Array],
        *,
        vmap_over_data: bool = True,
        method: Literal["auto", "dense", "cg"] = "auto",
        solver: lx.AbstractLinearSolver | None = None,
        batch_size: int | None = None,
    ) -> tuple[Float[Array, "N ..."], Float[Array, "N ..."]]:
        r"""The linearised (GLM) predictive at new inputs: mean and variance.

        With `f_*(θ) ≈ f(x_*, θ*) + J_* (θ - θ*)` and `θ ~ N(θ*, P^{-1})`,
        the output is Gaussian with mean `f(x_*, θ*)` and covariance
        `J_* P^{-1} J_*^T`; this returns its diagonal (one variance per output).

        - `"dense"`: `P = L L^T` by Cholesky once, variance `|L^{-1} J_{*o}^T|^2`.
        - `"cg"`: one CG solve `P^{-1} J_{*o}^T` per input and output
          (vmapped over outputs, and over `batch_size` inputs at a time).
        - `"auto"`: dense for `P <= 8192`, CG above.

        **Arguments:**

        - `model_fn`: `model_fn(input, params) -> output` (as for the operators).
        - `inputs`: the new inputs, axis 0 indexing `N` data points.
        - `vmap_over_data`: whether `model_fn` sees one datum (`True`) or a batch.
        - `solver`: for `"cg"`, as in `solve`.
        - `batch_size`: how many inputs to process at once (default: all).

        **Returns:** `(mean, variance)`, both shaped like the outputs `(N, *O)`.
        """
        if not callable(model_fn):
            raise TypeError(
                "model_fn must be a callable model_fn(input, params); got "
                f"{type(model_fn).__name__}."
            )
        method = _check_method("method", method, ("auto", "dense", "cg"))
        sizes = {
            jnp.shape(x)[0] if jnp.ndim(x) else None for x in jtu.tree_leaves(inputs)
        }
        if len(sizes) != 1 or None in sizes:
            raise ValueError(
                "inputs must be arrays with one leading data axis of the same "
                f"length; got leading sizes {sorted(map(str, sizes))}."
            )
        num_data = sizes.pop()
        if batch_size is not None:
            batch_size = _check_positive_int("batch_size", batch_size)
        structure = self.curvature.in_structure()
        flat_mean, unravel = jfu.ravel_pytree(self.mean)

        def single(x, flat_params):
            params = unravel(flat_params)
            if vmap_over_data:
                return model_fn(x, params)
            one = jtu.tree_map(lambda leaf: leaf[None], x)
            return model_fn(one, params)[0]

        def jacobian(x):  # (O, P)
            rows = jax.jacrev(single, argnums=1)(x, flat_mean)
            return rows.reshape(-1, flat_mean.size)

        if method == "auto":
            method = "dense" if flat_mean.size <= _DENSE_MAX_SIZE else "cg"
        if method == "dense":
            matrix = _as_matrix(self.curvature) + jnp.diag(
                _ravel(self.prior.full_diagonal())
            )
            cholesky = jnp.linalg.cholesky(matrix)

            def variance(x):
                half = jax.scipy.linalg.solve_triangular(
                    cholesky, jacobian(x).T, lower=True
                )
                return jnp.sum(half**2, axis=0)

        else:
            precision = lx.linearise(self.precision)
            if solver is None:
                solver = _default_solver(structure)
            unravel_vector = _unraveller(structure)

            def variance(x):
                rows = jacobian(x)

                def solve(row):
                    solution = lx.linear_solve(precision, unravel_vector(row), solver)
                    return row @ _ravel(solution.value)

                return jax.vmap(solve)(rows)

        outputs = jax.vmap(single, in_axes=(0, None))(inputs, flat_mean)
        variances = lax.map(variance, inputs, batch_size=batch_size or num_data)
        return outputs, variances.reshape(outputs.shape)


def probit(
    mean: Float[Array, "*N O"],
    variance: Float[Array, "*N O"],
    link: Literal["softmax", "sigmoid"] = "softmax",
) -> Float[Array, "*N O"]:
    r"""Class probabilities from a Gaussian over logits (the probit approximation).

    `E[softmax(f)] ≈ softmax(μ / sqrt(1 + π σ^2 / 8))` over the last axis, and
    `E[sigmoid(f)] ≈ sigmoid(μ / sqrt(1 + π σ^2 / 8))` elementwise, for
    `f ~ N(μ, diag(σ^2))`: feed it the output of `LaplacePosterior.predictive`.

    **Arguments:**

    - `mean`: the logits' means `μ`, classes on the last axis.
    - `variance`: their variances `σ^2`, the same shape.
    - `link`: `"softmax"` (cross-entropy) or `"sigmoid"` (binary cross-entropy).
    """
    link = _check_method("link", link, ("softmax", "sigmoid"))
    if jnp.shape(mean) != jnp.shape(variance):
        raise ValueError(
            "mean and variance must have the same shape; got "
            f"{jnp.shape(mean)} and {jnp.shape(variance)}."
        )
    scaled = mean / jnp.sqrt(1 + math.pi / 8 * variance)
    if link == "softmax":
        return jax.nn.softmax(scaled, axis=-1)
    return jax.nn.sigmoid(scaled)


# --------------------------------------------------------------------------- #
# Choosing the prior precision.
# --------------------------------------------------------------------------- #


class _Evidence(eqx.Module):
    """The evidence as a function of the log prior precisions `u` (one per group).

    Group `g` (all params, or one params leaf) has precision `exp(u_g)`;
    `groups[i]` is the group of flat param `i`.
    """

    log_likelihood: Scalar
    mean: Float[Array, " P"]
    groups: Array
    logdet: _DenseLogdet | _SLQLogdet

    def __call__(self, log_precision: Float[Array, " G"]) -> Scalar:
        prior_diagonal = jnp.exp(log_precision)[self.groups]
        return _log_evidence(
            self.log_likelihood,
            self.mean,
            prior_diagonal,
            self.logdet(prior_diagonal),
        )


def _report(callback: Callable | None, *values) -> None:
    if callback is not None:
        jax.debug.callback(callback, *values)


@eqx.filter_jit
def _adam(
    evidence: _Evidence,
    log_precision: Float[Array, " G"],
    num_steps: int,
    learning_rate: float,
    callback: Callable | None,
) -> Float[Array, " G"]:
    """Adam ascent on the evidence, the step size decaying like a cosine to 1%."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    value_and_grad = jax.value_and_grad(evidence)

    def step(state, t):
        u, m, v = state
        value, grad = value_and_grad(u)
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad**2
        m_hat = m / (1 - beta1 ** (t + 1))
        v_hat = v / (1 - beta2 ** (t + 1))
        rate = learning_rate * (
            0.01 + 0.99 * 0.5 * (1 + jnp.cos(jnp.pi * t / num_steps))
        )
        _report(callback, value)
        return (u + rate * m_hat / (jnp.sqrt(v_hat) + eps), m, v), None

    zeros = jnp.zeros_like(log_precision)
    (log_precision, _, _), _ = lax.scan(
        step, (log_precision, zeros, zeros), jnp.arange(num_steps, dtype=zeros.dtype)
    )
    return log_precision


@eqx.filter_jit
def _grid(
    evidence: _Evidence,
    log_grid: Float[Array, " K"],
    callback: Callable | None,
) -> Float[Array, " 1"]:
    def value(u):
        result = evidence(u[None])
        _report(callback, result)
        return result

    values = lax.map(value, log_grid)
    return log_grid[jnp.argmax(values)][None]


def optimize_prior_precision(
    curvature: lx.AbstractLinearOperator,
    mean: PyTree[Float[ArrayLike, "..."]],
    log_likelihood: Float[ArrayLike, ""] = 0.0,
    *,
    init: "Float[ArrayLike, ''] | PyTree[Float[ArrayLike, '']]" = 1.0,
    layerwise: bool = False,
    method: Literal["grad", "grid"] = "grad",
    num_steps: int = 100,
    learning_rate: float = 0.1,
    grid: Float[ArrayLike, " K"] | None = None,
    logdet_method: LogdetMethod = "auto",
    key: PRNGKeyArray | None = None,
    num_probes: int = 32,
    num_lanczos_steps: int = 64,
    progress: bool = False,
) -> PriorPrecision:
    r"""The prior precision that maximises the Laplace evidence.

    Maximises `LaplacePosterior(curvature, Λ, mean).log_marginal_likelihood(...)`
    over an isotropic `Λ = λ I` (`layerwise=False`) or one `λ_l` per params leaf
    (`layerwise=True`). The curvature work is done once: its dense matrix
    (`logdet_method="dense"`, `O(P^2)` memory) or its linearisation and fixed
    SLQ probes (`"slq"`); `"auto"` is dense for `P <= 8192`. Each evaluation then
    costs a Cholesky of `C + Λ` or `num_probes * num_lanczos_steps` curvature
    `mv`s.

    - `method="grad"`: `num_steps` Adam steps on `log λ` (so `λ` stays positive),
      step size `learning_rate` decaying like a cosine to 1% of it.
    - `method="grid"`: the best `λ` of `grid` (default `logspace(-4, 4, 81)`);
      isotropic only.

    **Arguments:**

    - `curvature`: the curvature operator `C` (see [`fisherops.LaplacePosterior`][]).
    - `mean`: `θ*`, the params.
    - `log_likelihood`: `log p(D | θ*)`; it shifts the evidence, not its
      maximiser (it shows in the progress bar).
    - `init`: the starting `λ > 0`; with `layerwise=True` a scalar for every leaf
      or a pytree of scalars with the structure of `mean`.
    - `layerwise`, `method`, `num_steps`, `learning_rate`, `grid`: as above.
    - `logdet_method`, `key`, `num_probes`, `num_lanczos_steps`: as in
      `LaplacePosterior.logdet`; the SLQ probes are drawn once and kept, so the
      objective is deterministic.
    - `progress`: show a tqdm progress bar (needs `tqdm`).

    **Returns:** the optimised [`fisherops.PriorPrecision`][]: its `precision` is
    a scalar per params leaf (all equal unless `layerwise`).
    """
    if not isinstance(curvature, lx.AbstractLinearOperator):
        raise TypeError(
            "curvature must be a lineax operator (e.g. a fisherops.GGNOperator); "
            f"got {type(curvature).__name__}."
        )
    mean = jtu.tree_map(jnp.asarray, mean)
    _check_like("mean", mean, curvature.in_structure())
    log_likelihood = _check_scalar("log_likelihood", log_likelihood)
    method = _check_method("method", method, ("grad", "grid"))
    if not isinstance(layerwise, bool):
        raise TypeError(f"layerwise must be a bool; got {type(layerwise).__name__}.")
    if method == "grid" and layerwise:
        raise ValueError(
            "method='grid' searches one isotropic precision; use method='grad' "
            "with layerwise=True."
        )
    leaves, treedef = jtu.tree_flatten(mean)
    dtype = jnp.result_type(*leaves)
    if layerwise:
        if eqx.is_array_like(init) and jnp.ndim(init) == 0:
            init = [init] * len(leaves)
        elif jtu.tree_structure(init) == treedef and all(
            jnp.ndim(x) == 0 for x in jtu.tree_leaves(init)
        ):
            init = jtu.tree_leaves(init)
        else:
            raise ValueError(
                "init must be a scalar or a pytree of scalars with the structure "
                f"of mean {treedef}; got {jtu.tree_structure(init)}."
            )
        groups = np.repeat(np.arange(len(leaves)), [leaf.size for leaf in leaves])
    else:
        init = [_check_scalar("init", init)]
        groups = np.zeros(sum(leaf.size for leaf in leaves), int)
    init = jnp.asarray(jnp.stack([jnp.asarray(x) for x in init]), dtype)
    if not isinstance(init, jax.core.Tracer) and not np.all(np.asarray(init) > 0):
        raise ValueError(f"init must be positive; got {init}.")
    num_steps = _check_positive_int("num_steps", num_steps)

    if method == "grid":
        grid = jnp.logspace(-4, 4, 81) if grid is None else grid
        grid = jnp.asarray(grid, dtype)
        if grid.ndim != 1 or grid.size == 0 or not np.all(np.asarray(grid) > 0):
            raise ValueError(
                f"grid must be a non-empty 1-d array of positive values; got {grid}."
            )

    logdet = _make_logdet(curvature, logdet_method, key, num_probes, num_lanczos_steps)
    evidence = _Evidence(log_likelihood, _ravel(mean), jnp.asarray(groups), logdet)

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError as error:
            raise ImportError(
                "progress=True needs tqdm: pip install tqdm (or fisherops[progress])."
            ) from error
        total = num_steps if method == "grad" else grid.size
        bar = tqdm(total=total, desc="prior precision")

    def callback(value):
        bar.update(1)
        bar.set_postfix(evidence=f"{float(value):.4g}")

    callback = callback if bar is not None else None
    if method == "grad":
        log_precision = _adam(
            evidence, jnp.log(init), num_steps, float(learning_rate), callback
        )
    else:
        log_precision = _grid(evidence, jnp.log(grid), callback)
    if bar is not None:
        jax.block_until_ready(log_precision)
        bar.close()
    precision = jnp.exp(log_precision)
    if layerwise:
        return PriorPrecision(mean, jtu.tree_unflatten(treedef, list(precision)))
    return PriorPrecision(mean, precision[0])
