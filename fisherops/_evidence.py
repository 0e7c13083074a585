r"""The Laplace evidence and choosing the prior precision by it (or by a
held-out predictive likelihood).

The evidence of the Laplace approximation with prior `N(0, Λ^{-1})`, `Λ` diagonal,
is

$$\log p(D) \approx \log p(D \mid \theta^*) - \tfrac12 \theta^{*T} \Lambda \theta^*
+ \tfrac12 \log\det \Lambda - \tfrac12 \log\det(C + \Lambda).$$

For a prior with one precision `λ_g` per group `g` of params (all params, one
params leaf, or one param), its derivative in `u_g = log λ_g` is
`(γ_g - λ_g |θ*_g|^2) / 2`, with `γ_g = P_g - λ_g tr_g((C + Λ)^{-1})` the group's
effective number of parameters, and the optimum satisfies MacKay's fixed point
`λ_g = γ_g / |θ*_g|^2`.
"""

import math
import warnings
from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree, Scalar

from ._checks import _check_like, _check_method, _check_positive_int, _check_scalar
from ._logdet import (
    LogdetMethod,
    _as_matrix,
    _checked_diagonal,
    _exact_kfac,
    _KFACLogdet,
    _MatrixLogdet,
    _ravel,
    _resolve_method,
    _slq_arguments,
    _slq_spectrum,
    _SLQLogdet,
    _Spectrum,
    logdet,
)
from ._operators import unwrapped
from ._priors import PriorPrecision

# Prior precisions are searched in `[e^-30, e^30]`; a group whose evidence keeps
# growing (e.g. all its params zero) stops at the bound, with a warning.
_LOG_BOUND = 30.0


def log_marginal_likelihood(
    curvature: lx.AbstractLinearOperator,
    prior_precision: PriorPrecision,
    params: PyTree[Float[Array, "..."]],
    log_likelihood: Float[ArrayLike, ""],
    *,
    logdet_method: LogdetMethod = "auto",
    key: PRNGKeyArray | None = None,
    num_probes: int = 32,
    num_lanczos_steps: int = 64,
) -> Scalar:
    r"""The Laplace evidence
    `log p(D|θ*) + log N(θ*; 0, Λ^{-1}) - 1/2 log det((C + Λ) / 2π)`.

    `LaplacePosterior.log_marginal_likelihood` calls this. The `2π` terms of the
    prior density and of the determinant cancel. A non-finite result is an
    error, naming the cause.

    **Arguments:**

    - `curvature`, `prior_precision`: `C` and `Λ`, as in `fisherops._logdet.logdet`.
    - `params`: `θ*`, the MAP (a params pytree with the curvature's structure).
    - `log_likelihood`: the scalar `log p(D | θ*)` of the training data.
    - `logdet_method`, `key`, `num_probes`, `num_lanczos_steps`: as in `logdet`.

    **Returns:** the scalar log evidence, differentiable in the prior precision,
    `params`, `log_likelihood` and the curvature's arrays.
    """
    log_likelihood = _check_scalar("log_likelihood", log_likelihood)
    _check_like("params", params, curvature.in_structure())
    value = logdet(
        curvature,
        prior_precision,
        logdet_method=logdet_method,
        key=key,
        num_probes=num_probes,
        num_lanczos_steps=num_lanczos_steps,
    )
    return _evidence(value, prior_precision, params, log_likelihood)


@eqx.filter_jit
def _evidence(
    logdet_value: Scalar,
    prior_precision: PriorPrecision,
    params: PyTree,
    log_likelihood: Scalar,
) -> Scalar:
    diagonal = _checked_diagonal(prior_precision)
    return _log_evidence(log_likelihood, _ravel(params), diagonal, logdet_value)


