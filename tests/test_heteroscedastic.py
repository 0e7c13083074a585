"""HeteroscedasticGaussian: a network predicting a mean and a variance per target.

References, float64, built the obvious way: per-datum Jacobians by `jax.jacfwd`,
the Fisher of `N(μ, e^s)` in `(μ, s)` written out as `diag(e^{-s}, 1/2)`, the
natural parametrisation's Hessian by `jax.hessian` of its loss, gradients by
`jax.grad` of the loss, the loss against `jax.scipy.stats.norm.logpdf`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import assert_close, jacobian
from jax.flatten_util import ravel_pytree

import fisherops as fo

RNG = np.random.default_rng(0)
N, D, H, M = 6, 2, 3, 2  # data, inputs, hidden units, targets per datum
INPUTS = jnp.asarray(RNG.normal(size=(N, D)))
TARGETS = jnp.asarray(RNG.normal(size=(N, M)))
PARAMS = {
    "w1": jnp.asarray(RNG.normal(size=(D, H))),
    "b1": jnp.asarray(RNG.normal(size=H)),
    "w2": jnp.asarray(0.5 * RNG.normal(size=(H, 2 * M))),
    "b2": jnp.asarray(0.5 * RNG.normal(size=2 * M)),
}


def model(parametrisation):
    """`(M, 2)` per datum; the natural parametrisation's η₂ through -softplus."""

    def model_fn(x, params):
        out = (jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]).reshape(M, 2)
        out = out + params["b2"].reshape(M, 2)
        if parametrisation == "natural":
            return jnp.stack([out[:, 0], -jax.nn.softplus(out[:, 1])], -1)
        return out

    return model_fn


@functools.cache
def dense(parametrisation, kind):
    """`sum_n J_n^T H_n J_n` (GGN) or `sum_n J_n^T g_n g_n^T J_n` (EF)."""
    model_fn = model(parametrisation)
    likelihood = fo.HeteroscedasticGaussian(parametrisation)
    total = 0.0
    for x, y in zip(INPUTS, TARGETS, strict=True):
        jac = jacobian(model_fn, PARAMS, x)  # (M, 2, P)
        jac = jac.reshape(2 * M, -1)
        out = model_fn(x, PARAMS)
        if kind == "ef":
            g = jax.grad(likelihood.loss)(out, y).reshape(-1)
            middle = jnp.outer(g, g)
        elif parametrisation == "log_variance":
            fisher = jnp.stack([jnp.exp(-out[:, 1]), jnp.full(M, 0.5)], -1)  # (M, 2)
            middle = jnp.diag(fisher.reshape(-1))
        else:
            middle = jax.hessian(likelihood.loss)(out, y).reshape(2 * M, 2 * M)
        total = total + jac.T @ middle @ jac
    return total


@pytest.mark.parametrize("parametrisation", ["log_variance", "natural"])
def test_ggn_and_ef_match_dense(parametrisation):
    likelihood = fo.HeteroscedasticGaussian(parametrisation)
    data = (INPUTS, TARGETS)
    model_fn = model(parametrisation)
    ggn = fo.GGNOperator(model_fn, PARAMS, data, likelihood)
    ef = fo.EmpiricalFisherOperator(model_fn, PARAMS, data, likelihood)
    assert_close(ggn.as_matrix(), dense(parametrisation, "ggn"))
    assert_close(ef.as_matrix(), dense(parametrisation, "ef"))
    flat, unravel = ravel_pytree(PARAMS)
    vector = jnp.asarray(RNG.normal(size=flat.size))
    assert_close(
        ravel_pytree(ggn.mv(unravel(vector)))[0], dense(parametrisation, "ggn") @ vector
    )


@pytest.mark.parametrize("parametrisation", ["log_variance", "natural"])
def test_mc_fisher_converges_to_the_ggn(parametrisation):
    """Draws `y ~ N(μ, σ²)`: with many samples the MC Fisher is the GGN; its error
    falls like `1/sqrt(M)` (checked between M and 16 M)."""
    likelihood = fo.HeteroscedasticGaussian(parametrisation)
    model_fn = model(parametrisation)
    expected = dense(parametrisation, "ggn")
    errors = []
    for samples in (250, 4000):
        mc = fo.MCFisherOperator(
            model_fn,
            PARAMS,
            (INPUTS, TARGETS),
            likelihood,
            jax.random.key(0),
            mc_samples=samples,
        )
        matrix = mc.as_matrix()
        errors.append(float(jnp.linalg.norm(matrix - expected)))
    scale = float(jnp.linalg.norm(expected))
    assert errors[1] < 0.05 * scale
    assert errors[1] < errors[0] / 2


@pytest.mark.parametrize("parametrisation", ["log_variance", "natural"])
def test_loss_is_the_gaussian_negative_log_density(parametrisation):
    likelihood = fo.HeteroscedasticGaussian(parametrisation)
    output = model(parametrisation)(INPUTS[0], PARAMS)
    mean, variance = likelihood.mean_variance(output)
    expected = -jnp.sum(
        jax.scipy.stats.norm.logpdf(TARGETS[0], mean, jnp.sqrt(variance))
    )
    actual = likelihood.loss(output, TARGETS[0]) + likelihood.log_normaliser(output)
    assert_close(actual, expected)
    if parametrisation == "log_variance":
        assert_close(variance, jnp.exp(output[:, 1]))


def test_kfac_of_one_datum_is_the_ggn():
    """KFAC is exact for one datum through one dense layer."""
    likelihood = fo.HeteroscedasticGaussian()
    params = {"w": PARAMS["w2"], "b": PARAMS["b2"][:2]}
    params["w"] = params["w"][:, :2]

    def linear(x, p):
        return x @ p["w"] + p["b"]

    data = (jnp.asarray(RNG.normal(size=(1, H))), TARGETS[:1, 0])
    kfac = fo.KFACOperator(linear, params, data, likelihood)
    ggn = fo.GGNOperator(linear, params, data, likelihood)
    assert_close(kfac.as_matrix(), ggn.as_matrix())


def test_bad_input():
    with pytest.raises(ValueError, match="parametrisation must be"):
        fo.HeteroscedasticGaussian("mean_std")
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\) per datum"):
        fo.GGNOperator(
            lambda x, p: x @ p,
            jnp.ones((2, 3)),
            (INPUTS, TARGETS[:, 0]),
            fo.HeteroscedasticGaussian(),
        )
    with pytest.raises(ValueError, match="HeteroscedasticGaussian"):
        fo.GGNOperator(
            model("log_variance"),
            PARAMS,
            (INPUTS, TARGETS[:, :1]),
            fo.HeteroscedasticGaussian(),
        )
