"""The Laplace workflow against dense float64 references.

The posterior is `N(θ*, P^{-1})` with `P = C + Λ`. Every test builds `P` the
obvious way (`dense_ggn` / `dense_ef` from per-datum `jax.jacfwd` Jacobians plus
the diagonal prior) and checks samples, log-determinants, the evidence and its
gradient, the linearised predictive and the prior precision search against it.
"""

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from _reference import (
    assert_close,
    assert_like_params,
    dense_ef,
    dense_ggn,
    dense_prior,
    flat,
    init_params,
    jacobian,
    make_data,
    mlp,
    model_for,
    random_vector,
)

import fisherops as fo

jax.config.update("jax_enable_x64", True)

PARAMS = init_params()
NUM_PARAMS = flat(PARAMS).size  # 31
DATA = make_data("labels", n=20)
LOSS = "cross_entropy"
KEY = jax.random.key(0)
LOG_LIKELIHOOD = -7.5  # any number: the evidence is linear in it

SCALAR_PRIOR = 0.25
# A full diagonal, far from the identity so that a prior square root that went
# missing shows.
DIAGONAL_PRIOR = jax.tree.map(
    lambda leaf: jnp.asarray(
        np.random.default_rng(leaf.size).uniform(0.1, 0.6, leaf.shape)
    ),
    PARAMS,
)
PRIORS = {"scalar": SCALAR_PRIOR, "diagonal": DIAGONAL_PRIOR}


@functools.cache
def curvature(kind):
    """The operator under test and its dense float64 reference."""
    if kind == "ef":
        operator = fo.EmpiricalFisherOperator(mlp, PARAMS, DATA, LOSS)
        return operator, np.asarray(dense_ef(mlp, PARAMS, DATA, LOSS))
    if kind == "ggn":
        operator = fo.GGNOperator(mlp, PARAMS, DATA, LOSS)
        return operator, np.asarray(dense_ggn(mlp, PARAMS, DATA, LOSS))
    # The MC Fisher for one key is one fixed matrix; test_mc.py checks its
    # as_matrix() against the dense reference.
    operator = fo.MCFisherOperator(mlp, PARAMS, DATA, LOSS, KEY, mc_samples=2)
    return operator, np.asarray(operator.as_matrix())


def dense_precision(curvature_matrix, prior):
    return curvature_matrix + dense_prior(PARAMS, prior)


# --------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------

NUM_SAMPLES = 4000
# For S samples of a P-dimensional Gaussian whitened by the true covariance, the
# sample covariance W has |W - I|_2 ≈ 2 sqrt(P/S) ≈ 0.18 (P = 31, S = 4000).
# The wrong covariances below are at least 0.6 away; each test asserts it.
COVARIANCE_TOLERANCE = 0.3


def whitened_deviation(samples, mean, covariance):
    """`|L^{-1} S L^{-T} - I|_2` and the whitened mean error, `L L^T = covariance`."""
    factor = np.linalg.cholesky(covariance)
    centred = np.linalg.solve(factor, (samples - mean).T)  # (P, S)
    second_moment = centred @ centred.T / centred.shape[1]
    deviation = np.linalg.norm(second_moment - np.eye(len(mean)), ord=2)
    return deviation, np.mean(centred, axis=1)


# Every curvature and both kinds of prior, in three compilations (each costs
# seconds on a CPU) rather than six.
@pytest.mark.parametrize(
    ("kind", "prior_kind"), [("ef", "diagonal"), ("mc", "scalar"), ("ggn", "diagonal")]
)
def test_samples_are_the_posterior(kind, prior_kind):
    operator, curvature_matrix = curvature(kind)
    prior = PRIORS[prior_kind]
    mean = random_vector(PARAMS, seed=5)
    posterior = fo.LaplacePosterior(operator, prior, mean)
    draw = eqx.filter_jit(lambda posterior, key: posterior.sample(key, NUM_SAMPLES))
    samples = draw(posterior, KEY)
    # A function of the key: the same key, the same samples.
    assert_close(flat(draw(posterior, KEY)), flat(samples), rtol=0, atol=0)

    assert_like_params(jax.tree.map(lambda leaf: leaf[0], samples), PARAMS)
    assert all(leaf.shape[0] == NUM_SAMPLES for leaf in jax.tree.leaves(samples))
    flat_samples = np.asarray(
        jax.vmap(lambda s: jax.flatten_util.ravel_pytree(s)[0])(samples)
    )

    precision = dense_precision(curvature_matrix, prior)
    covariance = np.linalg.inv(precision)
    deviation, mean_error = whitened_deviation(flat_samples, flat(mean), covariance)
    assert deviation < COVARIANCE_TOLERANCE
    # Each whitened coordinate of the sample mean is N(0, 1/S).
    assert np.max(np.abs(mean_error)) * math.sqrt(NUM_SAMPLES) < 4.5

    # What a sampler that dropped the prior's square root, or doubled the
    # curvature factor, or ignored the curvature would give. They must fail.
    prior_matrix = dense_prior(PARAMS, prior)
    wrong = {
        "prior sqrt missing": covariance
        @ (np.eye(NUM_PARAMS) + curvature_matrix)
        @ covariance,
        "curvature factor x2": covariance
        @ (prior_matrix + 4 * curvature_matrix)
        @ covariance,
        "prior only": np.linalg.inv(prior_matrix),
    }
    for name, wrong_covariance in wrong.items():
        wrong_deviation, _ = whitened_deviation(
            flat_samples, flat(mean), wrong_covariance
        )
        assert wrong_deviation > 2 * COVARIANCE_TOLERANCE, name