def _log_evidence(
    log_likelihood: Scalar,
    mean: Float[Array, " P"],
    prior_diagonal: Float[Array, " P"],
    logdet_value: Scalar,
) -> Scalar:
    """The evidence from `log det(C + Λ)`, for a caller that holds it (e.g. from a
    cached Cholesky factor); an error when it is not finite."""
    value = (
        log_likelihood
        - 0.5 * jnp.sum(prior_diagonal * mean**2)
        + 0.5 * jnp.sum(jnp.log(prior_diagonal))
        - 0.5 * logdet_value
    )
    return eqx.error_if(
        value,
        ~jnp.isfinite(value),
        "the log evidence is not finite: check that log_likelihood and the params "
        "are finite.",
    )


# --------------------------------------------------------------------------- #
# Prior tuning.
# --------------------------------------------------------------------------- #


class PriorPrecisionResult(eqx.Module):
    r"""What [`fisherops.optimize_prior_precision`][] found, and how well.

    **Fields:**

    - `prior_precision`: the [`fisherops.PriorPrecision`][] found; its
      `precision` is a 0-d array (`prior="scalar"`), one per params leaf
      (`"layerwise"`) or params-shaped (`"diagonal"`).
    - `objective`: at `prior_precision`, the log evidence (`objective="evidence"`)
      or the mean held-out negative log-likelihood (`objective="validation"`).
    - `gradient`: `d log evidence / d log λ_g` per precision group at
      `prior_precision` (zero at the optimum); `None` for `"validation"`.
    - `converged`: the fixed-point iteration's last step moved every `log λ_g` by
      less than `tolerance`; for grid searches, the best value is not at an end of
      the grid.
    - `num_steps`: fixed-point steps taken (the number of evidence evaluations),
      or the grid's size.
    - `grid_values`: the objective at each grid point (grid searches), else `None`.
    """

    prior_precision: PriorPrecision
    objective: Float[Array, ""]
    gradient: Float[Array, " G"] | None
    converged: Bool[Array, ""]
    num_steps: Int[Array, ""]
    grid_values: Float[Array, " K"] | None


# The progress bar of the running search, updated from compiled code through one
# module-level callback (so that progress=True compiles nothing new per call).
_BAR: list = []


def _bar_update(value) -> None:
    if _BAR:
        _BAR[-1].update(1)
        _BAR[-1].set_postfix(objective=f"{float(value):.6g}")


def _report(progress: bool, value: Scalar) -> None:
    if progress:
        jax.debug.callback(_bar_update, value)


class _Objective(eqx.Module):
    """The log evidence as a function of the group precisions `λ_g`:
    `ll - 1/2 Σ_g λ_g s_g + 1/2 Σ_g P_g log λ_g - 1/2 logdet(λ)`, with
    `s_g = |θ*_g|^2` and `P_g` the group sizes."""

    logdet: Callable[[Array], Scalar]
    sizes: Float[Array, " G"]
    square_norms: Float[Array, " G"]
    log_likelihood: Scalar

    def __call__(self, log_precision: Float[Array, " G"]):
        """Evidence, its gradient in `log λ` and MacKay's target `log(γ / s)`."""
        precision = jnp.exp(log_precision)
        value, grad = jax.value_and_grad(self.logdet)(precision)
        gamma = self.sizes - precision * grad
        evidence = (
            self.log_likelihood
            - 0.5 * precision @ self.square_norms
            + 0.5 * self.sizes @ log_precision
            - 0.5 * value
        )
        gradient = 0.5 * (gamma - precision * self.square_norms)
        tiny = jnp.finfo(precision.dtype).tiny
        target = jnp.log(jnp.maximum(gamma, tiny)) - jnp.log(
            jnp.maximum(self.square_norms, tiny)
        )
        return evidence, gradient, jnp.clip(target, -_LOG_BOUND, _LOG_BOUND)


_NON_FINITE = (
    "the log evidence became non-finite during the prior-precision search; the "
    "curvature or the params hold non-finite values (or, with "
    "logdet_method='dense', C + Λ is not positive definite in this precision: use "
    "'auto' or 'eigh')."
)


