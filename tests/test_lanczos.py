"""The one Lanczos (`fisherops/_lanczos.py`) against numpy's `eigh` in float64.

With as many steps as the matrix has rows, the Ritz pairs are the eigenpairs,
also when the start vector's Krylov space is invariant early (a low-rank
matrix: the basis restarts after the breakdown), and the quadrature weights of
the start vector are those of the exact spectral measure.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import assert_close

from fisherops._lanczos import _lanczos, _ritz_pairs, _tridiagonal_eigh

jax.config.update("jax_enable_x64", True)

SIZE = 12
RNG = np.random.default_rng(0)
_SQUARE = RNG.normal(size=(SIZE, SIZE))
INDEFINITE = (_SQUARE + _SQUARE.T) / 2
_TALL = RNG.normal(size=(SIZE, 2))
LOW_RANK = _TALL @ _TALL.T  # rank 2: Lanczos breaks down after 3 steps
START = jnp.asarray(RNG.normal(size=SIZE))


def matvec(matrix):
    matrix = jnp.asarray(matrix)
    return lambda v: matrix @ v


@pytest.mark.parametrize("matrix", [INDEFINITE, LOW_RANK], ids=["indefinite", "rank2"])
def test_full_lanczos_is_an_eigendecomposition(matrix):
    basis, diagonal, off = jax.jit(_lanczos, static_argnums=(0, 2))(
        matvec(matrix), START, SIZE
    )
    assert_close(basis @ basis.T, np.eye(SIZE), atol=1e-12)
    tridiagonal = np.diag(diagonal) + np.diag(off, 1) + np.diag(off, -1)
    assert_close(basis @ matrix @ basis.T, tridiagonal, atol=1e-12)
    assert_close(basis[0], START / np.linalg.norm(START))
    if matrix is LOW_RANK:
        assert np.abs(off[2]) < 1e-10  # the breakdown the restart went past
    # Gauss quadrature of the start vector's spectral measure: q0^T f(M) q0.
    theta, vectors = _tridiagonal_eigh(diagonal, off)
    eigenvalues = np.linalg.eigvalsh(matrix)
    assert_close(np.sort(theta), eigenvalues, atol=1e-12)
    unit = START / np.linalg.norm(START)
    for power in (1, 2, 3):
        expected = unit @ np.linalg.matrix_power(matrix, power) @ unit
        assert_close(np.sum(vectors[0] ** 2 * theta**power), expected, atol=1e-12)


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_ritz_pairs_are_the_extreme_eigenpairs(which):
    values, vectors = jax.jit(_ritz_pairs, static_argnums=(0, 2, 3, 4))(
        matvec(INDEFINITE), START, SIZE, 3, which
    )
    eigenvalues = np.linalg.eigvalsh(INDEFINITE)
    expected = {
        "largest": eigenvalues[::-1],
        "smallest": eigenvalues,
        "magnitude": eigenvalues[np.argsort(-np.abs(eigenvalues))],
    }[which][:3]
    assert_close(values, expected, atol=1e-12)
    assert vectors.shape == (3, SIZE)
    assert_close(vectors @ vectors.T, np.eye(3), atol=1e-12)
    assert_close(vectors @ INDEFINITE, values[:, None] * vectors, atol=1e-10)


def test_few_steps_find_a_dominant_eigenpair():
    """A well separated top eigenvalue converges in a few steps."""
    spectrum = np.concatenate([[100.0], np.linspace(0, 1, SIZE - 1)])
    matrix = np.diag(spectrum)
    values, vectors = jax.jit(_ritz_pairs, static_argnums=(0, 2, 3))(
        matvec(matrix), START, 6, 1
    )
    assert_close(values, [100.0], rtol=1e-8)
    assert_close(np.abs(vectors[0, 0]), 1.0, rtol=1e-8)