# --------------------------------------------------------------------------
# solves and log-determinants
# --------------------------------------------------------------------------


def test_precision_and_solve():
    operator, curvature_matrix = curvature("ggn")
    prior = DIAGONAL_PRIOR
    posterior = fo.LaplacePosterior(operator, prior, PARAMS)
    precision = dense_precision(curvature_matrix, prior)
    assert_close(posterior.precision.as_matrix(), precision)
    vector = random_vector(PARAMS)
    expected = np.linalg.solve(precision, flat(vector))
    assert_close(flat(posterior.solve(vector)), expected, rtol=1e-6)
    assert_close(flat(posterior.solve(vector, lx.Cholesky())), expected, rtol=1e-9)


@pytest.mark.parametrize("prior_kind", ["scalar", "diagonal"])
@pytest.mark.parametrize("kind", ["ef", "ggn"])
def test_dense_logdet(kind, prior_kind):
    operator, curvature_matrix = curvature(kind)
    prior = PRIORS[prior_kind]
    posterior = fo.LaplacePosterior(operator, prior, PARAMS)
    _, expected = np.linalg.slogdet(dense_precision(curvature_matrix, prior))
    assert_close(posterior.logdet("dense"), expected)
    assert_close(posterior.logdet(), expected)  # "auto" is dense for small P


def _wide_mlp(x, params):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def test_slq_logdet_within_one_percent_on_two_thousand_params():
    rng = np.random.default_rng(0)
    d_in, hidden, n_out, n = 20, 64, 10, 150
    params = {
        "w1": jnp.asarray(rng.normal(size=(d_in, hidden)) / math.sqrt(d_in)),
        "b1": jnp.zeros(hidden),
        "w2": jnp.asarray(rng.normal(size=(hidden, n_out)) / math.sqrt(hidden)),
        "b2": jnp.zeros(n_out),
    }
    data = (
        jnp.asarray(rng.normal(size=(n, d_in))),
        jnp.asarray(rng.integers(0, n_out, n)),
    )
    operator = fo.GGNOperator(_wide_mlp, params, data, LOSS)
    assert flat(params).size == 1994
    dense_matrix = np.asarray(operator.as_matrix())

    def logdets(precision):
        posterior = fo.LaplacePosterior(operator, precision, params)
        return posterior.logdet("slq", key=KEY, num_probes=32, num_lanczos_steps=48)

    precision = 1.0
    slq, slq_grad = jax.value_and_grad(logdets)(precision)
    exact_precision = dense_matrix + precision * np.eye(dense_matrix.shape[0])
    _, exact = np.linalg.slogdet(exact_precision)
    # d/dλ log det(C + λ I) = tr (C + λ I)^{-1}
    exact_grad = np.trace(np.linalg.inv(exact_precision))
    assert abs(slq - exact) < 0.01 * abs(exact)
    assert abs(slq_grad - exact_grad) < 0.01 * abs(exact_grad)


# --------------------------------------------------------------------------
# evidence
# --------------------------------------------------------------------------


def dense_evidence(curvature_matrix, mean, prior_diagonal, log_likelihood):
    """log p(D|θ*) + log N(θ*; 0, Λ^{-1}) - 1/2 log det(P / 2π), all dense."""
    prior_matrix = jnp.diag(prior_diagonal)
    log_prior = jax.scipy.stats.multivariate_normal.logpdf(
        mean, jnp.zeros_like(mean), jnp.linalg.inv(prior_matrix)
    )
    _, logdet = jnp.linalg.slogdet((curvature_matrix + prior_matrix) / (2 * jnp.pi))
    return log_likelihood + log_prior - 0.5 * logdet


def _per_leaf(values):
    return jax.tree.unflatten(jax.tree.structure(PARAMS), list(values))


def _flat_diagonal(per_leaf_precision):
    full = jax.tree.map(
        lambda leaf, lam: jnp.broadcast_to(lam, leaf.shape), PARAMS, per_leaf_precision
    )
    return jax.flatten_util.ravel_pytree(full)[0]


