"""The Laplace posterior against dense float64 references.

The posterior is `N(θ*, P^{-1})` with `P = C + Λ`. Every test builds `P` the
obvious way (`dense_ggn` / `dense_ef` from per-datum `jax.jacfwd` Jacobians plus
the diagonal prior, in numpy) and checks solves, samples, the linearised
predictive (probit and Monte Carlo) and the errors against it.
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
    batched,
    counted_compilations,
    dense_ef,
    dense_ggn,
    dense_prior,
    flat,
    init_params,
    jacobian,
    make_data,
    mlp,
    per_datum,
    random_vector,
)

import fisherops as fo

jax.config.update("jax_enable_x64", True)

PARAMS = init_params()
NUM_PARAMS = flat(PARAMS).size  # 31
DATA = make_data("labels", n=20)
LOSS = "cross_entropy"
KEY = jax.random.key(0)

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
INPUTS = jnp.asarray(np.random.default_rng(7).normal(size=(6, 3)))


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


def dense_predictive(curvature_matrix, prior, inputs):
    """Means `f(x, θ*)` and output covariances `J P^{-1} J^T`, per input."""
    covariance = np.linalg.inv(dense_precision(curvature_matrix, prior))
    means = np.stack([np.asarray(mlp(x, PARAMS)) for x in inputs])
    jacobians = [np.asarray(jacobian(mlp, PARAMS, x)) for x in inputs]
    return means, np.stack([jac @ covariance @ jac.T for jac in jacobians])


# --------------------------------------------------------------------------
# construction
# --------------------------------------------------------------------------


def test_fields_and_defaults():
    operator, _ = curvature("ggn")
    posterior = fo.LaplacePosterior(operator, SCALAR_PRIOR)
    assert posterior.curvature is operator
    assert isinstance(posterior.prior_precision, fo.PriorPrecision)
    precision = jax.tree.leaves(posterior.prior_precision.precision)
    assert all(float(leaf) == SCALAR_PRIOR for leaf in precision)
    assert_close(flat(posterior.params), flat(PARAMS), rtol=0, atol=0)  # default
    assert posterior.cholesky is None
    mean = random_vector(PARAMS, seed=5)
    assert_close(
        flat(fo.LaplacePosterior(operator, SCALAR_PRIOR, mean).params), flat(mean)
    )
    # A linearised curvature has the params too.
    linearised = fo.LaplacePosterior(operator.linearise(), SCALAR_PRIOR)
    assert_close(flat(linearised.params), flat(PARAMS), rtol=0, atol=0)


# --------------------------------------------------------------------------
# solves
# --------------------------------------------------------------------------


def test_solve_every_way():
    operator, curvature_matrix = curvature("ggn")
    posterior = fo.LaplacePosterior(operator, DIAGONAL_PRIOR)
    precision = dense_precision(curvature_matrix, DIAGONAL_PRIOR)
    assert_close(posterior.precision.as_matrix(), precision)
    vector = random_vector(PARAMS)
    expected = np.linalg.solve(precision, flat(vector))
    factorised = posterior.factorise()
    assert_close(factorised.cholesky @ factorised.cholesky.T, precision)
    ways = {
        "auto (CG)": posterior.solve(vector),
        "cg, jacobi": posterior.solve(vector, preconditioner="jacobi"),
        "factorised": factorised.solve(vector),
        "lineax Cholesky": posterior.solve(vector, solver=lx.Cholesky()),
    }
    for name, solution in ways.items():
        assert_like_params(solution, PARAMS)
        tolerance = 1e-6 if "cg" in name.lower() else 1e-9
        assert_close(flat(solution), expected, rtol=tolerance, err_msg=name)


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


# Every curvature, both kinds of prior and both samplers (perturb-and-solve by
# CG, the held Cholesky factor), in three compilations.
@pytest.mark.parametrize(
    ("kind", "prior_kind", "factorised"),
    [("ef", "diagonal", False), ("mc", "scalar", False), ("ggn", "diagonal", True)],
)
def test_samples_are_the_posterior(kind, prior_kind, factorised):
    operator, curvature_matrix = curvature(kind)
    prior = PRIORS[prior_kind]
    mean = random_vector(PARAMS, seed=5)
    posterior = fo.LaplacePosterior(operator, prior, mean)
    if factorised:
        posterior = posterior.factorise()
    samples = posterior.sample(KEY, NUM_SAMPLES)
    # A function of the key: the same key, the same samples.
    assert_close(
        flat(posterior.sample(KEY, NUM_SAMPLES)), flat(samples), rtol=0, atol=0
    )

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
# predictive
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vmap_over_data", "solve_method"),
    [(True, "dense"), (False, "dense"), (True, "cg")],
)
def test_predictive_matches_dense(vmap_over_data, solve_method):
    """The model and its vmap mode come from the curvature: a batched model_fn
    (`vmap_over_data=False`) works as well as a per-datum one."""
    model = per_datum(mlp) if vmap_over_data else batched(mlp)
    operator = fo.GGNOperator(model, PARAMS, DATA, LOSS, vmap_over_data=vmap_over_data)
    _, curvature_matrix = curvature("ggn")
    posterior = fo.LaplacePosterior(operator, DIAGONAL_PRIOR)
    # chunk_size 4 does not divide the 6 inputs: the last chunk is padded.
    mean, variance = posterior.predictive(
        INPUTS, approximation="none", solve_method=solve_method, chunk_size=4
    )
    expected_mean, covariances = dense_predictive(
        curvature_matrix, DIAGONAL_PRIOR, INPUTS
    )
    expected_variance = np.diagonal(covariances, axis1=1, axis2=2)
    assert mean.shape == variance.shape == (6, 3)
    assert_close(mean, expected_mean)
    assert_close(variance, expected_variance, rtol=1e-6)
    probabilities = posterior.predictive(INPUTS, solve_method=solve_method)
    assert_close(probabilities, fo.probit(expected_mean, expected_variance), rtol=1e-6)


def test_predictive_reuses_the_held_factor():
    operator, curvature_matrix = curvature("ggn")
    factorised = fo.LaplacePosterior(operator, SCALAR_PRIOR).factorise()
    # The factor is what the predictive uses: replace it by a wrong one and the
    # variances follow it.
    doubled = eqx.tree_at(lambda p: p.cholesky, factorised, 2 * factorised.cholesky)
    _, variance = factorised.predictive(INPUTS, approximation="none")
    _, quartered = doubled.predictive(INPUTS, approximation="none")
    _, covariances = dense_predictive(curvature_matrix, SCALAR_PRIOR, INPUTS)
    assert_close(variance, np.diagonal(covariances, axis1=1, axis2=2))
    assert_close(quartered, variance / 4)


def mc_reference(means, covariances, num_draws=400_000, seed=0):
    """`E[softmax(f)]`, `f ~ N(mean, covariance)` per input, by numpy draws."""
    rng = np.random.default_rng(seed)
    result = []
    for mean, covariance in zip(means, covariances, strict=True):
        logits = rng.multivariate_normal(mean, covariance, size=num_draws)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        result.append(np.mean(exp / exp.sum(axis=1, keepdims=True), axis=0))
    return np.stack(result)


def test_mc_predictive_converges_to_the_glm_predictive():
    """The MC predictive is the GLM predictive `E[softmax(f + J δ)]` up to
    `O(1/sqrt(S))`; probit approximates the same number, within a few percent."""
    operator, curvature_matrix = curvature("ggn")
    prior = 0.05  # a wide posterior: logit variances of order 1 and more
    posterior = fo.LaplacePosterior(operator, prior).factorise()
    means, covariances = dense_predictive(curvature_matrix, prior, INPUTS)
    assert np.max(np.diagonal(covariances, axis1=1, axis2=2)) > 1
    expected = mc_reference(means, covariances)

    probabilities = posterior.predictive(
        INPUTS, approximation="mc", key=KEY, num_samples=3000
    )
    assert probabilities.shape == (6, 3)
    assert_close(probabilities.sum(axis=1), np.ones(6))
    assert np.max(np.abs(probabilities - expected)) < 0.02
    # ... where the MAP's own probabilities, which ignore the variances, are not.
    assert np.max(np.abs(jax.nn.softmax(means) - expected)) > 0.1
    # Probit sees only the variances, through an approximation of the link: at
    # these variances it is off by a few hundredths.
    probit = posterior.predictive(INPUTS)
    assert np.max(np.abs(probit - expected)) < 0.1


def test_probit():
    mean = jnp.asarray([[1.0, -0.5, 2.0], [0.0, 3.0, -1.0]])
    variance = jnp.asarray([[0.5, 2.0, 0.1], [4.0, 0.0, 1.0]])
    kappa = 1 / np.sqrt(1 + np.pi / 8 * np.asarray(variance))
    logits = np.asarray(mean) * kappa
    softmax = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    assert_close(fo.probit(mean, variance), softmax)
    assert_close(fo.probit(mean, variance, "sigmoid"), 1 / (1 + np.exp(-logits)))
    assert_close(fo.probit(mean, jnp.zeros_like(mean)), jax.nn.softmax(mean))
    with pytest.raises(ValueError, match="logit_variance must be non-negative"):
        fo.probit(mean, variance.at[0, 1].set(-0.1))
    with pytest.raises(ValueError, match="same shape"):
        fo.probit(mean, variance[0])
    with pytest.raises(ValueError, match="link"):
        fo.probit(mean, variance, "tanh")


# --------------------------------------------------------------------------
# compiled once
# --------------------------------------------------------------------------


METHODS = {
    "solve": lambda post, vector, key: post.solve(vector),
    "solve dense": lambda post, vector, key: post.solve(vector, solve_method="dense"),
    "sample": lambda post, vector, key: post.sample(key, 3),
    "factorise": lambda post, vector, key: post.factorise(),
    "factorised sample": lambda post, vector, key: post.factorise().sample(key, 3),
    "predictive": lambda post, vector, key: post.predictive(INPUTS),
    "predictive mc": lambda post, vector, key: post.predictive(
        INPUTS, approximation="mc", key=key, num_samples=4
    ),
    "logdet": lambda post, vector, key: post.logdet(),
    "log_marginal_likelihood": lambda post, vector, key: post.log_marginal_likelihood(
        -1.0
    ),
    "probit": lambda post, vector, key: fo.probit(flat(vector)[:3], flat(vector)[3:6]),
}


def test_repeated_eager_calls_compile_once():
    """Three eager calls of each method, each on a new posterior from new params,
    data, prior and vector of the same shapes: only the first compiles."""
    inputs, targets = DATA
    counts = {}
    for name, method in METHODS.items():
        counts[name] = []
        for call in range(3):
            params = jax.tree.map(functools.partial(jnp.add, 0.1 * call), PARAMS)
            data = (inputs + call, (targets + call) % 3)
            operator = fo.GGNOperator(mlp, params, data, LOSS)
            posterior = fo.LaplacePosterior(operator, 0.5 + call)
            vector = jax.tree.map(jnp.abs, random_vector(PARAMS, seed=call))
            with counted_compilations() as compilations:
                jax.block_until_ready(method(posterior, vector, jax.random.key(call)))
            counts[name].append(len(compilations))
    assert all(later == [0, 0] for _, *later in counts.values()), counts


# --------------------------------------------------------------------------
# KFAC
# --------------------------------------------------------------------------


def test_kfac_curvature():
    """A layerwise prior: solves and the predictive by the exact Kronecker
    inverse. A prior that varies within a layer: CG on `K + Λ`, preconditioned by
    KFAC's nearby inverse. Both against the dense `K + Λ`."""
    kfac = fo.KFACOperator(mlp, PARAMS, DATA, LOSS).decompose()
    matrix = np.asarray(kfac.as_matrix())
    layerwise = jax.tree.unflatten(jax.tree.structure(PARAMS), [0.3, 2.0, 1.1, 0.5])
    vector = random_vector(PARAMS)
    for prior in (layerwise, DIAGONAL_PRIOR):
        posterior = fo.LaplacePosterior(kfac, prior)
        expected = np.linalg.solve(matrix + dense_prior(PARAMS, prior), flat(vector))
        tolerance = 1e-9 if prior is layerwise else 1e-6
        assert_close(flat(posterior.solve(vector)), expected, rtol=tolerance)
    posterior = fo.LaplacePosterior(kfac, layerwise)
    _, variance = posterior.predictive(INPUTS, approximation="none")
    _, covariances = dense_predictive(matrix, layerwise, INPUTS)
    assert_close(variance, np.diagonal(covariances, axis1=1, axis2=2))


