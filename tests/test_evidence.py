"""The Laplace evidence and prior-precision tuning against dense references.

The reference evidence is written out in numpy:
`log p(D|θ*) - 1/2 θ*^T Λ θ* + 1/2 log det Λ - 1/2 log det(C + Λ)`, with `C` the
dense GGN / empirical Fisher from per-datum Jacobians (`_reference`).
"""

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import (
    assert_close,
    counted_compilations,
    dense_ef,
    dense_ggn,
    flat,
    init_params,
    jacobian,
    make_data,
    mlp,
    random_vector,
)

import fisherops as fo
from fisherops._evidence import log_marginal_likelihood

jax.config.update("jax_enable_x64", True)

PARAMS = init_params()
NUM_PARAMS = flat(PARAMS).size  # 31
LEAF_SIZES = [leaf.size for leaf in jax.tree.leaves(PARAMS)]
DATA = make_data("labels", n=20)
LOSS = "cross_entropy"
LOG_LIKELIHOOD = -7.5  # any number: the evidence is linear in it


@functools.cache
def curvature(kind):
    """The operator under test and its dense float64 reference (numpy)."""
    if kind == "ef":
        operator = fo.EmpiricalFisherOperator(mlp, PARAMS, DATA, LOSS)
        return operator, np.asarray(dense_ef(mlp, PARAMS, DATA, LOSS))
    operator = fo.GGNOperator(mlp, PARAMS, DATA, LOSS)
    return operator, np.asarray(dense_ggn(mlp, PARAMS, DATA, LOSS))


def per_leaf(values):
    return jax.tree.unflatten(jax.tree.structure(PARAMS), list(values))


def dense_evidence(matrix, mean, diagonal, log_likelihood=LOG_LIKELIHOOD):
    return (
        log_likelihood
        - 0.5 * np.sum(diagonal * mean**2)
        + 0.5 * np.sum(np.log(diagonal))
        - 0.5 * np.linalg.slogdet(matrix + np.diag(diagonal))[1]
    )


def found(result):
    """The precisions of a result, one per params leaf."""
    return np.asarray(
        jax.tree.leaves(result.prior_precision.full_diagonal()), dtype=object
    )


def scalar_found(result):
    values = np.concatenate([np.ravel(x) for x in found(result)]).astype(float)
    assert np.all(values == values[0])
    return float(values[0])


def layerwise_found(result):
    return np.asarray([float(np.ravel(x)[0]) for x in found(result)])


def layer_diagonal(precisions):
    return np.repeat(np.asarray(precisions, float), LEAF_SIZES)


def evidence_gradient(matrix, mean, log_precisions, step=1e-5):
    """`d evidence / d log λ_l` by central differences of the numpy evidence."""
    log_precisions = np.asarray(log_precisions, float)
    gradient = []
    for i in range(log_precisions.size):
        shift = np.zeros_like(log_precisions)
        shift[i] = step
        plus, minus = (
            dense_evidence(matrix, mean, layer_diagonal(np.exp(log_precisions + s)))
            for s in (shift, -shift)
        )
        gradient.append((plus - minus) / (2 * step))
    return np.asarray(gradient)


# --------------------------------------------------------------------------
# the evidence
# --------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "prior"), [("ef", "scalar"), ("ggn", "layerwise")])
def test_log_marginal_likelihood_and_its_gradient(kind, prior):
    operator, matrix = curvature(kind)
    mean = random_vector(PARAMS, seed=6)
    precision = (
        jnp.asarray([0.3, 0.7, 1.5, 0.2]) if prior == "layerwise" else jnp.asarray(0.4)
    )

    def ours(precision):
        value = per_leaf(precision) if prior == "layerwise" else precision
        return log_marginal_likelihood(
            operator, fo.PriorPrecision(mean, value), mean, LOG_LIKELIHOOD
        )

    value, grad = jax.value_and_grad(ours)(precision)
    precisions = np.broadcast_to(np.asarray(precision), (4,))
    expected = dense_evidence(matrix, flat(mean), layer_diagonal(precisions))
    # d evidence / d λ_l = -|θ_l|^2 / 2 + P_l / (2 λ_l) - tr_l(P^{-1}) / 2
    inverse_diagonal = np.diag(
        np.linalg.inv(matrix + np.diag(layer_diagonal(precisions)))
    )
    bounds = np.cumsum([0, *LEAF_SIZES])
    expected_grad = np.asarray(
        [
            -0.5 * np.sum(flat(mean)[a:b] ** 2)
            + 0.5 * (b - a) / lam
            - 0.5 * np.sum(inverse_diagonal[a:b])
            for a, b, lam in zip(bounds[:-1], bounds[1:], precisions, strict=True)
        ]
    )
    assert_close(value, expected)
    if prior == "scalar":
        expected_grad = expected_grad.sum()
    assert_close(grad, expected_grad, rtol=1e-8)
    # LaplacePosterior's method is the same number.
    posterior = fo.LaplacePosterior(operator, fo.PriorPrecision(mean, 0.4), mean)
    if prior == "scalar":
        assert_close(posterior.log_marginal_likelihood(LOG_LIKELIHOOD), expected)


