r"""Online marginal-likelihood training (Immer et al. 2021, "Scalable marginal
likelihood estimation for model selection in deep learning").

The params follow optax steps on the negative log joint per datum,

$$\ell(\theta) = \frac1B \sum_{n \in \text{batch}} c(y_n, f(x_n, \theta))
+ \frac{1}{2N} \theta^\top \Lambda \theta,$$

and every `hyper_every` steps after `burn_in` the hyperparameters (the prior
precision `Λ`, and for a Gaussian likelihood its noise `σ`) are set to the
maximiser of the Laplace evidence of the current curvature (see
[`fisherops.optimize_prior_precision`][]). The last step of training is always
followed by one more tuning, so the hyperparameters returned are the evidence
optimum at the params returned.
"""

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ._checks import (
    Data,
    ModelFn,
    _check_key,
    _check_method,
    _check_params,
    _check_positive_int,
    _leading,
    _owned,
    _split_data,
)
from ._core import batched_model
from ._evidence import optimize_prior_precision
from ._kfac import KFACOperator
from ._likelihoods import MSE, AbstractLikelihood, Gaussian, as_likelihood
from ._likelihoods import log_likelihood as _log_likelihood
from ._operators import GGNOperator
from ._priors import PriorPrecision

Structure = Literal["kfac", "ggn"] | Callable[..., lx.AbstractLinearOperator]


class MarglikResult(eqx.Module):
    """What [`fisherops.marglik_training`][] returns.

    **Fields:**

    - `params`: the trained params.
    - `prior_precision`: the [`fisherops.PriorPrecision`][] tuned at `params`.
    - `sigma`: the Gaussian noise scale tuned at `params` (`tune_sigma=True`), the
      likelihood's own for a `Gaussian` otherwise, else `None`.
    - `likelihood`: the likelihood at `sigma`.
    - `curvature`: the curvature at `params` that the last tuning used:
      `LaplacePosterior(result.curvature, result.prior_precision)` is the
      Laplace posterior.
    - `history`: numpy arrays, one entry per tuning: `"step"` (optax steps done),
      `"loss"` (the mean objective `ℓ` over the steps since the previous
      tuning), `"log_evidence"`, `"prior_precision"` (`(T, G)`, one column per
      precision group) and `"sigma"` (with a Gaussian likelihood).
    """

    params: PyTree[Float[Array, "..."]]
    prior_precision: PriorPrecision
    sigma: Float[Array, ""] | None
    likelihood: AbstractLikelihood
    curvature: lx.AbstractLinearOperator
    history: dict[str, np.ndarray]