# --------------------------------------------------------------------------
# float32 CG on a trained network
# --------------------------------------------------------------------------


def trained_classifier(dtype):
    """A tanh MLP 8-16-4 trained by 300 Adam steps on synthetic data (N = 600),
    weight decay w = 1e-5 (the documented prior `λ = N w`)."""
    import optax

    rng = np.random.default_rng(0)
    num_data, weight_decay = 600, 1e-5
    centres = rng.normal(size=(4, 8))
    labels = rng.integers(0, 4, num_data)
    inputs = centres[labels] + 0.8 * rng.normal(size=(num_data, 8))
    params = {
        "w1": rng.normal(size=(8, 16)) / math.sqrt(8),
        "b1": np.zeros(16),
        "w2": rng.normal(size=(16, 4)) / 4,
        "b2": np.zeros(4),
    }
    params = jax.tree.map(lambda leaf: jnp.asarray(leaf, dtype), params)
    inputs, labels = jnp.asarray(inputs, dtype), jnp.asarray(labels)

    def model(x, params):
        return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]

    def loss(params):
        logits = jax.vmap(model, in_axes=(0, None))(inputs, params)
        data = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()
        squares = sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(params))
        return data + 0.5 * num_data * weight_decay * squares

    optimiser = optax.adam(1e-2)

    @jax.jit
    def train(params):
        def step(state, _):
            params, opt_state = state
            updates, opt_state = optimiser.update(jax.grad(loss)(params), opt_state)
            return (optax.apply_updates(params, updates), opt_state), None

        state = (params, optimiser.init(params))
        return jax.lax.scan(step, state, length=300)[0][0]

    return model, train(params), (inputs, labels), num_data * weight_decay


