r"""The Laplace posterior, its solves, samples and predictive.

The posterior over the params is approximated by the Gaussian

$$q(\theta) = \mathcal N(\theta^*, P^{-1}), \qquad P = C + \Lambda,$$

with `θ*` the trained params, `C` a curvature operator (empirical Fisher,
Monte-Carlo Fisher, GGN or KFAC, summed over the training data) and `Λ` the
diagonal precision of a zero-mean Gaussian prior.

Every product with `Σ = P^{-1}` goes through one of three ways, chosen by
`solve_method`:

- `"dense"`: the Cholesky factor `L` of the `P x P` matrix (`P = L L^T`). Held by
  the posterior after `factorise()`, so that it is computed once; otherwise built
  by the call that needs it.
- `"cg"`: conjugate gradients on the operator `P`, preconditioned (Jacobi, or the
  KFAC inverse), with no `P x P` matrix.
- KFAC curvatures with a scalar or layerwise prior use their exact Kronecker
  inverse and square root.

Every public method runs through one compiled body per argument shapes:
repeated eager calls with new arrays of the same shapes compile nothing.
Vectors are params-shaped pytrees; "flat" vectors are `(P,)` in
`jax.flatten_util.ravel_pytree` order.
"""

import math
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree, Scalar

from ._checks import (
    _check_key,
    _check_like,
    _check_method,
    _check_positive_int,
    _check_scalar,
)
from ._evidence import _evidence
from ._evidence import log_marginal_likelihood as _log_marginal_likelihood
from ._kfac import KFACOperator
from ._likelihoods import BinaryCrossEntropy, CrossEntropy
from ._logdet import _DENSE_MAX_SIZE, LogdetMethod, _ravel, _unraveller
from ._logdet import logdet as _logdet
from ._operators import AbstractCurvatureOperator, unwrapped
from ._priors import PriorPrecision

SolveMethod = Literal["auto", "dense", "cg"]
Preconditioner = Literal["auto", "jacobi"] | lx.AbstractLinearOperator | None
Approximation = Literal["probit", "mc", "none"]
Link = Literal["softmax", "sigmoid"]
PriorLike = PriorPrecision | Float[ArrayLike, ""] | PyTree[Float[ArrayLike, "..."]]

# CG stops after at most this many steps (or 10 P, if fewer) and says so: a
# trained network's posterior precision converges in hundreds of steps or, in
# float32 with a condition number near 1 / eps, not at all.
_MAX_CG_STEPS = 5000
# The default CG's result is refused when its true relative residual is above
# this many times its tolerance `sqrt(eps)` (float32: 3.5e-2; float64: 1.5e-6).
_RESIDUAL_FACTOR = 100
# `preconditioner="auto"` uses Jacobi only for curvatures with at most this many
# factor columns `K` (see `_uses_jacobi`).
_JACOBI_MAX_COLUMNS = 64
# The predictive's default chunk holds about this many bytes of Jacobian rows.
_PREDICTIVE_CHUNK_BYTES = 2**25


def _dtype(structure: PyTree[jax.ShapeDtypeStruct]) -> np.dtype:
    return jnp.result_type(*jtu.tree_leaves(structure))


def _tolerance(structure: PyTree[jax.ShapeDtypeStruct]) -> float:
    return float(np.sqrt(np.finfo(_dtype(structure)).eps))


def _default_cg(structure: PyTree[jax.ShapeDtypeStruct]) -> lx.CG:
    """The default CG: `rtol = atol = sqrt(eps)` of the params dtype, at most
    `min(10 P, 5000)` steps, and the residual by the recurrence only.

    lineax's default recomputes the residual every 10 steps without restarting
    the search directions; in float32 that breaks CG's conjugacy once the true
    residual stagnates, and the iterates diverge (a trained MLP, P = 212, cond
    5.5e4: relative error 2e-4 after 800 steps, 0.16 after 2000, never
    converged). With the recurrence alone the recursive residual keeps falling,
    CG stops (521 steps there, relative error 3e-4), and the true residual is
    checked afterwards.
    """
    tolerance = _tolerance(structure)
    size = sum(math.prod(s.shape) for s in jtu.tree_leaves(structure))
    return lx.CG(
        rtol=tolerance,
        atol=tolerance,
        stabilise_every=None,
        max_steps=min(10 * size, _MAX_CG_STEPS),
    )


# --------------------------------------------------------------------------- #
# Products with Σ = P^{-1}, inside the compiled bodies.
# --------------------------------------------------------------------------- #


class _Report(eqx.Module):
    """What a solve reports, for the error raised outside the compiled body."""

    non_finite: Bool[Array, ""]
    not_converged: Bool[Array, ""]
    steps: Int[Array, ""]
    residual: Float[Array, ""]


def _report(
    solutions: Float[Array, "m P"],
    residuals: Float[Array, " m"] | None = None,
    converged: Bool[Array, " m"] | None = None,
    steps: Int[Array, " m"] | None = None,
) -> _Report:
    dtype = solutions.dtype
    residuals = jnp.zeros(1, dtype) if residuals is None else residuals
    return _Report(
        non_finite=~(
            jnp.all(jnp.isfinite(solutions)) & jnp.all(jnp.isfinite(residuals))
        ),
        not_converged=jnp.array(False) if converged is None else ~jnp.all(converged),
        steps=jnp.array(0) if steps is None else jnp.max(steps),
        residual=jnp.max(residuals),
    )