def marglik_training(
    model_fn: ModelFn,
    params: PyTree[Float[Array, "..."]],
    data: Data,
    likelihood: "str | AbstractLikelihood",
    optimizer: Any = None,
    *,
    num_steps: int,
    batch_size: int | None = None,
    key: PRNGKeyArray | None = None,
    structure: Structure = "kfac",
    prior: Literal["scalar", "layerwise", "diagonal"] = "layerwise",
    prior_precision: Any = 1.0,
    tune_sigma: bool = False,
    hyper_every: int | None = None,
    burn_in: int = 0,
    vmap_over_data: bool = True,
    chunk_size: int | None = None,
    progress: bool = False,
) -> MarglikResult:
    r"""Train `params` and tune the prior precision (and noise) by the evidence.

    The counterpart of laplace-torch's `marglik_training`: optax steps on the
    negative log joint `ℓ` per datum (see the module docstring), and every
    `hyper_every` steps from step `burn_in` on, the prior precision (and `σ`)
    set to the evidence maximiser of the curvature at the current params:
    the fixed point of [`fisherops.optimize_prior_precision`][] rather than a
    few gradient steps, so the hyperparameters follow the params closely. Each
    piece runs compiled, once per shape: the optax steps between two tunings are
    one compiled loop, and a second call with arrays of the same shapes (and the
    same `model_fn` and `optimizer` objects) compiles nothing.

    **Arguments:**

    - `model_fn`, `params`, `data`, `vmap_over_data`, `chunk_size`: as for
      [`fisherops.GGNOperator`][] (`chunk_size` bounds the curvature's memory).
    - `likelihood`: a loss name or a likelihood (e.g. `fisherops.Gaussian(σ)`,
      `fisherops.HeteroscedasticGaussian()`).
    - `optimizer`: an optax `GradientTransformation` (default
      `optax.adam(1e-3)`). Needs optax: `pip install "fisherops[marglik]"`.
    - `num_steps`: optax steps in all.
    - `batch_size`: data points per step (default: all). Each epoch of
      `N // batch_size` steps goes through a fresh permutation of the data drawn
      from `key` (the last `N mod batch_size` points of each permutation are left
      out).
    - `key`: a `jax.random.key`, needed with `batch_size`.
    - `structure`: the curvature of the evidence: `"kfac"` (default,
      [`fisherops.KFACOperator`][], exact Kronecker log-determinants),
      `"ggn"` (the dense GGN, `lineax.materialise`d: a few thousand params at
      most), or a callable `structure(model_fn, params, data, likelihood)`
      returning a curvature operator.
    - `prior`: `"scalar"`, `"layerwise"` (default, one `λ` per params leaf) or
      `"diagonal"`.
    - `prior_precision`: the initial prior precision (a scalar, or what
      `PriorPrecision(params, ·)` accepts).
    - `tune_sigma`: tune the noise scale of a `fisherops.Gaussian` likelihood
      (scalar `σ`; `"mse"` starts from its `σ = 1/√2`) with the prior.
    - `hyper_every`: optax steps between tunings (default: one epoch).
    - `burn_in`: no tuning before this step.
    - `progress`: a tqdm progress bar over the steps (needs tqdm).

    **Returns:** a [`fisherops.MarglikResult`][].
    """
    params = _check_params(params)
    inputs, targets = _owned(_split_data(data))
    num_data = _leading(inputs, "input")
    if _leading(targets, "target") != num_data:
        raise ValueError(
            "data input and data target must have the same number of data points "
            f"(axis 0); got {num_data} and {_leading(targets, 'target')}."
        )
    if tune_sigma:
        raise NotImplementedError(
            "tune_sigma=True comes with the noise tuning of optimize_prior_precision."
        )
    likelihood = _likelihood(likelihood, tune_sigma)
    optimizer = _optimizer(optimizer)
    num_steps = _check_positive_int("num_steps", num_steps)
    prior = _check_method("prior", prior, ("scalar", "layerwise", "diagonal"))
    if batch_size is not None:
        batch_size = _check_positive_int("batch_size", batch_size)
        if batch_size > num_data:
            raise ValueError(
                f"batch_size must be at most the number of data points {num_data}; "
                f"got {batch_size}."
            )
        _check_key(key)
    steps_per_epoch = 1 if batch_size is None else num_data // batch_size
    hyper_every = steps_per_epoch if hyper_every is None else hyper_every
    hyper_every = _check_positive_int("hyper_every", hyper_every)
    if not (isinstance(burn_in, int | np.integer) and burn_in >= 0):
        raise ValueError(f"burn_in must be an int >= 0; got {burn_in!r}.")
    build = _structure(structure, vmap_over_data, chunk_size)
    key = jax.random.key(0) if key is None else key
    prior_precision = (
        prior_precision
        if isinstance(prior_precision, PriorPrecision)
        else PriorPrecision(params, prior_precision)
    )
    trainer = _Trainer(model_fn, optimizer, batch_size, vmap_over_data)

    state = optimizer.init(params)
    history: dict[str, list] = {
        "step": [],
        "loss": [],
        "log_evidence": [],
        "prior_precision": [],
    }
    if isinstance(likelihood, Gaussian):
        history["sigma"] = []
    bar = _progress_bar(progress, num_steps)
    step = 0
    try:
        while True:
            stop = _next_tuning(step, num_steps, hyper_every, burn_in)
            params, state, loss = trainer(
                params,
                state,
                jnp.asarray(step),
                jnp.asarray(stop - step),
                (inputs, targets),
                prior_precision.full_diagonal(),
                likelihood,
                key,
            )
            if bar is not None:
                bar.update(stop - step)
            step = stop
            curvature = build(model_fn, params, (inputs, targets), likelihood)
            log_likelihood = _data_log_likelihood(
                model_fn, vmap_over_data, params, (inputs, targets), likelihood
            )
            tuned = optimize_prior_precision(
                curvature,
                params,
                log_likelihood,
                prior=prior,
                init=prior_precision,
            )
            prior_precision = tuned.prior_precision
            history["step"].append(step)
            history["loss"].append(float(loss))
            history["log_evidence"].append(float(tuned.objective))
            history["prior_precision"].append(
                np.atleast_1d(
                    np.asarray(
                        jax.flatten_util.ravel_pytree(prior_precision.precision)[0]
                    )
                )
            )
            if "sigma" in history:
                history["sigma"].append(float(likelihood.sigma))
            if bar is not None:
                bar.set_postfix(
                    loss=f"{float(loss):.4g}", evidence=f"{float(tuned.objective):.6g}"
                )
            if step == num_steps:
                break
    finally:
        if bar is not None:
            bar.close()
    return MarglikResult(
        params,
        prior_precision,
        likelihood.sigma if isinstance(likelihood, Gaussian) else None,
        likelihood,
        curvature,
        {name: np.asarray(values) for name, values in history.items()},
    )