@pytest.mark.parametrize("layerwise", [False, True], ids=["scalar", "layerwise"])
@pytest.mark.parametrize("kind", ["ef", "ggn"])
def test_log_marginal_likelihood_and_its_gradient(kind, layerwise):
    operator, curvature_matrix = curvature(kind)
    mean = random_vector(PARAMS, seed=6)
    precision = jnp.asarray([0.3, 0.7, 1.5, 0.2]) if layerwise else jnp.asarray(0.4)

    def ours(precision):
        prior = _per_leaf(precision) if layerwise else precision
        posterior = fo.LaplacePosterior(operator, prior, mean)
        return posterior.log_marginal_likelihood(LOG_LIKELIHOOD)

    flat_mean = flat(mean)

    def reference(precision):
        per_leaf = _per_leaf(precision) if layerwise else _per_leaf([precision] * 4)
        return dense_evidence(
            curvature_matrix, flat_mean, _flat_diagonal(per_leaf), LOG_LIKELIHOOD
        )

    value, grad = jax.value_and_grad(ours)(precision)
    expected, expected_grad = jax.value_and_grad(reference)(precision)
    assert_close(value, expected)
    assert_close(grad, expected_grad, rtol=1e-8)


# --------------------------------------------------------------------------
# predictive
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vmap_over_data", "method"), [(True, "dense"), (False, "dense"), (True, "cg")]
)
def test_predictive_matches_dense(vmap_over_data, method):
    operator, curvature_matrix = curvature("ggn")
    posterior = fo.LaplacePosterior(operator, DIAGONAL_PRIOR, PARAMS)
    inputs = jnp.asarray(np.random.default_rng(7).normal(size=(6, 3)))
    mean, variance = posterior.predictive(
        model_for(vmap_over_data),
        inputs,
        vmap_over_data=vmap_over_data,
        method=method,
        batch_size=3,
    )

    covariance = np.linalg.inv(dense_precision(curvature_matrix, DIAGONAL_PRIOR))
    expected_mean = np.stack([mlp(x, PARAMS) for x in inputs])
    expected_variance = np.stack(
        [
            np.diag(jac @ covariance @ jac.T)
            for jac in (jacobian(mlp, PARAMS, x) for x in inputs)
        ]
    )
    assert mean.shape == variance.shape == (6, 3)
    assert_close(mean, expected_mean)
    assert_close(variance, expected_variance, rtol=1e-6)


def test_probit():
    mean = jnp.asarray([[1.0, -0.5, 2.0], [0.0, 3.0, -1.0]])
    variance = jnp.asarray([[0.5, 2.0, 0.1], [4.0, 0.0, 1.0]])
    kappa = 1 / np.sqrt(1 + np.pi / 8 * np.asarray(variance))
    logits = np.asarray(mean) * kappa
    softmax = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    assert_close(fo.probit(mean, variance), softmax)
    assert_close(fo.probit(mean, variance, "sigmoid"), 1 / (1 + np.exp(-logits)))
    assert_close(fo.probit(mean, jnp.zeros_like(mean)), jax.nn.softmax(mean))


# --------------------------------------------------------------------------
# prior precision
# --------------------------------------------------------------------------

GRID = jnp.logspace(-3, 3, 601)  # neighbours differ by 2.3%


@jax.jit
def _dense_scalar_evidences(curvature_matrix, mean):
    """The dense evidence at every λ of GRID, `Λ = λ I`."""

    def evidence(precision):
        diagonal = precision * jnp.ones(NUM_PARAMS)
        return dense_evidence(curvature_matrix, mean, diagonal, LOG_LIKELIHOOD)

    return jax.vmap(evidence)(GRID)


@pytest.mark.parametrize("kind", ["ef", "ggn"])
def test_optimize_prior_precision_finds_the_dense_optimum(kind):
    operator, curvature_matrix = curvature(kind)
    mean = PARAMS
    values = _dense_scalar_evidences(curvature_matrix, flat(mean))
    best = float(GRID[jnp.argmax(values)])
    assert 1e-2 < best < 1e2  # an interior optimum

    found = fo.optimize_prior_precision(operator, mean, LOG_LIKELIHOOD, init=1.0)
    assert isinstance(found, fo.PriorPrecision)
    lam = float(jax.tree.leaves(found.precision)[0])
    assert all(float(leaf) == lam for leaf in jax.tree.leaves(found.precision))
    assert abs(math.log(lam / best)) < 0.03

    gridded = fo.optimize_prior_precision(
        operator, mean, LOG_LIKELIHOOD, method="grid", grid=GRID, progress=True
    )
    assert float(jax.tree.leaves(gridded.precision)[0]) == pytest.approx(best)


