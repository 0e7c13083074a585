"""The Laplace evidence and choosing the prior precision by it."""

from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree, Scalar

from ._checks import _check_like, _check_method, _check_positive_int, _check_scalar
from ._logdet import LogdetMethod, _DenseLogdet, _make_logdet, _ravel, _SLQLogdet
from ._priors import PriorPrecision


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
