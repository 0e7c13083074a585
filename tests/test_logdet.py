"""`log det(C + Λ)` against dense float64 references.

The references are numpy: `slogdet` of `C + Λ` with `C` from per-datum
Jacobians (`_reference.dense_ggn`); derivatives `d log det P = tr(P^{-1} dP)`.
SLQ is checked against the exact Hutchinson estimate of the same probes (with as
many Lanczos steps as params, Gauss quadrature is exact), so the test pins the
estimator, and the estimator is unbiased by construction.
"""

import functools

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from _reference import (
    assert_close,
    dense_ggn,
    dense_prior,
    flat,
    init_params,
    make_data,
    mlp,
)

import fisherops as fo
from fisherops._logdet import logdet

jax.config.update("jax_enable_x64", True)

PARAMS = init_params()
NUM_PARAMS = flat(PARAMS).size  # 31
INPUTS, TARGETS = make_data("labels", n=20)
LOSS = "cross_entropy"
DIAGONAL_PRIOR = jax.tree.map(
    lambda leaf: jnp.asarray(
        np.random.default_rng(leaf.size).uniform(0.1, 0.6, leaf.shape)
    ),
    PARAMS,
)
KEY = jax.random.key(0)


def operator(scale=1.0):
    """The GGN of the inputs scaled by `scale` (a differentiable curvature)."""
    return fo.GGNOperator(mlp, PARAMS, (INPUTS * scale, TARGETS), LOSS)


@functools.cache
def dense_reference():
    """`C` and `dC/d scale` at `scale = 1`, in numpy."""
    matrix = dense_ggn(mlp, PARAMS, (INPUTS, TARGETS), LOSS)
    derivative = jax.jacfwd(
        lambda s: dense_ggn(mlp, PARAMS, (INPUTS * s, TARGETS), LOSS)
    )(1.0)
    return np.asarray(matrix), np.asarray(derivative)


def diagonal_of(prior):
    return np.diag(dense_prior(PARAMS, prior))


@pytest.mark.parametrize("method", ["dense", "eigh"])
def test_dense_logdet_value_and_derivatives(method):
    matrix, derivative = dense_reference()
    precision = matrix + dense_prior(PARAMS, DIAGONAL_PRIOR)
    inverse = np.linalg.inv(precision)

    def ours(diagonal_prior, scale):
        prior = fo.PriorPrecision(PARAMS, diagonal_prior)
        return logdet(operator(scale), prior, logdet_method=method)

    value, (prior_grad, scale_grad) = jax.value_and_grad(ours, argnums=(0, 1))(
        DIAGONAL_PRIOR, 1.0
    )
    assert_close(value, np.linalg.slogdet(precision)[1])
    assert_close(flat(prior_grad), np.diag(inverse), rtol=1e-8)
    assert_close(scale_grad, np.trace(inverse @ derivative), rtol=1e-8)


def exact_hutchinson(matrix, derivative, diagonal, num_probes):
    """The SLQ estimator with exact quadrature, from the same probes, in numpy."""
    probes = np.stack(
        [
            np.asarray(jax.random.rademacher(jax.random.fold_in(KEY, s), (31,)))
            for s in range(num_probes)
        ]
    ).astype(float)
    scale = 1 / np.sqrt(diagonal)
    whitened = np.eye(len(diagonal)) + scale[:, None] * matrix * scale[None, :]
    eigenvalues, vectors = np.linalg.eigh(whitened)
    log_whitened = vectors @ np.diag(np.log(eigenvalues)) @ vectors.T
    solutions = np.linalg.solve(whitened, probes.T).T
    value = np.sum(np.log(diagonal)) + np.mean(
        np.einsum("sp,pq,sq->s", probes, log_whitened, probes)
    )
    prior_grad = np.mean(solutions * probes, axis=0) / diagonal
    scale_grad = np.mean(
        np.einsum("sp,pq,sq->s", solutions * scale, derivative, probes * scale)
    )
    return value, prior_grad, scale_grad


def test_slq_is_the_hutchinson_estimate_of_its_probes_with_gradients():
    matrix, derivative = dense_reference()
    diagonal = diagonal_of(DIAGONAL_PRIOR)
    num_probes = 32

    def ours(diagonal_prior, scale, num_steps):
        prior = fo.PriorPrecision(PARAMS, diagonal_prior)
        return logdet(
            operator(scale),
            prior,
            logdet_method="slq",
            key=KEY,
            num_probes=num_probes,
            num_lanczos_steps=num_steps,
        )

    value, (prior_grad, scale_grad) = jax.value_and_grad(ours, argnums=(0, 1))(
        DIAGONAL_PRIOR, 1.0, NUM_PARAMS
    )
    expected = exact_hutchinson(matrix, derivative, diagonal, num_probes)
    assert_close(value, expected[0], rtol=1e-8)
    assert_close(flat(prior_grad), expected[1], rtol=1e-6, atol=1e-8)
    assert_close(scale_grad, expected[2], rtol=1e-6)
    # ... which is an estimate of the exact value and derivatives: a wrong sign or
    # a missing term would be off by far more than the probes' noise.
    exact_grad = np.trace(np.linalg.solve(matrix + np.diag(diagonal), derivative))
    assert abs(scale_grad - exact_grad) < 0.35 * abs(exact_grad)
    # The estimated part is tr log(I + Λ^{-1/2} C Λ^{-1/2}) = log det P - Σ log d.
    trace = np.linalg.slogdet(matrix + np.diag(diagonal))[1] - np.sum(np.log(diagonal))
    assert abs(value - np.sum(np.log(diagonal)) - trace) < 0.05 * trace