def test_non_finite_evidence_is_an_error():
    operator, _ = curvature("ggn")
    prior = fo.PriorPrecision(PARAMS, 0.5)
    with pytest.raises(Exception, match="log evidence is not finite"):
        jax.block_until_ready(log_marginal_likelihood(operator, prior, PARAMS, jnp.nan))


# --------------------------------------------------------------------------
# prior tuning by the evidence
# --------------------------------------------------------------------------

GRID = np.logspace(-3, 3, 601)  # neighbours differ by 2.3%


@pytest.mark.parametrize("kind", ["ef", "ggn"])
def test_scalar_prior_tuning_finds_the_dense_optimum(kind):
    operator, matrix = curvature(kind)
    mean = flat(PARAMS)
    values = [dense_evidence(matrix, mean, lam * np.ones(NUM_PARAMS)) for lam in GRID]
    best = GRID[int(np.argmax(values))]
    assert 1e-2 < best < 1e2  # an interior optimum

    result = fo.optimize_prior_precision(operator, PARAMS, LOG_LIKELIHOOD)
    assert isinstance(result, fo.PriorPrecisionResult)
    lam = scalar_found(result)
    assert bool(result.converged) and int(result.num_steps) < 20
    assert abs(math.log(lam / best)) < 0.03
    # Stationary to the precision the secant steps reach, and the reported
    # evidence and gradient are the dense ones at λ.
    gradient = evidence_gradient(matrix, mean, [math.log(lam)] * 4).sum()
    assert abs(gradient) < 1e-5 * NUM_PARAMS
    assert_close(result.objective, dense_evidence(matrix, mean, lam * np.ones(31)))
    assert_close(result.gradient, [gradient], atol=1e-6)

    gridded = fo.optimize_prior_precision(
        operator, PARAMS, LOG_LIKELIHOOD, grid=GRID, progress=True
    )
    assert scalar_found(gridded) == pytest.approx(best)
    assert_close(gridded.grid_values, values, rtol=1e-9)


@functools.cache
def tuned(prior):
    """The dense-route tuning of the GGN at a random mean (shared by tests)."""
    operator, _ = curvature("ggn")
    mean = random_vector(PARAMS, seed=8)
    return fo.optimize_prior_precision(operator, mean, LOG_LIKELIHOOD, prior=prior)


def test_layerwise_prior_tuning_is_a_stationary_point():
    _, matrix = curvature("ggn")
    mean = random_vector(PARAMS, seed=8)
    result = tuned("layerwise")
    precisions = layerwise_found(result)
    assert precisions.shape == (4,)
    assert not np.allclose(precisions, precisions[0])  # genuinely one per leaf
    assert bool(result.converged)
    gradient = evidence_gradient(matrix, flat(mean), np.log(precisions))
    # At the optimum d evidence / d log λ_l = 0; at λ_l / 2 it is of order P_l.
    assert np.max(np.abs(gradient)) < 1e-5
    assert_close(result.gradient, gradient, atol=1e-6)
    assert float(result.objective) > float(tuned("scalar").objective)
    # A posterior gives its curvature, params and prior precision (the start).
    posterior = fo.LaplacePosterior(curvature("ggn")[0], 1.0, mean)
    from_posterior = fo.optimize_prior_precision(
        posterior, log_likelihood=LOG_LIKELIHOOD, prior="layerwise"
    )
    assert_close(layerwise_found(from_posterior), precisions, rtol=1e-12)


