"""`fisherops.estimate` against dense float64 references.

Exactness at full budget is checked on the Hessian of a small MLP (a params
pytree, indefinite) against `jax.hessian`; the statistical properties on flat
`lineax.MatrixLinearOperator`s with known spectra, over many fixed keys (so the
checks are deterministic): Hutchinson's mean within four standard errors of the
trace, Hutch++'s mean squared error far below Hutchinson's at the same budget on
a decaying spectrum.
"""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from _reference import assert_close, counted_compilations, init_params, make_data, mlp
from test_hessian import dense_hessian

import fisherops as fo

jax.config.update("jax_enable_x64", True)

PARAMS = init_params()
DATA = make_data("labels", n=7)
HESSIAN = fo.HessianOperator(mlp, PARAMS, DATA, "cross_entropy")
SIZE = 31
KEY = jax.random.key(4)


def flat_operator(matrix):
    return lx.MatrixLinearOperator(jnp.asarray(matrix), lx.symmetric_tag)


def with_spectrum(values, seed=0):
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(len(values), len(values))))[0]
    return (basis * values) @ basis.T


def test_exact_at_full_budget_on_the_hessian():
    expected = dense_hessian(DATA, "cross_entropy")
    eigenvalues = np.linalg.eigvalsh(expected)
    assert eigenvalues[0] < -1  # indefinite
    for method in ("hutch++", "xtrace"):
        value = fo.estimate.trace(HESSIAN, KEY, num_matvecs=2 * SIZE, method=method)
        assert_close(value, np.trace(expected), rtol=1e-9, atol=1e-9)
    diagonal = fo.estimate.diagonal(HESSIAN, KEY, num_matvecs=2 * SIZE + 2)
    assert_close(diagonal, np.diag(expected), atol=1e-9)
    values, vectors = fo.estimate.eigenpairs(
        HESSIAN, KEY, num_pairs=3, num_matvecs=SIZE, which="smallest"
    )
    assert_close(values, eigenvalues[:3], atol=1e-9)
    assert jax.tree.structure(vectors) == jax.tree.structure(PARAMS)
    rows = jax.vmap(lambda v: jax.flatten_util.ravel_pytree(v)[0])(vectors)
    assert_close(rows @ expected, values[:, None] * rows, atol=1e-8)


def test_low_rank_sketches_are_exact_beyond_the_rank():
    """A rank-3 operator: Hutch++, XTrace and XDiag capture it with few products
    (rank-deficient sketches do not break them)."""
    rng = np.random.default_rng(1)
    factor = rng.normal(size=(20, 3))
    matrix = factor @ factor.T
    operator = flat_operator(matrix)
    for method in ("hutch++", "xtrace"):
        value = fo.estimate.trace(operator, KEY, num_matvecs=12, method=method)
        assert_close(value, np.trace(matrix), rtol=1e-10)
    assert_close(
        fo.estimate.diagonal(operator, KEY, num_matvecs=10), np.diag(matrix), atol=1e-10
    )


def test_hutchinson_is_unbiased_and_hutch_plus_plus_beats_it():
    """Over 200 keys, at 12 products each, on a spectrum decaying like 1/j^2."""
    values = 1.0 / np.arange(1, 41) ** 2
    matrix = with_spectrum(values)
    operator = flat_operator(matrix)
    keys = jax.random.split(jax.random.key(7), 200)

    def estimates(method):
        return np.asarray(
            jax.lax.map(
                lambda k: fo.estimate.trace(operator, k, num_matvecs=12, method=method),
                keys,
            )
        )

    exact = np.sum(values)
    hutchinson = estimates("hutchinson")
    assert abs(hutchinson.mean() - exact) < 4 * hutchinson.std() / np.sqrt(200)
    errors = {m: np.mean((estimates(m) - exact) ** 2) for m in ("hutch++", "xtrace")}
    hutchinson_error = np.mean((hutchinson - exact) ** 2)
    assert errors["hutch++"] < hutchinson_error / 10, (errors, hutchinson_error)
    assert errors["xtrace"] < errors["hutch++"]
    diagonals = np.asarray(
        jax.lax.map(
            lambda k: fo.estimate.diagonal(
                operator, k, num_matvecs=4, method="hutchinson"
            ),
            keys,
        )
    )
    standard_error = diagonals.std(axis=0) / np.sqrt(200)
    assert np.all(np.abs(diagonals.mean(axis=0) - np.diag(matrix)) < 4 * standard_error)


def test_spectral_density_integrates_to_one_and_pins_the_probes_moments():
    """With as many Lanczos steps as params, the SLQ measure of probe `z` has mean
    `z^T A z / |z|^2`: the density's first moment is the probes' Hutchinson
    estimate of `tr(A) / P` (computed here from the same probes)."""
    matrix = with_spectrum(np.linspace(-2.0, 5.0, 25))
    operator = flat_operator(matrix)
    grid, density = fo.estimate.spectral_density(
        operator, KEY, num_probes=3, num_lanczos_steps=25, num_points=2000
    )
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-6)
    assert np.trapezoid(density * grid, grid) == pytest.approx(
        np.mean(
            [
                z @ matrix @ z / 25
                for z in (
                    np.asarray(jax.random.rademacher(jax.random.fold_in(KEY, s), (25,)))
                    for s in range(3)
                )
            ]
        ),
        rel=1e-6,
    )
    # Mass below zero: the negative eigenvalues of an indefinite operator.
    assert 0.1 < np.trapezoid(density * (grid < 0), grid) < 0.5
    with counted_compilations() as compilations:
        fo.estimate.spectral_density(
            operator,
            jax.random.key(9),
            num_probes=3,
            num_lanczos_steps=25,
            num_points=2000,
        )
    assert compilations == []


def test_bad_input_is_a_clear_error():
    unsymmetric = lx.MatrixLinearOperator(jnp.eye(3))
    with pytest.raises(ValueError, match="operator must be symmetric.*symmetric_tag"):
        fo.estimate.spectral_density(unsymmetric, KEY)
    with pytest.raises(TypeError, match="operator must be a lineax"):
        fo.estimate.trace(np.eye(3), KEY, num_matvecs=3)
    with pytest.raises(ValueError, match="num_matvecs must be >= 3"):
        fo.estimate.trace(unsymmetric, KEY, num_matvecs=2, method="hutch++")
    with pytest.raises(ValueError, match="method must be one of"):
        fo.estimate.diagonal(unsymmetric, KEY, num_matvecs=2, method="exact")
    with pytest.raises(ValueError, match="key must be"):
        fo.estimate.trace(unsymmetric, None, num_matvecs=2)
    with pytest.raises(ValueError, match="num_pairs must be at most"):
        fo.estimate.eigenpairs(flat_operator(np.eye(3)), KEY, num_pairs=4)