def _next_tuning(step: int, num_steps: int, every: int, burn_in: int) -> int:
    """The step after `step` at which to tune next: a multiple of `every` at or
    after `burn_in`, or the last step."""
    candidate = max(step + 1, burn_in)
    candidate = -(-candidate // every) * every
    return min(candidate, num_steps)


def _likelihood(likelihood, tune_sigma: bool) -> AbstractLikelihood:
    likelihood = as_likelihood(likelihood)
    if likelihood is None or not isinstance(likelihood, AbstractLikelihood):
        raise TypeError(
            "likelihood must be a loss name or a fisherops.AbstractLikelihood; got "
            f"{likelihood!r}."
        )
    if not tune_sigma:
        return likelihood
    if isinstance(likelihood, MSE):
        return Gaussian(jnp.sqrt(0.5))
    if isinstance(likelihood, Gaussian) and jnp.ndim(likelihood.sigma) == 0:
        return likelihood
    raise ValueError(
        "tune_sigma=True needs likelihood 'mse' or a fisherops.Gaussian with a "
        f"scalar sigma; got {likelihood!r}."
    )


_DEFAULT: list = []


def _optimizer(optimizer):
    if optimizer is None:
        try:
            import optax
        except ImportError as error:
            raise ImportError(
                "marglik_training's default optimizer is optax.adam: pip install "
                '"fisherops[marglik]" (or optax), or pass an optimizer.'
            ) from error
        if not _DEFAULT:  # one object, so that repeated calls compile nothing
            _DEFAULT.append(optax.adam(1e-3))
        return _DEFAULT[0]
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(
            "optimizer must be an optax GradientTransformation (with init and "
            f"update); got {type(optimizer).__name__}."
        )
    return optimizer


def _structure(structure, vmap_over_data: bool, chunk_size) -> Callable:
    """`build(model_fn, params, data, likelihood) -> curvature`."""
    common = {"vmap_over_data": vmap_over_data, "chunk_size": chunk_size}
    if callable(structure):
        return structure
    structure = _check_method("structure", structure, ("kfac", "ggn"))
    if structure == "kfac":
        return lambda *args: KFACOperator(*args, **common).decompose()
    return lambda *args: lx.materialise(GGNOperator(*args, **common))


def _progress_bar(progress: bool, total: int):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError(
            "progress=True needs tqdm: pip install tqdm (or fisherops[progress])."
        ) from error
    return tqdm(total=total, desc="marglik training")


@eqx.filter_jit
def _data_log_likelihood(model_fn, vmap_over_data, params, data, likelihood):
    inputs, targets = data
    outputs = batched_model(model_fn, vmap_over_data)(inputs, params)
    return _log_likelihood(likelihood, outputs, targets)


class _Trainer(eqx.Module):
    """`length` optax steps on `ℓ` from step `start`, in one compiled loop."""

    model_fn: ModelFn
    optimizer: Any
    batch_size: int | None = eqx.field(static=True)
    vmap_over_data: bool = eqx.field(static=True)

    @eqx.filter_jit
    def __call__(self, params, state, start, length, data, prior, likelihood, key):
        inputs, targets = data
        num_data = _leading(inputs, "input")
        model = batched_model(self.model_fn, self.vmap_over_data)
        targets = likelihood.prepare_targets(
            targets, jax.eval_shape(model, inputs, params)
        )

        def objective(params, batch):
            batch_inputs, batch_targets = batch
            outputs = model(batch_inputs, params)
            losses = jax.vmap(likelihood.loss)(outputs, batch_targets)
            penalty = sum(
                jnp.sum(lam * theta**2)
                for lam, theta in zip(
                    jtu.tree_leaves(prior), jtu.tree_leaves(params), strict=True
                )
            )
            return jnp.mean(losses) + penalty / (2 * num_data)

        def batch_at(step):
            if self.batch_size is None:
                return inputs, targets
            per_epoch = num_data // self.batch_size
            order = jax.random.permutation(
                jax.random.fold_in(key, step // per_epoch), num_data
            )
            indices = lax.dynamic_slice_in_dim(
                order, (step % per_epoch) * self.batch_size, self.batch_size
            )
            return jtu.tree_map(lambda leaf: leaf[indices], (inputs, targets))

        def body(i, carry):
            params, state, total = carry
            loss, grads = jax.value_and_grad(objective)(params, batch_at(start + i))
            updates, state = self.optimizer.update(grads, state, params)
            params = jtu.tree_map(lambda p, u: (p + u).astype(p.dtype), params, updates)
            return params, state, total + loss

        zero = jnp.zeros((), jnp.result_type(*jtu.tree_leaves(params)))
        params, state, total = lax.fori_loop(0, length, body, (params, state, zero))
        return params, state, total / length
