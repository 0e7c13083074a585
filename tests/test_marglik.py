"""marglik_training: optax steps on the negative log joint, hyperparameters at the
evidence optimum of the current curvature.

Checked: the returned hyperparameters are the evidence optimum at the returned
params (re-tuning there moves them by little), the training objective is the
negative log joint per datum written out by hand, a repeated call compiles
nothing, and the errors.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import counted_compilations

import fisherops as fo

RNG = np.random.default_rng(0)
INPUTS = jnp.asarray(RNG.uniform(-2, 2, size=(40, 1)))
TARGETS = jnp.sin(2 * INPUTS) + 0.2 * jnp.asarray(RNG.normal(size=(40, 1)))
DATA = (INPUTS, TARGETS)
PARAMS = {
    "w1": jnp.asarray(RNG.normal(size=(1, 8))),
    "b1": jnp.zeros(8),
    "w2": jnp.asarray(RNG.normal(size=(8, 1)) / np.sqrt(8)),
    "b2": jnp.zeros(1),
}
OPTIMIZER = optax.adam(1e-2)


def mlp(x, params):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def train(**kwargs):
    options = dict(num_steps=200, hyper_every=50, prior="layerwise")
    options.update(kwargs)
    return fo.marglik_training(
        mlp, PARAMS, DATA, fo.Gaussian(0.3), OPTIMIZER, **options
    )


def log_likelihood(params, sigma):
    residuals = jax.vmap(mlp, in_axes=(0, None))(INPUTS, params) - TARGETS
    return jnp.sum(
        -(residuals**2) / (2 * sigma**2) - 0.5 * jnp.log(2 * jnp.pi * sigma**2)
    )


@pytest.mark.parametrize("structure", ["ggn", "kfac"])
def test_hyperparameters_are_the_evidence_optimum_at_return(structure):
    result = train(structure=structure)
    assert result.history["step"].tolist() == [50, 100, 150, 200]
    assert np.all(np.isfinite(result.history["log_evidence"]))
    sigma = result.sigma
    assert float(sigma) == pytest.approx(0.3)
    # The curvature returned is the one at the returned params, and re-tuning
    # there from another start lands on the returned precisions.
    if structure == "ggn":
        fresh = fo.GGNOperator(mlp, result.params, DATA, fo.Gaussian(sigma))
        np.testing.assert_allclose(
            result.curvature.as_matrix(), fresh.as_matrix(), rtol=1e-10
        )
    retuned = fo.optimize_prior_precision(
        result.curvature,
        result.params,
        log_likelihood(result.params, sigma),
        prior="layerwise",
        init=3.0,
    )
    found = jax.flatten_util.ravel_pytree(result.prior_precision.precision)[0]
    again = jax.flatten_util.ravel_pytree(retuned.prior_precision.precision)[0]
    np.testing.assert_allclose(found, again, rtol=1e-5)
    np.testing.assert_allclose(
        result.history["log_evidence"][-1], retuned.objective, rtol=1e-8
    )


def test_objective_is_the_negative_log_joint_per_datum():
    """One full-batch SGD step of rate 1 moves the params by minus the gradient
    of `mean_n c_n + θᵀΛθ / (2N)`, and history's loss is that objective."""
    prior = fo.PriorPrecision(PARAMS, 2.5)
    result = fo.marglik_training(
        mlp,
        PARAMS,
        DATA,
        fo.Gaussian(0.3),
        optax.sgd(1.0),
        num_steps=1,
        prior_precision=prior,
    )

    def objective(params):
        penalty = sum(jnp.sum(p**2) for p in jax.tree.leaves(params))
        return -log_likelihood(params, 0.3) / 40 + 2.5 * penalty / 80

    # the constant of the log-likelihood does not move the params
    loss, grad = jax.value_and_grad(objective)(PARAMS)
    expected = jax.tree.map(lambda p, g: p - g, PARAMS, grad)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10),
        result.params,
        expected,
    )
    constant = 0.5 * jnp.log(2 * jnp.pi * 0.09)
    np.testing.assert_allclose(result.history["loss"][0], loss - constant, rtol=1e-10)


def test_repeated_call_compiles_nothing():
    train(num_steps=20, hyper_every=10, batch_size=20, key=jax.random.key(0))
    with counted_compilations() as compilations:
        train(num_steps=20, hyper_every=10, batch_size=20, key=jax.random.key(1))
    assert compilations == []


def test_bad_input(monkeypatch):
    with pytest.raises(ValueError, match="batch_size must be at most"):
        train(batch_size=41, key=jax.random.key(0))
    with pytest.raises(ValueError, match="key must be"):
        train(batch_size=10)
    with pytest.raises(ValueError, match="structure"):
        train(structure="dense")
    with pytest.raises(TypeError, match="optax GradientTransformation"):
        fo.marglik_training(mlp, PARAMS, DATA, "mse", object(), num_steps=1)
    monkeypatch.setitem(sys.modules, "optax", None)
    monkeypatch.setattr(fo._marglik, "_DEFAULT", [])
    with pytest.raises(ImportError, match=r"fisherops\[marglik\]"):
        fo.marglik_training(mlp, PARAMS, DATA, "mse", num_steps=1)