@eqx.filter_jit
def _fixed_point(
    objective: _Objective,
    log_init: Float[Array, " G"],
    num_steps: int,
    tolerance: float,
    progress: bool,
):
    r"""MacKay's fixed point `u_g <- F_g(u) = log(γ_g(u) / s_g)` in `u = log λ`,
    with a secant step per group: `u <- u + (F - u) / (1 - F')`, `F'` the
    secant slope of `F_g` in `u_g`, clipped to `[-1, 0]` (its range when the
    groups decouple; `F' = 0` is MacKay's plain update). For one group this is
    the secant method on the evidence's stationarity condition."""

    def evaluate(u):
        evidence, gradient, target = objective(u)
        evidence = eqx.error_if(evidence, ~jnp.isfinite(evidence), _NON_FINITE)
        _report(progress, evidence)
        return evidence, gradient, target

    def cond(state):
        step, u, target, *_ = state
        return (step < num_steps) & (jnp.max(jnp.abs(target - u)) > tolerance)

    def body(state):
        step, u, target, previous_u, previous_target, _, _ = state
        change = u - previous_u
        moved = jnp.abs(change) > 0
        slope = jnp.where(
            moved, (target - previous_target) / jnp.where(moved, change, 1), 0
        )
        slope = jnp.clip(slope, -1, 0)
        new_u = jnp.clip(u + (target - u) / (1 - slope), -_LOG_BOUND, _LOG_BOUND)
        evidence, gradient, new_target = evaluate(new_u)
        return step + 1, new_u, new_target, u, target, evidence, gradient

    evidence, gradient, target = evaluate(log_init)
    state = (jnp.asarray(1), log_init, target, log_init, target, evidence, gradient)
    step, u, target, _, _, evidence, gradient = lax.while_loop(cond, body, state)
    converged = jnp.max(jnp.abs(target - u)) <= tolerance
    return u, evidence, gradient, converged, step


@eqx.filter_jit
def _grid_search(objective: _Objective, log_grid: Float[Array, " K"], progress: bool):
    def evaluate(u):
        evidence, _, _ = objective(u[None])
        _report(progress, evidence)
        return evidence

    values = lax.map(evaluate, log_grid)
    values = eqx.error_if(values, ~jnp.all(jnp.isfinite(values)), _NON_FINITE)
    best = jnp.argmax(values)
    _, gradient, _ = objective(log_grid[best][None])
    converged = (best > 0) & (best < log_grid.size - 1)
    return log_grid[best][None], values[best], gradient, converged, values


@eqx.filter_jit
def _eigenvalues(curvature: lx.AbstractLinearOperator) -> Float[Array, " P"]:
    return jnp.maximum(jnp.linalg.eigvalsh(curvature.as_matrix()), 0)


@eqx.filter_jit
def _linearised(curvature: lx.AbstractLinearOperator) -> lx.AbstractLinearOperator:
    return lx.linearise(curvature)


def _groups(params: PyTree, prior: str) -> tuple[np.ndarray, int]:
    leaves = jtu.tree_leaves(params)
    sizes = [leaf.size for leaf in leaves]
    if prior == "scalar":
        return np.zeros(sum(sizes), np.int32), 1
    if prior == "layerwise":
        return np.repeat(np.arange(len(leaves), dtype=np.int32), sizes), len(leaves)
    return np.arange(sum(sizes), dtype=np.int32), sum(sizes)


def _log_init(init, params: PyTree, prior: str, num_groups: int, dtype) -> Array:
    """`log λ` per group from `init`: a scalar, a PriorPrecision, or (layerwise) a
    pytree of scalars, (diagonal) a params-shaped pytree."""
    if isinstance(init, PriorPrecision):
        init = init.precision
    if eqx.is_array_like(init) and jnp.ndim(init) == 0:
        values = jnp.full(num_groups, init, dtype)
    else:
        try:
            full = PriorPrecision(params, init).full_diagonal()
        except (TypeError, ValueError) as error:
            raise ValueError(
                "init must be a positive scalar, a PriorPrecision or what "
                f"PriorPrecision(params, ·) accepts; got {init!r}."
            ) from error
        flat = _ravel(full)
        groups, _ = _groups(params, prior)
        if prior == "scalar":
            raise ValueError("init must be a scalar for prior='scalar'; got a pytree.")
        values = jax.ops.segment_max(flat, jnp.asarray(groups), num_groups)
    values = jnp.asarray(values, dtype)
    if not isinstance(values, jax.core.Tracer) and not np.all(
        np.isfinite(values) & (np.asarray(values) > 0)
    ):
        raise ValueError(f"init must be positive and finite; got {init!r}.")
    return jnp.log(values)