def test_slq_prior_tuning_is_near_the_dense_optimum():
    operator, matrix = curvature("ggn")
    mean = random_vector(PARAMS, seed=8)
    for prior in ("scalar", "layerwise"):
        result = fo.optimize_prior_precision(
            operator,
            mean,
            LOG_LIKELIHOOD,
            prior=prior,
            logdet_method="slq",
            num_probes=64,
            num_lanczos_steps=NUM_PARAMS,
        )
        assert bool(result.converged)
        ours, exact = layerwise_found(result), layerwise_found(tuned(prior))
        assert np.max(np.abs(np.log(ours / exact))) < 0.25, prior


def test_float32_tuning_is_finite_where_the_cholesky_breaks_down():
    """A rank-deficient float32 curvature scaled like 60,000 data points: the
    evidence is maximised at a small λ where `C + λ I` has no float32 Cholesky.
    Nothing returned is NaN, no grid value is NaN, and λ is the float64 optimum
    to float32 accuracy."""
    data = (DATA[0][:5], DATA[1][:5])
    mean = random_vector(PARAMS, seed=9)
    results = {}
    for dtype in (jnp.float64, jnp.float32):
        params, point, inputs = jax.tree.map(
            lambda leaf, dtype=dtype: leaf.astype(dtype), (PARAMS, mean, data[0])
        )
        operator = fo.GGNOperator(
            mlp, params, (inputs, data[1]), LOSS, num_total_samples=6e4
        )
        # Starting at λ = 1e-4, where float32 C + λ I is indefinite (C's rounded
        # spectrum reaches -2e-3): the fixed point falls back to eigh there.
        results[dtype] = [
            fo.optimize_prior_precision(operator, point, prior=prior, init=1e-4)
            for prior in ("scalar", "layerwise")
        ]
        gridded = fo.optimize_prior_precision(
            operator, point, grid=np.logspace(-4, 4, 17)
        )
        for result in (*results[dtype], gridded):
            leaves = jax.tree.leaves(result.prior_precision.precision)
            assert np.all(np.isfinite(leaves)) and np.isfinite(result.objective)
        assert np.all(np.isfinite(gridded.grid_values))
    for r32, r64 in zip(results[jnp.float32], results[jnp.float64], strict=True):
        assert_close(layerwise_found(r32), layerwise_found(r64), rtol=1e-2)


def test_not_converged_warns():
    operator, _ = curvature("ggn")
    mean = random_vector(PARAMS, seed=8)
    with pytest.warns(UserWarning, match="did not converge in 1 steps"):
        result = fo.optimize_prior_precision(
            operator, mean, prior="layerwise", num_steps=1
        )
    assert not bool(result.converged)
    with pytest.warns(UserWarning, match="end of the grid"):
        fo.optimize_prior_precision(operator, mean, grid=[1e-3, 1e-2])


def test_repeated_calls_compile_nothing():
    """Three eager calls with new curvature, params and prior arrays of the same
    shapes: only the first compiles (progress bar included)."""
    inputs, targets = DATA
    calls = {
        "evidence": lambda op, p, lam: log_marginal_likelihood(
            op, fo.PriorPrecision(p, lam), p, LOG_LIKELIHOOD
        ),
        "scalar": lambda op, p, lam: fo.optimize_prior_precision(
            op, p, init=lam, progress=True
        ),
        "layerwise": lambda op, p, lam: fo.optimize_prior_precision(
            op, p, init=lam, prior="layerwise"
        ),
        "slq": lambda op, p, lam: fo.optimize_prior_precision(
            op, p, init=lam, logdet_method="slq", num_probes=2, num_lanczos_steps=4
        ),
    }
    counts = {}
    for name, call in calls.items():
        counts[name] = []
        for i in range(3):
            params = jax.tree.map(lambda leaf, i=i: leaf + 0.1 * i, PARAMS)
            operator = fo.GGNOperator(mlp, params, (inputs + i, targets), LOSS)
            with counted_compilations() as compilations, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = call(operator, params, jnp.asarray(0.5 + i))
                jax.block_until_ready(jax.tree.leaves(result))
            counts[name].append(len(compilations))
    assert all(later == [0, 0] for _, *later in counts.values()), counts


def kfac_or_skip():
    try:
        return fo.KFACOperator(mlp, PARAMS, DATA, LOSS)
    except (NotImplementedError, AttributeError):
        pytest.skip("KFACOperator is not implemented yet")


