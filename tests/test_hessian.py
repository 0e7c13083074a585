"""`fisherops.HessianOperator` against `jax.hessian` of the summed loss (float64).

The reference writes the summed loss out by hand from `_reference`'s per-datum
formulas (`quartic_loss` for a callable loss; mse and cross-entropy by name)
on the raveled params and differentiates it twice with `jax.hessian`.
"""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from _reference import (
    assert_close,
    assert_like_params,
    counted_compilations,
    flat,
    init_params,
    make_data,
    mlp,
    model_for,
    quartic_loss,
    random_vector,
)
from jax.flatten_util import ravel_pytree

import fisherops as fo

jax.config.update("jax_enable_x64", True)

PARAMS = init_params()


def per_datum_loss(loss):
    if loss == "mse":
        return lambda f, y: jnp.sum((f - y) ** 2)
    if loss == "cross_entropy":
        return lambda f, y: jax.nn.logsumexp(f) - f[y]
    return quartic_loss


def dense_hessian(data, loss, factor=1.0):
    """`factor * jax.hessian(θ -> Σ_n c(y_n, f(x_n, θ)))`, `(P, P)`."""
    inputs, targets = data
    flat_params, unravel = ravel_pytree(PARAMS)
    datum_loss = per_datum_loss(loss)

    def summed(theta):
        outputs = jax.vmap(mlp, (0, None))(inputs, unravel(theta))
        return factor * jnp.sum(jax.vmap(datum_loss)(outputs, targets))

    return np.asarray(jax.jit(jax.hessian(summed))(flat_params))


CASES = [
    # (loss_fn, target kind, vmap_over_data, chunk_size, num_total_samples)
    ("cross_entropy", "labels", True, None, None),
    ("mse", "vector", False, 3, 21.0),  # chunks of 3 over 7 points: last shifted
    ("quartic", "vector", True, 2, None),  # a callable loss
]


@pytest.mark.parametrize("loss, kind, vmap_over_data, chunk_size, total", CASES)
def test_hessian_matches_jax_hessian(loss, kind, vmap_over_data, chunk_size, total):
    data = make_data(kind, n=7)
    operator = fo.HessianOperator(
        model_for(vmap_over_data),
        PARAMS,
        data,
        quartic_loss if loss == "quartic" else loss,
        vmap_over_data=vmap_over_data,
        chunk_size=chunk_size,
        num_total_samples=total,
    )
    expected = dense_hessian(data, loss, 1.0 if total is None else total / 7)
    assert np.linalg.eigvalsh(expected)[0] < -1e-3  # indefinite: not a GGN
    vector = random_vector(PARAMS)
    product = operator.mv(vector)
    assert_like_params(product, PARAMS)
    assert_close(flat(product), expected @ flat(vector), rtol=1e-8)
    assert_close(operator.as_matrix(), expected, rtol=1e-8, atol=1e-9)
    assert_close(lx.diagonal(operator), np.diag(expected), rtol=1e-8, atol=1e-9)
    linearised = lx.linearise(operator)
    assert_close(flat(linearised.mv(vector)), expected @ flat(vector), rtol=1e-8)
    materialised = lx.materialise(operator)
    assert_close(flat(materialised.mv(vector)), expected @ flat(vector), rtol=1e-8)
    assert_close(flat((2 * operator).mv(vector)), 2 * expected @ flat(vector))


def test_lineax_knows_it_is_symmetric_and_indefinite():
    """CG refuses it with lineax's own message; GMRES and SVD solve."""
    data = make_data("vector", n=20)  # mse on 20 points: a regular Hessian
    operator = fo.HessianOperator(mlp, PARAMS, data, "mse")
    expected = dense_hessian(data, "mse")
    assert lx.is_symmetric(operator) and lx.is_symmetric(operator.linearise())
    assert not lx.is_positive_semidefinite(operator)
    assert not lx.is_negative_semidefinite(operator)
    right = random_vector(PARAMS)
    with pytest.raises(ValueError, match="`CG\\(\\)` may only be used for positive"):
        lx.linear_solve(operator, right, lx.CG(rtol=1e-8, atol=1e-8))
    for solver in (lx.GMRES(rtol=1e-12, atol=1e-12, restart=40), lx.SVD()):
        solution = lx.linear_solve(operator, right, solver).value
        assert_like_params(solution, PARAMS)
        assert_close(expected @ flat(solution), flat(right), rtol=1e-7, atol=1e-8)
    with pytest.raises(ValueError, match="algorithm must be None or 'mv'"):
        operator.as_matrix("rows")


def test_functional_hessian_mv_and_batches_compile_once():
    data = make_data("labels", n=6)
    expected = dense_hessian(data, "cross_entropy", factor=10.0)
    vector = random_vector(PARAMS)
    mv = fo.create_hessian_mv(
        mlp, PARAMS, data, "cross_entropy", num_curv_samples=6, num_total_samples=60
    )
    assert_close(flat(mv(vector)), expected @ flat(vector), rtol=1e-8)
    batch_mv = jax.jit(
        fo.create_hessian_mv_without_data(mlp, PARAMS, "cross_entropy", factor=10.0)
    )
    halves = [jax.tree.map(lambda leaf, s=s: leaf[s], data) for s in (slice(0, 3),)]
    halves.append(jax.tree.map(lambda leaf: leaf[3:], data))
    total = jax.tree.map(jnp.add, *(batch_mv(vector, half) for half in halves))
    assert_close(flat(total), expected @ flat(vector), rtol=1e-8)
    operator = fo.HessianOperator(mlp, PARAMS, data, "cross_entropy")
    operator.mv(vector)
    moved = jax.tree.map(lambda leaf: leaf + 1, PARAMS)
    with counted_compilations() as compilations:
        fo.HessianOperator(mlp, moved, data, "cross_entropy").mv(vector)
    assert compilations == []


def test_bad_input_is_a_clear_error():
    data = make_data("labels", n=4)
    with pytest.raises(ValueError, match="HessianOperator needs loss_fn"):
        fo.HessianOperator(mlp, PARAMS, data, None)
    with pytest.raises(ValueError, match="unknown loss_fn"):
        fo.HessianOperator(mlp, PARAMS, data, "hinge")
    operator = fo.HessianOperator(mlp, PARAMS, data, "cross_entropy")
    with pytest.raises(ValueError, match="vector must have the structure"):
        operator.mv(jnp.zeros(31))
