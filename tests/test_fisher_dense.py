"""The empirical Fisher and the GGN against dense float64 references.

EF  = factor * sum_n J_n^T g_n g_n^T J_n
GGN = factor * sum_n J_n^T H_n J_n
with `J_n` from `jax.jacfwd` and `g_n`, `H_n` written out by hand (SPEC.md).
"""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from _reference import (
    LOSS_TARGET_IDS,
    LOSS_TARGETS,
    N_DATA,
    assert_close,
    batched,
    check_operator,
    dense_ef,
    dense_ggn,
    init_params,
    make_data,
    mlp,
    model_for,
    per_datum,
    quartic_grad,
    quartic_loss,
)

import fisherops as fo

PARAMS = init_params()
KINDS = ["empirical", "ggn"]


def build(kind, model_fn, params, data, loss_fn, **kwargs):
    if kind == "empirical":
        return fo.EmpiricalFisherOperator(model_fn, params, data, loss_fn, **kwargs)
    return fo.GGNOperator(model_fn, params, data, loss_fn, **kwargs)


def dense(kind, params, data, loss, factor=1.0):
    reference = dense_ef if kind == "empirical" else dense_ggn
    return np.asarray(reference(mlp, params, data, loss, factor))


@functools.cache
def dense_default(kind, loss, target_kind):
    return dense(kind, PARAMS, make_data(target_kind), loss)


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["unchunked", "chunk2"])
@pytest.mark.parametrize("vmap_over_data", [True, False], ids=["vmap", "batched"])
@pytest.mark.parametrize(("loss", "target_kind"), LOSS_TARGETS, ids=LOSS_TARGET_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_dense(kind, loss, target_kind, vmap_over_data, chunk_size):
    """Every loss x target layout x mode x chunking (N=5, so chunks of 2 are uneven)."""
    data = make_data(target_kind)
    op = build(
        kind,
        model_for(vmap_over_data),
        PARAMS,
        data,
        loss,
        vmap_over_data=vmap_over_data,
        chunk_size=chunk_size,
    )
    expected = dense_default(kind, loss, target_kind)
    check_operator(op, expected, PARAMS, full=chunk_size is None)


@pytest.mark.parametrize("vmap_over_data", [True, False], ids=["vmap", "batched"])
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_linearise_and_diagonal(kind, vmap_over_data):
    """The chunked paths of linearise() and the diagonal, on (N,) integer labels."""
    op = build(
        kind,
        model_for(vmap_over_data),
        PARAMS,
        make_data("labels"),
        "cross_entropy",
        vmap_over_data=vmap_over_data,
        chunk_size=2,
    )
    check_operator(op, dense_default(kind, "cross_entropy", "labels"), PARAMS)


@pytest.mark.parametrize(("loss", "target_kind"), LOSS_TARGETS, ids=LOSS_TARGET_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_dict_and_tuple_data_agree(kind, loss, target_kind):
    inputs, targets = make_data(target_kind)
    from_dict = build(
        kind, mlp, PARAMS, {"input": inputs, "target": targets}, loss
    ).as_matrix()
    assert_close(from_dict, dense_default(kind, loss, target_kind))


@pytest.mark.parametrize(
    ("num_curv_samples", "num_total_samples", "factor"),
    [(None, None, 1.0), (None, 20, 4.0), (10, None, 1.0), (10, 30, 3.0), (2, 7, 3.5)],
)
@pytest.mark.parametrize("kind", KINDS)
def test_scaling(kind, num_curv_samples, num_total_samples, factor):
    """factor = num_total_samples / num_curv_samples; defaults give a plain sum."""
    data = make_data("vector")
    op = build(
        kind,
        mlp,
        PARAMS,
        data,
        "mse",
        num_curv_samples=num_curv_samples,
        num_total_samples=num_total_samples,
    )
    check_operator(op, dense(kind, PARAMS, data, "mse", factor), PARAMS)


@pytest.mark.parametrize("kind", KINDS)
def test_default_is_a_sum_over_data(kind):
    """Giving every datum twice doubles the matrix (a sum, not a mean)."""
    inputs, targets = make_data("labels")
    once = build(kind, mlp, PARAMS, (inputs, targets), "cross_entropy").as_matrix()
    twice = build(
        kind,
        mlp,
        PARAMS,
        (jnp.concatenate([inputs, inputs]), jnp.concatenate([targets, targets])),
        "cross_entropy",
    ).as_matrix()
    assert_close(twice, 2.0 * np.asarray(once))


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["unchunked", "chunk2"])
@pytest.mark.parametrize("vmap_over_data", [True, False], ids=["vmap", "batched"])
def test_callable_loss(vmap_over_data, chunk_size):
    """A per-datum callable loss: its output gradient comes from autodiff."""
    data = make_data("vector")
    op = fo.EmpiricalFisherOperator(
        model_for(vmap_over_data),
        PARAMS,
        data,
        quartic_loss,
        vmap_over_data=vmap_over_data,
        chunk_size=chunk_size,
    )
    expected = dense("empirical", PARAMS, data, "quartic")
    check_operator(op, expected, PARAMS, full=chunk_size is None)


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["unchunked", "chunk2"])
@pytest.mark.parametrize("vmap_over_data", [True, False], ids=["vmap", "batched"])
def test_loss_grad_fn(vmap_over_data, chunk_size):
    """loss_grad_fn sees one datum with vmap_over_data=True, the batch otherwise."""
    data = make_data("vector")
    guard = per_datum if vmap_over_data else batched
    op = fo.EmpiricalFisherOperator(
        model_for(vmap_over_data),
        PARAMS,
        data,
        vmap_over_data=vmap_over_data,
        loss_grad_fn=guard(quartic_grad),
        chunk_size=chunk_size,
    )
    expected = dense("empirical", PARAMS, data, "quartic")
    check_operator(op, expected, PARAMS, full=chunk_size is None)