def _dense_precision(posterior: "LaplacePosterior") -> Float[Array, "P P"]:
    matrix = posterior.curvature.as_matrix()
    return matrix + jnp.diag(_ravel(posterior.prior_precision.full_diagonal()))


def _cholesky(posterior: "LaplacePosterior") -> Float[Array, "P P"]:
    if posterior.cholesky is not None:
        return posterior.cholesky
    return jnp.linalg.cholesky(_dense_precision(posterior))


def _jacobi(posterior: "LaplacePosterior") -> PriorPrecision:
    """`diag(P)^{-1}` as a symmetric PSD diagonal operator on params."""
    diagonal = lx.diagonal(posterior.curvature) + _ravel(
        posterior.prior_precision.full_diagonal()
    )
    unravel = _unraveller(posterior.curvature.in_structure())
    return PriorPrecision(posterior.params, unravel(1 / diagonal))


def _isotropic(prior: PriorPrecision) -> bool:
    """Whether the prior is `λ I` (as far as can be told outside a trace)."""
    leaves = jtu.tree_leaves(prior.precision)
    if any(jnp.ndim(leaf) for leaf in leaves):
        return False
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return len(leaves) == 1
    return len({float(leaf) for leaf in leaves}) == 1


def _uses_jacobi(posterior: "LaplacePosterior") -> bool:
    """Whether `preconditioner="auto"` means Jacobi.

    Where it pays off: for a prior that is not isotropic (measured on an MLP
    trained on digits, P = 2410, float32: 193 -> 128 CG steps with a layerwise
    prior, but 233 -> 416 with `λ I`, where the curvature's diagonal only
    misleads), and for a fisherops curvature whose exact diagonal costs few
    products (`K <= 64` factor columns: the diagonal costs about `K / 2` CG steps).
    """
    curvature = unwrapped(posterior.curvature)
    return (
        isinstance(curvature, AbstractCurvatureOperator)
        and curvature.sqrt_shape()[1] <= _JACOBI_MAX_COLUMNS
        and not _isotropic(posterior.prior_precision)
    )


def _resolve_preconditioner(posterior: "LaplacePosterior", preconditioner, method):
    """`"auto"` made concrete, outside the compiled bodies (where the prior's
    values are known): `"kfac"`, `"jacobi"`, `None` or an operator; `None`
    unless `method` is CG (nothing else uses one)."""
    if preconditioner is None or isinstance(preconditioner, lx.AbstractLinearOperator):
        return preconditioner if method == "cg" else None
    _check_method("preconditioner", preconditioner, ("auto", "jacobi"))
    if method != "cg":
        return None
    if preconditioner == "jacobi":
        return "jacobi"
    if isinstance(posterior.curvature, KFACOperator):
        return "kfac"
    return "jacobi" if _uses_jacobi(posterior) else None


def _cg_options(posterior: "LaplacePosterior", preconditioner) -> dict[str, Any]:
    if preconditioner is None:
        return {}
    if preconditioner == "kfac":
        preconditioner = posterior.curvature.inverse(posterior.prior_precision)
    elif preconditioner == "jacobi":
        preconditioner = _jacobi(posterior)
    return {"preconditioner": preconditioner}


def _inverse(
    posterior: "LaplacePosterior",
    method: str,
    solver: lx.AbstractLinearSolver | None,
    preconditioner,
) -> Callable[[Float[Array, "m P"]], tuple[Float[Array, "m P"], _Report]]:
    """`rhs -> P^{-1} b` for each flat row `b` of `rhs`, the work shared by all
    rows (a Cholesky factor, a linearisation, a preconditioner) done once."""
    unravel = _unraveller(posterior.curvature.in_structure())

    def rows(mv, rhs):
        return jax.vmap(lambda row: _ravel(mv(unravel(row))))(rhs)

    if method == "dense":
        cholesky = _cholesky(posterior)

        def dense(rhs):
            solutions = jax.scipy.linalg.cho_solve((cholesky, True), rhs.T).T
            return solutions, _report(solutions)

        return dense
    if method == "kfac":
        inverse = posterior.curvature.inverse(posterior.prior_precision)

        def kfac(rhs):
            solutions = rows(inverse.mv, rhs)
            return solutions, _report(solutions)

        return kfac
    precision = lx.linearise(posterior.precision)
    structure = posterior.curvature.in_structure()
    # The default solver's result must also pass `|b - P x| <= limit |b|`; a
    # solver of the user's is trusted to its own tolerances.
    limit = jnp.inf
    if solver is None:
        solver = _default_cg(structure)
        limit = _RESIDUAL_FACTOR * _tolerance(structure)

    def rows_of(operator, shape, scale=1):
        """`scale * operator` on each row of an `(m, P)` array: block diagonal."""
        return lx.FunctionLinearOperator(
            jax.vmap(lambda row: scale * _ravel(operator.mv(unravel(row)))),
            jax.ShapeDtypeStruct(shape, _dtype(structure)),
            (lx.symmetric_tag, lx.positive_semidefinite_tag),
        )

    # All right-hand sides as ONE system, block diagonal in them: one CG, not
    # vmapped or scanned over them (lineax's CG under a vmap or a scan stopped
    # after a step with a NaN on a trained float32 MLP, P = 2410).
    #
    # lineax's CG declares a breakdown (alpha = NaN) when `p^T A p <= 100 eps n
    # r^T M r`, a threshold on the Rayleigh quotient that is absolute, not
    # relative to `A`: a prior precision below `100 eps n` (float32, n = 2410:
    # 0.029) trips it. `P` is at least `min Λ` (and `M P` at least
    # `min Λ / max diag P` with Jacobi), so the system is solved as
    # `(s P) x = s b` with `s` large enough; the iterates are those of `P x = b`.
    def iterative(rhs):
        prior_diagonal = _ravel(posterior.prior_precision.full_diagonal())
        single, lower = {}, jnp.min(prior_diagonal)
        if isinstance(solver, lx.CG):
            single = _cg_options(posterior, preconditioner)
            if preconditioner == "jacobi":
                lower = lower * jnp.min(lx.diagonal(single["preconditioner"]))
        options = {key: rows_of(value, rhs.shape) for key, value in single.items()}
        eps = jnp.finfo(rhs.dtype).eps
        scale = lax.stop_gradient(jnp.maximum(1, 1000 * eps * rhs.size / lower))
        operator = rows_of(precision, rhs.shape, scale)
        one_dtype = len({leaf.dtype for leaf in jax.tree.leaves(structure)}) == 1
        # One system on the params pytree itself; mixed-dtype params stay flat
        # (lineax's CG cannot carry leaves of different dtypes).
        if rhs.shape[0] == 1 and one_dtype:
            solution = lx.linear_solve(
                precision, unravel(rhs[0]), solver, options=single, throw=False
            )
            solution = eqx.tree_at(
                lambda s: s.value, solution, _ravel(solution.value)[None]
            )
        else:
            solution = lx.linear_solve(
                operator, scale * rhs, solver, options=options, throw=False
            )
        solutions = solution.value
        residuals = jnp.linalg.norm(scale * rhs - operator.mv(solutions), axis=1)
        norms = jnp.maximum(jnp.linalg.norm(scale * rhs, axis=1), eps)
        relative = residuals / norms
        converged = (solution.result == lx.RESULTS.successful) & (relative <= limit)
        steps = solution.stats.get("num_steps", 0)
        return solutions, _report(solutions, relative, converged, steps)

    return iterative


