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

from ._checks import (
    _check_key,
    _check_like,
    _check_method,
    _check_positive_int,
    _check_scalar,
)
from ._evidence import _log_evidence
from ._logdet import (
    _DENSE_MAX_SIZE,
    LogdetMethod,
    _as_matrix,
    _ravel,
    _unraveller,
)
from ._logdet import logdet as _curvature_logdet
from ._priors import PriorPrecision

PriorLike = PriorPrecision | Float[ArrayLike, ""] | PyTree[Float[ArrayLike, "..."]]


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
        (shape `curvature.sqrt_shape()`), `r = Λ^{1/2} e_1 + A e_2` has
        covariance `Λ + A A^T = P` (`A` the curvature's square-root factor,
        `sqrt_mv`), so `θ* + P^{-1} r ~ N(θ*, P^{-1} P P^{-1}) = N(θ*, P^{-1})`.
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
        if not (hasattr(curvature, "sqrt_mv") and hasattr(curvature, "sqrt_shape")):
            raise TypeError(
                "sample needs a curvature with a square-root factor (sqrt_mv, "
                "sqrt_shape): an EmpiricalFisherOperator, MCFisherOperator or "
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
            key_curvature, (num_samples, *curvature.sqrt_shape()), prior_sqrt.dtype
        )

        def one_sample(prior_noise, coefficients):
            rhs = jtu.tree_map(
                jnp.add,
                unravel(prior_sqrt * prior_noise),
                curvature.sqrt_mv(coefficients),
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
        return _curvature_logdet(
            self.curvature,
            self.prior,
            logdet_method=method,
            key=key,
            num_probes=num_probes,
            num_lanczos_steps=num_lanczos_steps,
        )

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
        logdet = _curvature_logdet(
            self.curvature,
            self.prior,
            logdet_method=method,
            key=key,
            num_probes=num_probes,
            num_lanczos_steps=num_lanczos_steps,
        )
        return _log_evidence(
            log_likelihood, _ravel(self.mean), prior_diagonal, logdet
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