def _prior_precision(params: PyTree, precisions: Array, prior: str) -> PriorPrecision:
    if not isinstance(precisions, jax.core.Tracer) and not np.all(
        np.isfinite(np.asarray(precisions))
    ):
        raise ValueError(
            f"the prior precision found is not finite ({precisions}); this is a bug "
            "unless the curvature or params hold non-finite values."
        )
    if prior == "scalar":
        return PriorPrecision(params, precisions[0])
    if prior == "layerwise":
        treedef = jtu.tree_structure(params)
        return PriorPrecision(params, jtu.tree_unflatten(treedef, list(precisions)))
    _, unravel = jax.flatten_util.ravel_pytree(params)
    return PriorPrecision(params, unravel(precisions))


def _validation_nll(posterior, data, likelihood) -> Scalar:
    """The mean negative log predictive density of held-out `(inputs, targets)`
    under the posterior's linearised predictive."""
    inputs, targets = data
    mean, variance = posterior.predictive(inputs, approximation="none")
    return _predictive_nll(likelihood, mean, variance, jnp.asarray(targets))


@eqx.filter_jit
def _predictive_nll(likelihood, mean, variance, targets) -> Scalar:
    from ._likelihoods import MSE, BinaryCrossEntropy, CrossEntropy, Gaussian
    from ._posterior import probit

    num_data = mean.shape[0]
    if isinstance(likelihood, CrossEntropy):
        probabilities = probit(mean, variance, link="softmax")
        if jnp.issubdtype(targets.dtype, jnp.integer):
            targets = jax.nn.one_hot(targets.reshape(num_data), mean.shape[-1])
        log_p = jnp.log(jnp.maximum(probabilities, jnp.finfo(mean.dtype).tiny))
        return -jnp.sum(targets * log_p) / num_data
    if isinstance(likelihood, BinaryCrossEntropy):
        probabilities = probit(mean, variance, link="sigmoid")
        tiny = jnp.finfo(mean.dtype).tiny
        targets = targets.reshape(mean.shape)
        log_p = targets * jnp.log(jnp.maximum(probabilities, tiny)) + (
            1 - targets
        ) * jnp.log(jnp.maximum(1 - probabilities, tiny))
        return -jnp.sum(log_p) / num_data
    if isinstance(likelihood, MSE | Gaussian):
        noise = 0.5 if isinstance(likelihood, MSE) else likelihood.sigma**2
        total = variance + noise
        targets = targets.reshape(mean.shape)
        terms = 0.5 * jnp.log(2 * math.pi * total) + (targets - mean) ** 2 / (2 * total)
        return jnp.sum(terms) / num_data
    raise ValueError(
        "objective='validation' scores the predictive of the built-in likelihoods "
        "(CrossEntropy, BinaryCrossEntropy, MSE, Gaussian); the curvature's "
        f"likelihood is {type(likelihood).__name__}."
    )


def _split(data) -> tuple:
    if isinstance(data, dict) and set(data) == {"input", "target"}:
        return data["input"], data["target"]
    if isinstance(data, tuple | list) and len(data) == 2:
        return tuple(data)
    raise ValueError(
        "validation_data must be (inputs, targets) or {'input': ..., 'target': ...}; "
        f"got {type(data).__name__}."
    )