def test_float32_cg_converges_on_a_trained_network():
    """The defaults (CG, tolerances from float32's eps, the step cap) converge
    on a trained network's posterior with the documented prior, and agree with
    the float64 dense solution to float32 accuracy."""
    model, params, data, prior = trained_classifier(jnp.float32)
    operator = fo.GGNOperator(model, params, data, LOSS)
    posterior = fo.LaplacePosterior(operator, prior)
    params64 = jax.tree.map(lambda leaf: leaf.astype(jnp.float64), params)
    data64 = (data[0].astype(jnp.float64), data[1])
    matrix = np.asarray(dense_ggn(model, params64, data64, LOSS))
    precision = matrix + prior * np.eye(len(matrix))
    eigenvalues = np.linalg.eigvalsh(precision)
    assert (
        eigenvalues[-1] / eigenvalues[0] > 1e4
    )  # ill-conditioned, as trained nets are

    vector = jax.tree.map(jnp.ones_like, params)
    solution = posterior.solve(vector)
    assert_like_params(solution, params)
    expected = np.linalg.solve(precision, flat(vector).astype(np.float64))
    error = np.linalg.norm(flat(solution) - expected) / np.linalg.norm(expected)
    assert error < 1e-3
    samples = posterior.sample(KEY, 2)
    assert np.all(np.isfinite(flat(samples)))
    # The predictive by CG: many right-hand sides (here 5 inputs x 4 outputs).
    inputs = data[0][:5]
    _, variance = posterior.predictive(inputs, approximation="none", solve_method="cg")
    jacobians = [
        np.asarray(jacobian(model, params64, x.astype(jnp.float64))) for x in inputs
    ]
    covariance = np.linalg.inv(precision)
    expected = np.stack([np.diag(jac @ covariance @ jac.T) for jac in jacobians])
    assert_close(variance, expected, rtol=1e-2, atol=0)