def _draws(
    posterior: "LaplacePosterior",
    key: PRNGKeyArray,
    num_samples: int,
    method: str,
    solver,
    preconditioner,
) -> tuple[Float[Array, "S P"], _Report]:
    """`S` flat draws from `N(0, P^{-1})`."""
    structure = posterior.curvature.in_structure()
    dtype = _dtype(structure)
    size = posterior.curvature.in_size()
    unravel = _unraveller(structure)
    if method == "dense":
        noise = jax.random.normal(key, (size, num_samples), dtype)
        # `L^T x = e` as an upper-triangular solve with `L^T` itself: XLA:CPU
        # runs it 3-4x faster than the transposed solve with `L` (P = 1898,
        # 20 draws: 3 ms against 10-13 ms), the same numbers.
        draws = jax.scipy.linalg.solve_triangular(
            _cholesky(posterior).T, noise, lower=False
        ).T
        return draws, _report(draws)
    if method == "kfac":
        noise = jax.random.normal(key, (num_samples, size), dtype)
        kfac, prior = posterior.curvature, posterior.prior_precision
        draws = jax.vmap(lambda e: _ravel(kfac.inverse_sqrt_mv(prior, unravel(e))))(
            noise
        )
        return draws, _report(draws)
    # Perturb and solve: r = Λ^{1/2} e_1 + A e_2 ~ N(0, P), P^{-1} r ~ N(0, P^{-1}).
    curvature = lx.linearise(posterior.curvature)
    key_prior, key_curvature = jax.random.split(key)
    prior_sqrt = jnp.sqrt(_ravel(posterior.prior_precision.full_diagonal()))
    prior_noise = jax.random.normal(key_prior, (num_samples, size), dtype)
    coefficients = jax.random.normal(
        key_curvature, (num_samples, *curvature.sqrt_shape()), dtype
    )
    rhs = prior_sqrt * prior_noise + jax.vmap(lambda e: _ravel(curvature.sqrt_mv(e)))(
        coefficients
    )
    return _inverse(posterior, method, solver, preconditioner)(rhs)


# --------------------------------------------------------------------------- #
# The compiled bodies.
# --------------------------------------------------------------------------- #


@eqx.filter_jit
def _solve_body(posterior, vector, method, solver, preconditioner):
    inverse = _inverse(posterior, method, solver, preconditioner)
    solutions, report = inverse(_ravel(vector)[None])
    return _unraveller(posterior.curvature.in_structure())(solutions[0]), report


@eqx.filter_jit
def _sample_body(posterior, key, num_samples, method, solver, preconditioner):
    draws, report = _draws(posterior, key, num_samples, method, solver, preconditioner)
    unravel = _unraveller(posterior.curvature.in_structure())
    samples = jax.vmap(lambda d: jtu.tree_map(jnp.add, posterior.params, unravel(d)))(
        draws
    )
    return samples, report


@eqx.filter_jit
def _factorise_body(posterior):
    cholesky = jnp.linalg.cholesky(_dense_precision(posterior))
    return cholesky, _report(cholesky)


@eqx.filter_jit
def _held_logdet(cholesky: Float[Array, "P P"]) -> Scalar:
    return 2 * jnp.sum(jnp.log(jnp.diagonal(cholesky)))