def test_kfac_uses_its_exact_logdet_for_evidence_and_tuning():
    """A KFAC curvature with a scalar or layerwise prior: the evidence and the
    tuned precisions are those of the dense KFAC matrix (its exact Kronecker
    log-determinant, whatever logdet_method)."""
    kfac = kfac_or_skip()
    matrix = np.asarray(kfac.as_matrix())
    mean = random_vector(PARAMS, seed=8)
    prior = fo.PriorPrecision(mean, per_leaf([0.3, 0.7, 1.5, 0.2]))
    expected = dense_evidence(matrix, flat(mean), layer_diagonal([0.3, 0.7, 1.5, 0.2]))
    for method in ("auto", "slq"):
        value = log_marginal_likelihood(
            kfac, prior, mean, LOG_LIKELIHOOD, logdet_method=method
        )
        assert_close(value, expected, rtol=1e-8)
    result = fo.optimize_prior_precision(
        kfac, mean, LOG_LIKELIHOOD, prior="layerwise", logdet_method="slq"
    )
    assert bool(result.converged)
    gradient = evidence_gradient(matrix, flat(mean), np.log(layerwise_found(result)))
    assert np.max(np.abs(gradient)) < 1e-5


# --------------------------------------------------------------------------
# prior tuning on held-out data
# --------------------------------------------------------------------------


def test_validation_objective_picks_the_grid_point_of_least_predictive_nll():
    operator, matrix = curvature("ggn")
    # The labels the MAP predicts, one of them changed: the NLL trades the MAP's
    # confidence against that label, and its minimum is inside the grid.
    inputs, _ = make_data("labels", n=8, seed=11)
    targets = np.argmax(np.asarray(jax.vmap(lambda x: mlp(x, PARAMS))(inputs)), axis=1)
    targets[0] = (targets[0] + 1) % 3
    grid = np.logspace(-2, 2, 5)
    result = fo.optimize_prior_precision(
        operator,
        PARAMS,
        objective="validation",
        validation_data=(inputs, targets),
        grid=grid,
    )

    def nll(lam):
        covariance = np.linalg.inv(matrix + lam * np.eye(NUM_PARAMS))
        total = 0.0
        for x, y in zip(np.asarray(inputs), np.asarray(targets), strict=True):
            jac = np.asarray(jacobian(mlp, PARAMS, x))
            mean = np.asarray(mlp(x, PARAMS))
            variance = np.diag(jac @ covariance @ jac.T)
            logits = mean / np.sqrt(1 + np.pi / 8 * variance)
            total -= logits[y] - np.log(np.sum(np.exp(logits)))
        return total / len(inputs)

    expected = [nll(lam) for lam in grid]
    assert_close(result.grid_values, expected, rtol=1e-6)
    assert scalar_found(result) == grid[int(np.argmin(expected))]
    assert 0 < np.argmin(expected) < grid.size - 1 and bool(result.converged)
    assert result.gradient is None


# --------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------


def test_bad_input_is_a_clear_error():
    operator, _ = curvature("ggn")
    tune = functools.partial(fo.optimize_prior_precision, operator, PARAMS)
    with pytest.raises(ValueError, match="objective must be one of"):
        tune(objective="marglik")
    with pytest.raises(ValueError, match="prior must be one of"):
        tune(prior="kron")
    with pytest.raises(ValueError, match="init must be positive"):
        tune(init=-1.0)
    with pytest.raises(ValueError, match="tunes one scalar precision"):
        tune(prior="layerwise", grid=[1.0, 2.0])
    with pytest.raises(ValueError, match="grid must be a non-empty 1-d array"):
        tune(grid=[1.0, -1.0])
    with pytest.raises(ValueError, match="needs validation_data"):
        tune(objective="validation")
    with pytest.raises(ValueError, match="prior='diagonal' needs"):
        tune(prior="diagonal", logdet_method="slq")
    with pytest.raises(ValueError, match="num_steps must be an int >= 1"):
        tune(num_steps=0)
    with pytest.raises(ValueError, match="log_likelihood must be a scalar"):
        log_marginal_likelihood(
            operator, fo.PriorPrecision(PARAMS, 1.0), PARAMS, jnp.ones(3)
        )
    with pytest.raises(ValueError, match="precision must be >= 0 and not NaN"):
        fo.PriorPrecision(PARAMS, jnp.nan)
    with pytest.raises(TypeError, match="curvature_or_posterior must be"):
        fo.optimize_prior_precision(np.eye(NUM_PARAMS), PARAMS)
    with pytest.raises(ValueError, match="params must have the curvature's"):
        fo.optimize_prior_precision(operator, {"w": jnp.zeros(3)})