# --------------------------------------------------------------------------
# never a silent wrong number; bad input
# --------------------------------------------------------------------------


def nan_posterior():
    """A posterior whose curvature is NaN, as one NaN weight makes it."""
    operator, _ = curvature("ggn")
    nan = eqx.tree_at(lambda op: op.scale, operator, jnp.asarray(jnp.nan))
    return fo.LaplacePosterior(nan, SCALAR_PRIOR)


def test_a_failed_solve_raises_never_zeros_or_the_mean():
    posterior = nan_posterior()
    vector = random_vector(PARAMS)
    for solve_method in ("cg", "dense"):
        with pytest.raises(FloatingPointError, match="solve produced non-finite"):
            posterior.solve(vector, solve_method=solve_method)
    with pytest.raises(FloatingPointError, match="sample produced non-finite"):
        posterior.sample(KEY, 2)
    with pytest.raises(FloatingPointError, match="Cholesky factorisation of P"):
        posterior.factorise()
    # Under jit, the same check is an eqx.error_if.
    with pytest.raises(Exception, match="non-finite"):
        eqx.filter_jit(lambda p, v: p.solve(v))(posterior, vector)

    operator, _ = curvature("ggn")
    posterior = fo.LaplacePosterior(operator, SCALAR_PRIOR)
    with pytest.raises(
        RuntimeError,
        match=r"did not converge \(stopped after 2 steps, relative residual",
    ):
        posterior.solve(vector, solver=lx.CG(rtol=1e-12, atol=1e-12, max_steps=2))