@eqx.filter_jit
def _held_evidence(cholesky, prior_precision, params, log_likelihood) -> Scalar:
    """The evidence from a held Cholesky factor, in one compiled call."""
    return _evidence(_held_logdet(cholesky), prior_precision, params, log_likelihood)


def _model(curvature: lx.AbstractLinearOperator) -> tuple[Any, bool]:
    """The curvature's `model_fn` and `vmap_over_data`."""
    curvature = unwrapped(curvature)
    model_fn = getattr(curvature, "model_fn", None)
    vmap_over_data = getattr(curvature, "vmap_over_data", None)
    if model_fn is None or vmap_over_data is None:
        raise TypeError(
            "predictive needs the curvature's model: a curvature operator built "
            "from model_fn (EmpiricalFisherOperator, MCFisherOperator, GGNOperator, "
            "KFACOperator, their linearise() or lineax.materialise); got "
            f"{type(curvature).__name__}."
        )
    return model_fn, vmap_over_data


def _per_datum(model_fn, vmap_over_data: bool):
    """`model_fn` on one datum, whatever `vmap_over_data`."""
    if vmap_over_data:
        return model_fn

    def single(x, params):
        return model_fn(jtu.tree_map(lambda leaf: leaf[None], x), params)[0]

    return single


def _link(link: str, logits: Array) -> Array:
    if link == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    return jax.nn.sigmoid(logits)


def _first(leaf: Array) -> Array:
    return leaf[0]