def optimize_prior_precision(
    curvature_or_posterior,
    params: PyTree[Float[ArrayLike, "..."]] | None = None,
    log_likelihood: Float[ArrayLike, ""] = 0.0,
    *,
    objective: Literal["evidence", "validation"] = "evidence",
    prior: Literal["scalar", "layerwise", "diagonal"] = "scalar",
    init=None,
    grid: Float[ArrayLike, " K"] | None = None,
    validation_data=None,
    num_steps: int = 100,
    tolerance: float | None = None,
    logdet_method: LogdetMethod = "auto",
    key: PRNGKeyArray | None = None,
    num_probes: int = 32,
    num_lanczos_steps: int = 64,
    progress: bool = False,
) -> PriorPrecisionResult:
    r"""The prior precision `Λ` of the Laplace posterior that maximises the
    evidence, or minimises the held-out predictive negative log-likelihood.

    **Evidence** (`objective="evidence"`), at the cost of one decomposition:

    - `prior="scalar"` (`Λ = λ I`): `C`'s spectrum once, `eigh` of its dense
      matrix (`logdet_method` `"auto"`/`"dense"`/`"eigh"`, `P <= 8192` for
      `"auto"`) or SLQ's Gauss quadrature nodes and weights (`"slq"`, `"auto"`
      above 8192: one Lanczos run per probe, no `P x P` matrix). Every `λ` then
      costs `O(P)`, exactly and finitely (also in float32), and the optimum is
      found by the secant method on `γ(λ) = λ |θ*|^2` in `log λ` (a few steps).
    - `prior="layerwise"` (one `λ_l` per params leaf) or `"diagonal"` (one per
      param): MacKay's fixed point `λ_g = γ_g / |θ*_g|^2`, each step one
      evaluation of `tr_g((C + Λ)^{-1})`: a Cholesky of `C + Λ` (with `C`'s dense
      matrix computed once; `eigh` where the Cholesky breaks down) or, with
      `"slq"`, the fixed probes' estimate (layerwise only: a per-param estimate
      is too noisy).
    - A `fisherops.KFACOperator` curvature with a scalar or layerwise prior
      uses its exact Kronecker log-determinant for every step.
    - `grid`: instead of the fixed point, the best `λ` of `grid` (scalar only);
      each grid point costs `O(P)` after the decomposition.

    **Validation** (`objective="validation"`): the best `λ` of `grid` (default
    `logspace(-4, 4, 21)`) by the mean negative log predictive density of
    `validation_data` under the linearised predictive (probit for
    classification; Gaussian with the likelihood's noise for `MSE`/`Gaussian`),
    like laplace-torch's grid search. Scalar prior only.

    **Arguments:**

    - `curvature_or_posterior`: the curvature `C` (a symmetric PSD lineax
      operator on params), or a [`fisherops.LaplacePosterior`][] whose
      curvature, params and (as `init`) prior precision are used.
    - `params`: `θ*`, the MAP (default: the posterior's, or `curvature.params`).
    - `log_likelihood`: `log p(D | θ*)`; it shifts the evidence, not its maximiser.
    - `objective`, `prior`, `grid`: as above.
    - `init`: the starting `λ > 0` of the fixed point: a scalar, a
      `PriorPrecision`, or what `PriorPrecision(params, ·)` accepts (default:
      the posterior's prior precision, or 1).
    - `validation_data`: `(inputs, targets)` for `objective="validation"`.
    - `num_steps`: the most fixed-point steps.
    - `tolerance`: stop when a step changes every `log λ_g` by less (default
      `sqrt(eps)` of the params dtype).
    - `logdet_method`, `key`, `num_probes`, `num_lanczos_steps`: as in
      `LaplacePosterior.logdet`; the SLQ probes are drawn once and kept, so the
      objective is deterministic.
    - `progress`: show a tqdm progress bar (needs `tqdm`).

    **Returns:** a [`fisherops.PriorPrecisionResult`][]. A warning is issued when
    the search did not converge, ended at a search bound (`λ` of `e^±30`: the
    evidence keeps growing, e.g. for a group of params that are all zero) or at
    an end of the grid. Nothing non-finite is ever returned: a non-finite
    evidence is an error naming the cause.
    """
    curvature, params, init = _unpack(curvature_or_posterior, params, init)
    objective = _check_method("objective", objective, ("evidence", "validation"))
    prior = _check_method("prior", prior, ("scalar", "layerwise", "diagonal"))
    dtype = jnp.result_type(*jtu.tree_leaves(params))
    if grid is not None or objective == "validation":
        if prior != "scalar":
            raise ValueError(
                "a grid search (grid=..., or objective='validation') tunes one "
                f"scalar precision; got prior={prior!r}."
            )
        grid = jnp.logspace(-4, 4, 21) if grid is None else grid
        grid = jnp.asarray(grid, dtype)
        if grid.ndim != 1 or grid.size == 0 or not np.all(np.asarray(grid) > 0):
            raise ValueError(
                f"grid must be a non-empty 1-d array of positive values; got {grid}."
            )
    bar = _progress_bar(progress, objective, grid, num_steps)
    try:
        if objective == "validation":
            return _by_validation(curvature, params, grid, validation_data, bar)
        result = _by_evidence(
            curvature,
            params,
            log_likelihood,
            prior,
            init,
            grid,
            num_steps,
            tolerance,
            logdet_method,
            key,
            num_probes,
            num_lanczos_steps,
            progress,
            dtype,
        )
    finally:
        if bar is not None:
            bar.close()
            _BAR.remove(bar)
    _warn(result, grid is not None)
    return result