def test_bad_input_is_a_clear_error():
    operator, _ = curvature("ggn")
    posterior = fo.LaplacePosterior(operator, SCALAR_PRIOR)
    wrong = {"w": jnp.zeros(3)}
    with pytest.raises(ValueError, match="params must have the curvature's params"):
        fo.LaplacePosterior(operator, SCALAR_PRIOR, wrong)
    with pytest.raises(ValueError, match="params must have the curvature's params"):
        fo.LaplacePosterior(
            operator,
            SCALAR_PRIOR,
            jax.tree.map(lambda x: x.astype(jnp.float32), PARAMS),
        )
    with pytest.raises(ValueError, match="prior_precision must have"):
        fo.LaplacePosterior(operator, fo.PriorPrecision(wrong, 1.0))
    with pytest.raises(ValueError, match="prior_precision must be positive"):
        fo.LaplacePosterior(operator, 0.0)
    with pytest.raises(TypeError, match="curvature must be a lineax operator"):
        fo.LaplacePosterior(np.eye(NUM_PARAMS), SCALAR_PRIOR, PARAMS)
    untagged = lx.MatrixLinearOperator(jnp.eye(NUM_PARAMS))
    with pytest.raises(ValueError, match="curvature must be symmetric positive"):
        fo.LaplacePosterior(untagged, SCALAR_PRIOR, PARAMS)
    half = jax.tree.map(lambda x: x.astype(jnp.float16), PARAMS)
    with pytest.raises(TypeError, match="needs float32 or float64 params; got float16"):
        fo.LaplacePosterior(fo.GGNOperator(mlp, half, DATA, LOSS), SCALAR_PRIOR)
    with pytest.raises(ValueError, match="num_samples must be an int >= 1"):
        posterior.sample(KEY, 0)
    with pytest.raises(ValueError, match="key must be"):
        posterior.sample(None, 3)
    with pytest.raises(ValueError, match="solve_method must be one of"):
        posterior.solve(PARAMS, solve_method="lu")
    with pytest.raises(ValueError, match="preconditioner must be one of"):
        posterior.solve(PARAMS, preconditioner="ilu")
    with pytest.raises(ValueError, match="vector must have the curvature's params"):
        posterior.solve(wrong)
    with pytest.raises(ValueError, match="inputs must be arrays with one leading"):
        posterior.predictive(jnp.asarray(1.0))
    with pytest.raises(ValueError, match="approximation must be one of"):
        posterior.predictive(INPUTS, approximation="laplace")
    with pytest.raises(ValueError, match="key must be"):
        posterior.predictive(INPUTS, approximation="mc")
    regression = fo.LaplacePosterior(
        fo.GGNOperator(mlp, PARAMS, make_data("vector", n=20), "mse"), SCALAR_PRIOR
    )
    with pytest.raises(ValueError, match="link must be given"):
        regression.predictive(INPUTS)
    generic = fo.LaplacePosterior(
        lx.FunctionLinearOperator(
            operator.mv,
            operator.in_structure(),
            (lx.symmetric_tag, lx.positive_semidefinite_tag),
        ),
        SCALAR_PRIOR,
        PARAMS,
    )
    with pytest.raises(TypeError, match="predictive needs the curvature's model"):
        generic.predictive(INPUTS)
    with pytest.raises(TypeError, match="sample with CG needs a curvature with a"):
        generic.sample(KEY, 2, solve_method="cg")