def _chunked(fn: Callable, inputs: PyTree, chunk_size: int) -> PyTree:
    """`fn` on `chunk_size` inputs at a time (`lax.map`, the last chunk padded
    with copies of the last input), the results concatenated along axis 0."""
    num_data = jtu.tree_leaves(inputs)[0].shape[0]
    num_chunks = -(-num_data // chunk_size)

    def pad(leaf):
        extra = jnp.repeat(leaf[-1:], num_chunks * chunk_size - num_data, axis=0)
        padded = jnp.concatenate([leaf, extra])
        return padded.reshape(num_chunks, chunk_size, *leaf.shape[1:])

    padded = jtu.tree_map(pad, inputs)
    if num_chunks == 1:  # CG must not run inside a scan: see `_inverse`
        results = jtu.tree_map(
            lambda leaf: leaf[None], fn(jtu.tree_map(_first, padded))
        )
    else:
        results = lax.map(fn, padded)
    return jtu.tree_map(
        lambda leaf: leaf.reshape(-1, *leaf.shape[2:])[:num_data], results
    )


@eqx.filter_jit
def _predictive_body(
    posterior,
    inputs,
    approximation,
    link,
    key,
    num_samples,
    chunk_size,
    method,
    solver,
    preconditioner,
):
    model_fn, vmap_over_data = _model(posterior.curvature)
    single = _per_datum(model_fn, vmap_over_data)
    batch = jax.vmap(single, in_axes=(0, None))
    params = posterior.params
    unravel = _unraveller(posterior.curvature.in_structure())
    if method == "dense" and posterior.cholesky is None:
        posterior = eqx.tree_at(
            lambda p: p.cholesky,
            posterior,
            _cholesky(posterior),
            is_leaf=lambda x: x is None,
        )

    if approximation == "mc":
        draws, report = _draws(
            posterior, key, num_samples, method, solver, preconditioner
        )

        def probabilities(xs):
            def logits(draw):  # f(x, θ*) + J δ for the chunk
                return jax.jvp(lambda p: batch(xs, p), (params,), (unravel(draw),))

            outputs, offsets = jax.vmap(logits)(draws)
            return jnp.mean(_link(link, outputs + offsets), axis=0)

        return _chunked(probabilities, inputs, chunk_size), report

    inverse = _inverse(posterior, method, solver, preconditioner)
    flat_params = _ravel(params)

    def moments(xs):
        def rows(x):  # (O, P): the rows of J
            jacobian = jax.jacrev(lambda p: single(x, unravel(p)))(flat_params)
            return jacobian.reshape(-1, flat_params.size)

        jacobians = jax.vmap(rows)(xs)  # (c, O, P)
        flat = jacobians.reshape(-1, flat_params.size)
        if method == "dense":  # j^T P^{-1} j = |L^{-1} j|^2: one triangular solve
            half = jax.scipy.linalg.solve_triangular(
                posterior.cholesky, flat.T, lower=True
            )
            variances, report = jnp.sum(half**2, axis=0), _report(half.T)
        else:
            solved, report = inverse(flat)
            variances = jnp.sum(flat * solved, axis=1)
        outputs = batch(xs, params)
        return outputs, variances.reshape(outputs.shape), report

    outputs, variances, reports = _chunked(moments, inputs, chunk_size)
    report = _Report(
        jnp.any(reports.non_finite),
        jnp.any(reports.not_converged),
        jnp.max(reports.steps),
        jnp.max(reports.residual),
    )
    if approximation == "none":
        return (outputs, variances), report
    return _probit_body(outputs, variances, link), report


# --------------------------------------------------------------------------- #
# Errors, raised outside the compiled bodies.
# --------------------------------------------------------------------------- #

_NON_FINITE = (
    "{what} produced non-finite values: the curvature (a NaN or inf in params or "
    "data), the prior precision or P = C + Λ is not finite, or P is singular or not "
    "numerically positive definite in {dtype} (a condition number near 1/eps). "
    "Check params and data, raise the prior precision, or use float64."
)
_NOT_CONVERGED = (
    "{what}: CG did not converge ({steps}{residual}). Try a larger prior "
    "precision, float64, solve_method='dense' (P up to a few thousand), or "
    "solver=lx.CG(rtol=..., atol=..., max_steps=...) with looser tolerances or "
    "more steps."
)


def _raise_on_failure(what: str, report: _Report, dtype, result: PyTree) -> PyTree:
    """Raise if `report` says the solve failed: with the numbers when they are
    concrete, through `eqx.error_if` under a trace."""
    non_finite = _NON_FINITE.format(what=what, dtype=np.dtype(dtype).name)
    if isinstance(report.non_finite, jax.core.Tracer):
        result = eqx.error_if(result, report.non_finite, non_finite)
        message = _NOT_CONVERGED.format(
            what=what, steps="its step cap, or its residual check", residual=""
        )
        return eqx.error_if(result, report.not_converged, message)
    if report.non_finite:
        raise FloatingPointError(non_finite)
    if report.not_converged:
        raise RuntimeError(
            _NOT_CONVERGED.format(
                what=what,
                steps=f"stopped after {int(report.steps)} steps",
                residual=f", relative residual {float(report.residual):.2e}",
            )
        )
    return result


# --------------------------------------------------------------------------- #
# The posterior.
# --------------------------------------------------------------------------- #


def _check_curvature(curvature) -> None:
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
    dtype = _dtype(curvature.in_structure())
    if jnp.finfo(dtype).bits < 32:
        raise TypeError(
            f"LaplacePosterior needs float32 or float64 params; got {dtype} (no "
            "Cholesky, CG tolerance or predictive is meaningful at its precision). "
            "Build the curvature on params cast to float32: "
            "jax.tree.map(lambda p: p.astype(jnp.float32), params)."
        )


def _check_prior(prior: PriorPrecision) -> None:
    for leaf in jtu.tree_leaves(prior.precision):
        if isinstance(leaf, jax.core.Tracer):
            continue
        values = np.asarray(leaf)
        if not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise ValueError(
                "prior_precision must be positive and finite: with a zero the "
                "posterior precision P = C + Λ is singular wherever the curvature "
                "is (always when N K < P), and its solves, samples, log-determinant "
                f"and predictive are not defined; got {values}."
            )


class LaplacePosterior(eqx.Module):
    r"""The Laplace posterior `N(θ*, P^{-1})`, `P = C + Λ`.

    **Arguments:**

    - `curvature`: the curvature `C`, summed over the training data: a
      [`fisherops.EmpiricalFisherOperator`][], [`fisherops.MCFisherOperator`][],
      [`fisherops.GGNOperator`][], [`fisherops.KFACOperator`][] (or a
      `linearise()`; any symmetric PSD lineax operator on params works for
      `solve`, `logdet` and the evidence). float32 or float64 params.
    - `prior_precision`: `Λ`, positive: a [`fisherops.PriorPrecision`][], or what
      `PriorPrecision(params, ·)` accepts (a scalar, one scalar per params leaf, a
      params-shaped pytree).
    - `params`: `θ*`, the trained params (the posterior mean); default
      `curvature.params`.

    **Methods** (each compiled once per argument shapes):

    - `factorise()`: a posterior holding the Cholesky factor of the dense `P`,
      reused by every later call (`solve`, `sample`, `predictive`, `logdet`).
    - `solve(vector, *, solve_method="auto", solver=None, preconditioner="auto")`
    - `sample(key, num_samples, *, solve_method="auto", solver=None,
      preconditioner="auto")`
    - `predictive(inputs, *, approximation="probit", link=None, key=None,
      num_samples=100, chunk_size=None, solve_method="auto", solver=None,
      preconditioner="auto")`
    - `logdet(logdet_method="auto", *, key=None, num_probes=32,
      num_lanczos_steps=64)`
    - `log_marginal_likelihood(log_likelihood, logdet_method="auto", *, ...)`

    `solve_method` (`"auto" | "dense" | "cg"`): `"dense"` uses the held Cholesky
    factor, or builds it for the call; `"cg"` solves with conjugate gradients;
    `"auto"` takes the held factor if there is one, else KFAC's exact inverse
    (KFAC curvature, scalar or layerwise prior), else CG (`solve`, `sample`) or,
    in `predictive` for `P <= 8192`, the dense factor built once for the call.

    CG (the default `solver`): `lx.CG` with `rtol = atol = sqrt(eps)` of the
    params dtype, at most `min(10 P, 5000)` steps, the residual by the
    recurrence only (lineax's periodic recomputation makes float32 CG diverge on
    trained networks), and its result checked: `|b - P x| <= 100 sqrt(eps) |b|`
    (float32: 3.5e-2). It takes a preconditioner:
    `"jacobi"` (`diag(P)^{-1}`, from the curvature's exact diagonal), `None`, any
    PSD lineax operator, or `"auto"`: the KFAC inverse for a KFAC curvature;
    Jacobi where it pays off, i.e. for a prior that is not `λ I` on a fisherops
    curvature with at most 64 factor columns (on a trained MLP it cut CG steps
    by a third with a layerwise prior, but nearly doubled them with `λ I`);
    none otherwise. A solve that does not converge raises a
    `RuntimeError` with its step count and residual; one that produced non-finite
    values (a NaN curvature, a singular `P`) raises a `FloatingPointError`. Under
    `jit` both are `eqx.error_if` checks. Nothing silently returns zeros or the
    mean.

    On GPUs, float32 CG and Lanczos need full-precision matmuls: set
    `jax.config.update("jax_default_matmul_precision", "highest")`. With TF32, the
    default, each product is only ~1e-3 accurate and CG stalls short of its
    tolerance (on an H200, 3000+ steps instead of 70 for a 6922-param MLP).
    """

    curvature: lx.AbstractLinearOperator
    prior_precision: PriorPrecision
    params: PyTree[Float[Array, "..."]]
    cholesky: Float[Array, "P P"] | None

    def __init__(
        self,
        curvature: lx.AbstractLinearOperator,
        prior_precision: PriorLike,
        params: PyTree[Float[ArrayLike, "..."]] | None = None,
    ):
        _check_curvature(curvature)
        if params is None:
            params = getattr(curvature, "params", None)
            if params is None:
                params = getattr(unwrapped(curvature), "params", None)
            if params is None:
                raise ValueError(
                    "params must be given for a curvature without .params (a "
                    f"{type(curvature).__name__}): the posterior mean θ*."
                )
        params = jtu.tree_map(jnp.asarray, params)
        _check_like("params", params, curvature.in_structure())
        if not isinstance(prior_precision, PriorPrecision):
            prior_precision = PriorPrecision(params, prior_precision)
        _check_like(
            "prior_precision",
            prior_precision.full_diagonal(),
            curvature.in_structure(),
        )
        _check_prior(prior_precision)
        self.curvature = curvature
        self.prior_precision = prior_precision
        self.params = params
        self.cholesky = None

    @property
    def precision(self) -> lx.AbstractLinearOperator:
        """`P = C + Λ`, symmetric PSD for lineax: `CG` and `Cholesky` accept it."""
        return self.curvature + self.prior_precision

    def factorise(self) -> "LaplacePosterior":
        """This posterior holding the Cholesky factor `L` of the dense `P = L L^T`.

        Costs the curvature's `as_matrix()` and one `O(P^3)` Cholesky, once; every
        later `solve`, `sample`, `predictive` and `logdet` of the returned
        posterior reuses it (`solve_method="auto"` or `"dense"`). Raises a
        `FloatingPointError` when `P` is not numerically positive definite.
        """
        cholesky, report = _factorise_body(self)
        cholesky = _raise_on_failure(
            "the Cholesky factorisation of P", report, cholesky.dtype, cholesky
        )
        return eqx.tree_at(
            lambda p: p.cholesky, self, cholesky, is_leaf=lambda x: x is None
        )

    def _method(self, solve_method: str, *, dense_when_small: bool) -> str:
        solve_method = _check_method(
            "solve_method", solve_method, ("auto", "dense", "cg")
        )
        if solve_method != "auto":
            return solve_method
        if self.cholesky is not None:
            return "dense"
        if isinstance(self.curvature, KFACOperator) and self.curvature.is_exact(
            self.prior_precision
        ):
            return "kfac"
        if dense_when_small and self.curvature.in_size() <= _DENSE_MAX_SIZE:
            return "dense"
        return "cg"

    def solve(
        self,
        vector: PyTree[Float[ArrayLike, "..."]],
        *,
        solve_method: SolveMethod = "auto",
        solver: lx.AbstractLinearSolver | None = None,
        preconditioner: Preconditioner = "auto",
    ) -> PyTree[Float[Array, "..."]]:
        """`P^{-1} b` for a params-shaped `b`.

        **Arguments:**

        - `vector`: `b`, a params-shaped pytree.
        - `solve_method`, `solver`, `preconditioner`: see the class docstring;
          `solver` is any lineax solver for symmetric PSD operators.
        """
        vector = jtu.tree_map(jnp.asarray, vector)
        _check_like("vector", vector, self.curvature.in_structure())
        method = self._method(solve_method, dense_when_small=False)
        preconditioner = _resolve_preconditioner(self, preconditioner, method)
        solution, report = _solve_body(self, vector, method, solver, preconditioner)
        return _raise_on_failure("solve", report, _ravel(vector).dtype, solution)

    def sample(
        self,
        key: PRNGKeyArray,
        num_samples: int,
        *,
        solve_method: SolveMethod = "auto",
        solver: lx.AbstractLinearSolver | None = None,
        preconditioner: Preconditioner = "auto",
    ) -> PyTree[Float[Array, "S ..."]]:
        r"""`num_samples` exact draws from `N(θ*, P^{-1})`.

        - dense: `θ* + L^{-T} e`, `e ~ N(0, I_P)`, with `P = L L^T`.
        - KFAC (exact prior): `θ* + (K + Λ)^{-1/2} e`.
        - CG, without a `P x P` matrix (perturb and solve): with `e_1 ~ N(0, I_P)`
          and `e_2 ~ N(0, I_{NK})` (shape `curvature.sqrt_shape()`),
          `r = Λ^{1/2} e_1 + A e_2 ~ N(0, P)` (`A` the curvature's square root,
          `sqrt_mv`), so `θ* + P^{-1} r ~ N(θ*, P^{-1})`. Each sample costs one
          `vjp` and one CG solve, on the curvature linearised once.

        **Arguments:**

        - `key`: a `jax.random.key`.
        - `num_samples`: `S >= 1`.
        - `solve_method`, `solver`, `preconditioner`: see the class docstring; the
          CG tolerance is the only approximation.

        **Returns:** a params-shaped pytree with a leading axis of size `S`.
        """
        _check_key(key)
        num_samples = _check_positive_int("num_samples", num_samples)
        method = self._method(solve_method, dense_when_small=False)
        preconditioner = _resolve_preconditioner(self, preconditioner, method)
        if method == "cg":
            curvature = self.curvature
            if not (hasattr(curvature, "sqrt_mv") and hasattr(curvature, "sqrt_shape")):
                raise TypeError(
                    "sample with CG needs a curvature with a square root (sqrt_mv, "
                    "sqrt_shape): an EmpiricalFisherOperator, MCFisherOperator or "
                    f"GGNOperator; got {type(curvature).__name__}. Use "
                    "solve_method='dense' (or factorise()) for other operators."
                )
        samples, report = _sample_body(
            self, key, num_samples, method, solver, preconditioner
        )
        return _raise_on_failure(
            "sample", report, _dtype(self.curvature.in_structure()), samples
        )

    def _uses_held_factor(self, logdet_method: str) -> bool:
        _check_method("logdet_method", logdet_method, ("auto", "dense", "eigh", "slq"))
        return self.cholesky is not None and logdet_method in ("auto", "dense")

    def logdet(
        self,
        logdet_method: LogdetMethod = "auto",
        *,
        key: PRNGKeyArray | None = None,
        num_probes: int = 32,
        num_lanczos_steps: int = 64,
    ) -> Scalar:
        r"""`log det P`, `P = C + Λ`.

        With a held Cholesky factor (`factorise()`), `2 sum log diag L` for
        `logdet_method` `"auto"` and `"dense"`; otherwise
        `fisherops._logdet.logdet`: `"dense"` (Cholesky of the dense `P`),
        `"eigh"` (eigenvalues of `C`), `"slq"` (stochastic Lanczos quadrature
        with `num_probes` probes of `num_lanczos_steps` steps, keyed by `key`),
        `"auto"` (dense for `P <= 8192`, SLQ above; a KFAC curvature with a
        scalar or layerwise prior uses its exact Kronecker log-determinant).
        Differentiable in the prior precision.
        """
        if self._uses_held_factor(logdet_method):
            return _held_logdet(self.cholesky)
        return _logdet(
            self.curvature,
            self.prior_precision,
            logdet_method=logdet_method,
            key=key,
            num_probes=num_probes,
            num_lanczos_steps=num_lanczos_steps,
        )

    def log_marginal_likelihood(
        self,
        log_likelihood: Float[ArrayLike, ""],
        logdet_method: LogdetMethod = "auto",
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
        - `logdet_method`, `key`, `num_probes`, `num_lanczos_steps`: as in
          `logdet` (the held Cholesky factor is reused likewise).
        """
        if self._uses_held_factor(logdet_method):
            return _held_evidence(
                self.cholesky,
                self.prior_precision,
                self.params,
                _check_scalar("log_likelihood", log_likelihood),
            )
        return _log_marginal_likelihood(
            self.curvature,
            self.prior_precision,
            self.params,
            log_likelihood,
            logdet_method=logdet_method,
            key=key,
            num_probes=num_probes,
            num_lanczos_steps=num_lanczos_steps,
        )

    def predictive(
        self,
        inputs: PyTree[ArrayLike],
        *,
        approximation: Approximation = "probit",
        link: Link | None = None,
        key: PRNGKeyArray | None = None,
        num_samples: int = 100,
        chunk_size: int | None = None,
        solve_method: SolveMethod = "auto",
        solver: lx.AbstractLinearSolver | None = None,
        preconditioner: Preconditioner = "auto",
    ) -> Float[Array, "N ..."] | tuple[Float[Array, "N ..."], Float[Array, "N ..."]]:
        r"""The linearised (GLM) predictive at new inputs.

        With `f_*(θ) ≈ f(x_*, θ*) + J_* (θ - θ*)` and `θ ~ N(θ*, P^{-1})`, the
        outputs are Gaussian, mean `f(x_*, θ*)`, covariance `J_* P^{-1} J_*^T`.
        The model (`model_fn`, `vmap_over_data`) is the curvature's.

        - `approximation="none"`: `(mean, variance)`, the mean and the diagonal of
          the covariance (one variance per output), each shaped `(N, *O)`: e.g.
          for regression.
        - `"probit"`: class probabilities `probit(mean, variance, link)`, which
          approximates `E[link(f_*)]` from the variances alone.
        - `"mc"`: class probabilities `mean_s link(f(x_*, θ*) + J_* δ_s)` over
          `num_samples` exact posterior draws `δ_s ~ N(0, P^{-1})` (one `jvp` per
          draw and input; the draws are shared by all inputs). This is the GLM
          predictive itself, to Monte-Carlo error `O(1/sqrt(S))`, with the full
          output covariance (probit sees only its diagonal). The two agree where
          the variances are small; probit is off by up to a few percent where
          they are large (logit variances of order 1 and more) or where the
          output correlations matter. MC needs only `S` solves, so it is also the
          cheap choice for large `P` (probit takes `N O` of them with CG).

        **Arguments:**

        - `inputs`: the new inputs, axis 0 indexing `N` data points (in the
          curvature's `model_fn` convention).
        - `approximation`: as above.
        - `link`: `"softmax"` or `"sigmoid"`; default from the curvature's
          likelihood (cross-entropy: softmax; binary cross-entropy: sigmoid).
        - `key`, `num_samples`: the draws of `"mc"`.
        - `chunk_size`: inputs per chunk (default: the Jacobian rows of a chunk,
          `chunk_size x O x P`, take about 32 MiB); memory does not grow with `N`.
        - `solve_method`, `solver`, `preconditioner`: see the class docstring.

        **Returns:** probabilities `(N, *O)`, or `(mean, variance)` for `"none"`.
        """
        approximation = _check_method(
            "approximation", approximation, ("probit", "mc", "none")
        )
        num_data = _check_inputs(inputs)
        model_fn, vmap_over_data = _model(self.curvature)
        if approximation != "none":
            link = self._link(link)
        if approximation == "mc":
            _check_key(key)
            num_samples = _check_positive_int("num_samples", num_samples)
        else:
            key, num_samples = None, None
        method = self._method(solve_method, dense_when_small=True)
        preconditioner = _resolve_preconditioner(self, preconditioner, method)
        inputs = jtu.tree_map(jnp.asarray, inputs)
        outputs = jax.eval_shape(
            jax.vmap(_per_datum(model_fn, vmap_over_data), in_axes=(0, None)),
            inputs,
            self.params,
        )
        if chunk_size is None:
            row_bytes = (outputs.size // num_data) * outputs.dtype.itemsize
            row_bytes *= self.curvature.in_size()
            chunk_size = max(1, _PREDICTIVE_CHUNK_BYTES // row_bytes)
        chunk_size = min(_check_positive_int("chunk_size", chunk_size), num_data)
        arguments = (approximation, link, key, num_samples, chunk_size)
        arguments += (method, solver, preconditioner)
        if method != "cg" or approximation == "mc":
            result, report = _predictive_body(self, inputs, *arguments)
            return _raise_on_failure("predictive", report, outputs.dtype, result)
        # CG must not run inside a scan (see `_inverse`): one compiled call per
        # chunk.
        pieces = [
            _predictive_body(
                self,
                jtu.tree_map(lambda leaf, s=start: leaf[s : s + chunk_size], inputs),
                *arguments,
            )
            for start in range(0, num_data, chunk_size)
        ]
        result = jtu.tree_map(lambda *p: jnp.concatenate(p), *[r for r, _ in pieces])
        reports = [report for _, report in pieces]
        report = _Report(
            jnp.any(jnp.stack([r.non_finite for r in reports])),
            jnp.any(jnp.stack([r.not_converged for r in reports])),
            jnp.max(jnp.stack([r.steps for r in reports])),
            jnp.max(jnp.stack([r.residual for r in reports])),
        )
        return _raise_on_failure("predictive", report, outputs.dtype, result)

    def _link(self, link: str | None) -> str:
        if link is not None:
            return _check_method("link", link, ("softmax", "sigmoid"))
        likelihood = getattr(unwrapped(self.curvature), "likelihood", None)
        if isinstance(likelihood, CrossEntropy):
            return "softmax"
        if isinstance(likelihood, BinaryCrossEntropy):
            return "sigmoid"
        raise ValueError(
            "link must be given ('softmax' or 'sigmoid') for a curvature whose "
            f"likelihood is not a classification one; got {likelihood!r}. For "
            "regression, use approximation='none' for the mean and variance."
        )


def _check_inputs(inputs) -> int:
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jtu.tree_leaves(inputs)}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
        raise ValueError(
            "inputs must be arrays with one leading data axis of the same "
            f"non-zero length; got leading sizes {sorted(map(str, sizes))}."
        )
    return sizes.pop()


@eqx.filter_jit
def _probit_body(logit_mean, logit_variance, link):
    scaled = logit_mean / jnp.sqrt(1 + math.pi / 8 * logit_variance)
    return _link(link, scaled)


def probit(
    logit_mean: Float[ArrayLike, "*N O"],
    logit_variance: Float[ArrayLike, "*N O"],
    link: Link = "softmax",
) -> Float[Array, "*N O"]:
    r"""Class probabilities from a Gaussian over logits (the probit approximation).

    `E[softmax(f)] ≈ softmax(μ / sqrt(1 + π σ^2 / 8))` over the last axis, and
    `E[sigmoid(f)] ≈ sigmoid(μ / sqrt(1 + π σ^2 / 8))` elementwise, for
    `f ~ N(μ, diag(σ^2))`: e.g. from `LaplacePosterior.predictive(...,
    approximation="none")`.

    **Arguments:**

    - `logit_mean`: the logits' means `μ`, classes on the last axis.
    - `logit_variance`: their variances `σ^2 >= 0`, the same shape (checked where
      concrete).
    - `link`: `"softmax"` (cross-entropy) or `"sigmoid"` (binary cross-entropy).
    """
    link = _check_method("link", link, ("softmax", "sigmoid"))
    logit_mean, logit_variance = jnp.asarray(logit_mean), jnp.asarray(logit_variance)
    if logit_mean.shape != logit_variance.shape:
        raise ValueError(
            "logit_mean and logit_variance must have the same shape; got "
            f"{logit_mean.shape} and {logit_variance.shape}."
        )
    if not isinstance(logit_variance, jax.core.Tracer):
        negative = np.asarray(logit_variance) < 0
        if np.any(negative):
            raise ValueError(
                "logit_variance must be non-negative; got "
                f"{np.asarray(logit_variance)[negative].min()} (and "
                f"{int(negative.sum())} negative entries in all)."
            )
    return _probit_body(logit_mean, logit_variance, link)