def _unpack(curvature_or_posterior, params, init):
    from ._posterior import LaplacePosterior

    if isinstance(curvature_or_posterior, LaplacePosterior):
        posterior = curvature_or_posterior
        curvature = posterior.curvature
        params = posterior.params if params is None else params
        init = posterior.prior_precision if init is None else init
    elif isinstance(curvature_or_posterior, lx.AbstractLinearOperator):
        curvature = curvature_or_posterior
        if params is None:
            params = getattr(curvature, "params", None)
        if params is None:
            raise ValueError(
                "params must be given for a curvature without a .params field."
            )
    else:
        raise TypeError(
            "curvature_or_posterior must be a lineax operator (e.g. a "
            "fisherops.GGNOperator) or a fisherops.LaplacePosterior; got "
            f"{type(curvature_or_posterior).__name__}."
        )
    params = jtu.tree_map(jnp.asarray, params)
    _check_like("params", params, curvature.in_structure())
    return curvature, params, 1.0 if init is None else init


def _progress_bar(progress, objective, grid, num_steps):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError(
            "progress=True needs tqdm: pip install tqdm (or fisherops[progress])."
        ) from error
    total = num_steps if grid is None else grid.size
    bar = tqdm(total=total, desc=f"prior precision ({objective})")
    _BAR.append(bar)
    return bar