def test_loss_grad_fn_is_scaled():
    data = make_data("vector")
    op = fo.EmpiricalFisherOperator(
        mlp,
        PARAMS,
        data,
        loss_grad_fn=lambda f, y: 2.0 * (f - y),
        num_curv_samples=5,
        num_total_samples=15,
    )
    check_operator(op, dense("empirical", PARAMS, data, "mse", 3.0), PARAMS)


@pytest.mark.parametrize(("loss", "target_kind"), LOSS_TARGETS, ids=LOSS_TARGET_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_single_unbatched_datum(kind, loss, target_kind):
    """vmap_over_data=False accepts one datum without a batch axis (N=1)."""
    inputs, targets = make_data(target_kind)
    op = build(kind, mlp, PARAMS, (inputs[0], targets[0]), loss, vmap_over_data=False)
    expected = dense(kind, PARAMS, (inputs[:1], targets[:1]), loss)
    check_operator(op, expected, PARAMS)


@pytest.mark.parametrize(
    ("loss", "target_kind"),
    [("mse", "vector"), ("cross_entropy", "labels"), ("cross_entropy", "one_hot")],
)
@pytest.mark.parametrize("kind", KINDS)
def test_batch_of_one(kind, loss, target_kind):
    inputs, targets = make_data(target_kind)
    data = (inputs[:1], targets[:1])
    expected = dense(kind, PARAMS, data, loss)
    for vmap_over_data in (True, False):
        op = build(
            kind,
            model_for(vmap_over_data),
            PARAMS,
            data,
            loss,
            vmap_over_data=vmap_over_data,
        )
        check_operator(op, expected, PARAMS)


def test_single_datum_scaling_defaults_to_one():
    """num_curv_samples defaults to 1 for a single unbatched datum."""
    inputs, targets = make_data("vector")
    op = fo.EmpiricalFisherOperator(
        mlp,
        PARAMS,
        (inputs[0], targets[0]),
        "mse",
        vmap_over_data=False,
        num_total_samples=4,
    )
    expected = dense("empirical", PARAMS, (inputs[:1], targets[:1]), "mse", 4.0)
    assert_close(op.as_matrix(), expected)


@pytest.mark.parametrize(
    ("loss", "target_kind"),
    [
        ("mse", "vector"),
        ("cross_entropy", "labels"),
        ("binary_cross_entropy", "binary"),
    ],
)
def test_empirical_fisher_rank_is_at_most_n(loss, target_kind):
    """Each datum adds the rank-one term (J_n^T g_n)(J_n^T g_n)^T."""
    n = 3
    data = make_data(target_kind, n=n)
    matrix = np.asarray(fo.EmpiricalFisherOperator(mlp, PARAMS, data, loss).as_matrix())
    assert matrix.shape == (31, 31)
    assert np.linalg.matrix_rank(matrix, tol=1e-8 * np.abs(matrix).max()) == n


@pytest.mark.parametrize(("loss", "target_kind"), LOSS_TARGETS, ids=LOSS_TARGET_IDS)
def test_ggn_is_symmetric_psd_with_rank_above_n(loss, target_kind):
    """Unlike the EF, the GGN adds rank(H_n) > 1 per datum."""
    op = fo.GGNOperator(mlp, PARAMS, make_data(target_kind), loss)
    matrix = np.asarray(op.as_matrix())
    assert_close(matrix, matrix.T)
    assert np.linalg.eigvalsh(matrix).min() > -1e-10
    assert np.linalg.matrix_rank(matrix, tol=1e-8 * np.abs(matrix).max()) > N_DATA