def test_slq_memory_does_not_grow_with_the_probes():
    """The probes run one after another: compiled temporaries are one Lanczos
    basis, `(steps + 1) x P`, whatever the number of probes."""
    size, steps = 20_000, 16
    diagonal = jnp.linspace(1.0, 2.0, size)
    curvature = lx.TaggedLinearOperator(
        lx.DiagonalLinearOperator(diagonal),
        (lx.symmetric_tag, lx.positive_semidefinite_tag),
    )
    prior = fo.PriorPrecision(jnp.zeros(size), 1.0)

    def temporaries(num_probes):
        compiled = jax.jit(
            lambda prior: logdet(
                curvature,
                prior,
                logdet_method="slq",
                num_probes=num_probes,
                num_lanczos_steps=steps,
            )
        )
        return compiled.lower(prior).compile().memory_analysis().temp_size_in_bytes

    few, many = temporaries(2), temporaries(64)
    assert many < few + size  # not one vector more for 32x the probes
    assert many < 4 * (steps + 1) * size * 8
    value = logdet(curvature, prior, logdet_method="slq", num_lanczos_steps=steps)
    assert_close(value, np.sum(np.log(np.asarray(diagonal) + 1)), rtol=1e-10)


def test_a_prior_below_the_rounding_level_is_a_clear_error():
    """Issue 19.6: float32, a rank-deficient curvature scaled like a large data
    set. Where `λ` is above the rounding level `eps |C|` every method gives the
    float64 value; below it (float32 with `λ = 1e-4` here, and float64 with
    `λ = 1e-30`) no method returns a number (the eigh route and SLQ used to
    return finite wrong ones, SLQ even with the wrong sign): an error names the
    fix. "dense" still says when the Cholesky breaks down."""
    data = (INPUTS[:5], TARGETS[:5])
    matrix = np.asarray(
        fo.GGNOperator(mlp, PARAMS, data, LOSS, num_total_samples=60_000).as_matrix()
    )
    eigenvalues = np.maximum(np.linalg.eigvalsh(matrix), 0)
    slq = dict(key=KEY, num_probes=4, num_lanczos_steps=NUM_PARAMS)
    unresolved = "not resolved in float.*float64.*larger prior precision"
    with jax.enable_x64(False):
        params = jax.tree.map(lambda leaf: leaf.astype(jnp.float32), PARAMS)
        data32 = (data[0].astype(jnp.float32), data[1])
        curvature = fo.GGNOperator(mlp, params, data32, LOSS, num_total_samples=60_000)
        resolved = fo.PriorPrecision(params, jnp.float32(1.0))
        exact = np.sum(np.log(eigenvalues + 1.0))
        for method in ("dense", "eigh", "auto"):
            value = logdet(curvature, resolved, logdet_method=method)
            assert abs(float(value) - exact) < 1e-3 * abs(exact)
        small = fo.PriorPrecision(params, jnp.float32(1e-4))
        for method in ("eigh", "auto", "slq"):
            with pytest.raises(Exception, match=unresolved):
                jax.block_until_ready(
                    logdet(curvature, small, logdet_method=method, **slq)
                )
        with pytest.raises(Exception, match="not positive definite.*eigh"):
            jax.block_until_ready(logdet(curvature, small, logdet_method="dense"))
    curvature = fo.GGNOperator(mlp, PARAMS, data, LOSS, num_total_samples=60_000)
    for method in ("eigh", "auto", "slq"):
        with pytest.raises(Exception, match=unresolved):
            jax.block_until_ready(
                logdet(
                    curvature,
                    fo.PriorPrecision(PARAMS, 1e-30),
                    logdet_method=method,
                    **slq,
                )
            )


def test_bad_input_is_a_clear_error():
    curvature = operator()
    prior = fo.PriorPrecision(PARAMS, 0.5)
    with pytest.raises(ValueError, match="logdet_method must be one of"):
        logdet(curvature, prior, logdet_method="cholesky")
    with pytest.raises(ValueError, match="num_probes must be an int >= 1"):
        logdet(curvature, prior, logdet_method="slq", num_probes=0)
    with pytest.raises(TypeError, match="prior_precision must be a fisherops"):
        logdet(curvature, 0.5)
    with pytest.raises(Exception, match="positive prior precision"):
        jax.block_until_ready(logdet(curvature, fo.PriorPrecision(PARAMS, 0.0)))