def _by_evidence(
    curvature,
    params,
    log_likelihood,
    prior,
    init,
    grid,
    num_steps,
    tolerance,
    logdet_method,
    key,
    num_probes,
    num_lanczos_steps,
    progress,
    dtype,
) -> PriorPrecisionResult:
    log_likelihood = _check_scalar("log_likelihood", log_likelihood)
    num_steps = _check_positive_int("num_steps", num_steps)
    if tolerance is None:
        tolerance = float(np.sqrt(np.finfo(dtype).eps))
    if not (isinstance(tolerance, int | float) and tolerance > 0):
        raise ValueError(f"tolerance must be a positive float; got {tolerance!r}.")
    method = _resolve_method(curvature, logdet_method)
    groups, num_groups = _groups(params, prior)
    log_init = _log_init(init, params, prior, num_groups, dtype)

    example = _prior_precision(params, jnp.exp(log_init), prior)
    groups_array = jnp.asarray(groups)
    if _exact_kfac(curvature, example) and prior != "diagonal":
        logdet_fn = _KFACLogdet(curvature, params)
    elif method == "slq":
        if prior == "diagonal":
            raise ValueError(
                "prior='diagonal' needs diag((C + Λ)^{-1}) per param, which SLQ only "
                "estimates with a large variance; use logdet_method='dense' or "
                "'eigh' (P <= a few thousand), or prior='layerwise'."
            )
        key, num_probes, num_steps_lanczos = _slq_arguments(
            key, num_probes, num_lanczos_steps, curvature.in_size()
        )
        if prior == "scalar":
            nodes, weights = _slq_spectrum(
                _linearised(curvature), key, num_probes, num_steps_lanczos
            )
            logdet_fn = _Spectrum(nodes, weights)
        else:
            logdet_fn = _SLQLogdet(
                _linearised(curvature),
                groups_array,
                key,
                num_probes,
                num_steps_lanczos,
            )
    elif prior == "scalar":
        eigenvalues = _eigenvalues(curvature)
        logdet_fn = _Spectrum(eigenvalues, jnp.ones_like(eigenvalues))
    else:
        logdet_fn = _MatrixLogdet(_as_matrix(curvature), groups_array, method)

    flat = _ravel(params)
    objective = _Objective(
        logdet_fn,
        jnp.asarray(np.bincount(groups, minlength=num_groups), dtype),
        jax.ops.segment_sum(flat**2, groups_array, num_groups),
        jnp.asarray(log_likelihood, dtype),
    )
    if grid is None:
        log_precision, evidence, gradient, converged, steps = _fixed_point(
            objective, log_init, num_steps, tolerance, progress
        )
        grid_values = None
    else:
        log_precision, evidence, gradient, converged, grid_values = _grid_search(
            objective, jnp.log(grid), progress
        )
        steps = jnp.asarray(grid.size)
    return PriorPrecisionResult(
        _prior_precision(params, jnp.exp(log_precision), prior),
        evidence,
        gradient,
        converged,
        steps,
        grid_values,
    )


def _by_validation(curvature, params, grid, validation_data, bar):
    from ._posterior import LaplacePosterior

    if validation_data is None:
        raise ValueError(
            "objective='validation' needs validation_data=(inputs, targets)."
        )
    data = _split(validation_data)
    likelihood = getattr(unwrapped(curvature), "likelihood", None)
    values = []
    for precision in grid:
        posterior = LaplacePosterior(curvature, precision, params)
        value = _validation_nll(posterior, data, likelihood)
        values.append(value)
        if bar is not None:
            _bar_update(value)
    values = jnp.stack(values)
    if not np.all(np.isfinite(np.asarray(values))):
        raise ValueError(
            "the validation negative log-likelihood is not finite at some grid points "
            f"({np.asarray(values)}); check the validation data and the params."
        )
    best = int(np.argmin(np.asarray(values)))
    result = PriorPrecisionResult(
        PriorPrecision(params, grid[best]),
        values[best],
        None,
        jnp.asarray(0 < best < grid.size - 1),
        jnp.asarray(grid.size),
        values,
    )
    _warn(result, True)
    return result


def _warn(result: PriorPrecisionResult, grid: bool) -> None:
    converged = result.converged
    if isinstance(converged, jax.core.Tracer):
        return
    if not bool(converged):
        if grid:
            warnings.warn(
                "optimize_prior_precision: the best prior precision is at an end of "
                "the grid; widen the grid.",
                stacklevel=3,
            )
        else:
            warnings.warn(
                "optimize_prior_precision did not converge in "
                f"{int(result.num_steps)} steps (d log evidence / d log λ = "
                f"{np.asarray(result.gradient)}); raise num_steps or tolerance.",
                stacklevel=3,
            )
    elif result.gradient is not None and not isinstance(
        result.gradient, jax.core.Tracer
    ):
        precision = _ravel(result.prior_precision.precision)
        at_bound = np.abs(np.log(np.asarray(precision))) >= _LOG_BOUND - 1e-6
        if not grid and at_bound.any():
            warnings.warn(
                "optimize_prior_precision: some prior precisions stopped at the "
                "search bound e^±30 (the evidence keeps growing there, e.g. for a "
                "group of params that are all zero).",
                stacklevel=3,
            )