def test_optimize_layerwise_prior_precision_is_a_stationary_point():
    operator, curvature_matrix = curvature("ggn")
    mean = random_vector(PARAMS, seed=8)
    found = fo.optimize_prior_precision(
        operator, mean, layerwise=True, num_steps=200, learning_rate=0.2
    )
    per_leaf = jnp.stack(jax.tree.leaves(found.precision))
    assert per_leaf.shape == (4,)
    assert not np.allclose(per_leaf, per_leaf[0])  # genuinely one per leaf

    flat_mean = flat(mean)

    def evidence(log_precision):
        diagonal = _flat_diagonal(_per_leaf(jnp.exp(log_precision)))
        return dense_evidence(curvature_matrix, flat_mean, diagonal, LOG_LIKELIHOOD)

    gradient = jax.grad(evidence)(jnp.log(per_leaf))
    # At the optimum, d evidence / d log λ_l = 0; at λ_l / 2 it is of order P_l.
    assert np.max(np.abs(gradient)) < 1e-3
    scalar = fo.optimize_prior_precision(operator, mean)
    scalar_log = math.log(float(jax.tree.leaves(scalar.precision)[0]))
    assert evidence(jnp.log(per_leaf)) > evidence(jnp.full(4, scalar_log))


def test_optimize_prior_precision_by_slq():
    operator, curvature_matrix = curvature("ggn")
    mean = PARAMS
    values = _dense_scalar_evidences(curvature_matrix, flat(mean))
    best = float(GRID[jnp.argmax(values)])
    found = fo.optimize_prior_precision(
        operator,
        mean,
        logdet_method="slq",
        key=KEY,
        num_probes=256,
        num_lanczos_steps=NUM_PARAMS,
    )
    lam = float(jax.tree.leaves(found.precision)[0])
    assert abs(math.log(lam / best)) < 0.1


# --------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------


def test_bad_input_is_a_clear_error():
    operator, _ = curvature("ggn")
    posterior = fo.LaplacePosterior(operator, SCALAR_PRIOR, PARAMS)
    wrong_mean = {"w": jnp.zeros(3)}
    with pytest.raises(ValueError, match="mean"):
        fo.LaplacePosterior(operator, SCALAR_PRIOR, wrong_mean)
    with pytest.raises(ValueError, match="mean"):
        fo.LaplacePosterior(
            operator,
            SCALAR_PRIOR,
            jax.tree.map(lambda x: x.astype(jnp.float32), PARAMS),
        )
    with pytest.raises(ValueError, match="prior"):
        fo.LaplacePosterior(operator, fo.PriorPrecision(wrong_mean, 1.0), PARAMS)
    with pytest.raises(TypeError, match="curvature"):
        fo.LaplacePosterior(np.eye(NUM_PARAMS), SCALAR_PRIOR, PARAMS)
    untagged = lx.MatrixLinearOperator(jnp.eye(NUM_PARAMS))
    with pytest.raises(ValueError, match="curvature"):
        fo.LaplacePosterior(untagged, SCALAR_PRIOR, PARAMS)
    with pytest.raises(ValueError, match="num_samples"):
        posterior.sample(KEY, 0)
    with pytest.raises(ValueError, match="key"):
        posterior.sample(None, 3)
    scaled = fo.LaplacePosterior(fo.scale(operator, 2.0), SCALAR_PRIOR, PARAMS)
    with pytest.raises(TypeError, match="square-root factor"):
        scaled.sample(KEY, 3)
    with pytest.raises(ValueError, match="method"):
        posterior.logdet("cholesky")
    with pytest.raises(ValueError, match="num_probes"):
        posterior.logdet("slq", num_probes=0)
    with pytest.raises(ValueError, match="log_likelihood"):
        posterior.log_marginal_likelihood(jnp.ones(3))
    with pytest.raises(ValueError, match="vector"):
        posterior.solve(wrong_mean)
    with pytest.raises(ValueError, match="inputs"):
        posterior.predictive(mlp, jnp.asarray(1.0))
    with pytest.raises(ValueError, match="link"):
        fo.probit(jnp.zeros(3), jnp.zeros(3), "tanh")
    with pytest.raises(ValueError, match="init"):
        fo.optimize_prior_precision(operator, PARAMS, init=-1.0)
    with pytest.raises(ValueError, match="grid"):
        fo.optimize_prior_precision(operator, PARAMS, method="grid", layerwise=True)
    with pytest.raises(ValueError, match="grid"):
        fo.optimize_prior_precision(operator, PARAMS, method="grid", grid=[1.0, -1.0])
    with pytest.raises(ValueError, match="method"):
        fo.optimize_prior_precision(operator, PARAMS, method="newton")
