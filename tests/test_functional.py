"""The functional API (laplax.curv.fisher's names) equals the operators."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import (
    LOSS_TARGET_IDS,
    LOSS_TARGETS,
    assert_close,
    assert_like_params,
    batched,
    counted_compilations,
    dense_ef,
    flat,
    init_params,
    make_data,
    mlp,
    model_for,
    per_datum,
    quartic_grad,
    random_vector,
)

import fisherops as fo

PARAMS = init_params()
KEY = jax.random.key(7)
VECTOR = random_vector(PARAMS)


def dense_product(data, loss, factor=1.0, vector=VECTOR):
    return np.asarray(dense_ef(mlp, PARAMS, data, loss, factor)) @ flat(vector)


@pytest.mark.parametrize("vmap_over_data", [True, False], ids=["vmap", "batched"])
@pytest.mark.parametrize(("loss", "target_kind"), LOSS_TARGETS, ids=LOSS_TARGET_IDS)
def test_empirical_fisher_mv(loss, target_kind, vmap_over_data):
    data = make_data(target_kind)
    model_fn = model_for(vmap_over_data)
    mv = fo.create_empirical_fisher_mv(
        model_fn, PARAMS, data, loss, vmap_over_data=vmap_over_data
    )
    product = mv(VECTOR)
    assert_like_params(product, PARAMS)
    assert_close(flat(product), dense_product(data, loss))
    op = fo.EmpiricalFisherOperator(
        model_fn, PARAMS, data, loss, vmap_over_data=vmap_over_data
    )
    assert_close(flat(product), flat(op.mv(VECTOR)))


@pytest.mark.parametrize("vmap_over_data", [True, False], ids=["vmap", "batched"])
def test_empirical_fisher_mv_scaling_and_loss_grad_fn(vmap_over_data):
    data = make_data("vector")
    guard = per_datum if vmap_over_data else batched
    mv = fo.create_empirical_fisher_mv(
        model_for(vmap_over_data),
        PARAMS,
        data,
        num_curv_samples=5,
        num_total_samples=12,
        vmap_over_data=vmap_over_data,
        loss_grad_fn=guard(quartic_grad),
    )
    assert_close(flat(mv(VECTOR)), dense_product(data, "quartic", 12 / 5))


def test_empirical_fisher_mv_under_jit():
    data = make_data("labels")
    mv = fo.create_empirical_fisher_mv(mlp, PARAMS, data, "cross_entropy")
    assert_close(flat(jax.jit(mv)(VECTOR)), dense_product(data, "cross_entropy"))


@pytest.mark.parametrize("vmap_over_data", [True, False], ids=["vmap", "batched"])
@pytest.mark.parametrize(("loss", "target_kind"), LOSS_TARGETS, ids=LOSS_TARGET_IDS)
def test_empirical_fisher_mv_without_data(loss, target_kind, vmap_over_data):
    """mv(v, data) = factor * sum over the batch given at call time."""
    mv = fo.create_empirical_fisher_mv_without_data(
        model_for(vmap_over_data), PARAMS, loss, 0.7, vmap_over_data=vmap_over_data
    )
    for seed in (1, 11):  # two different batches through the same mv
        data = make_data(target_kind, seed=seed)
        product = mv(VECTOR, data)
        assert_like_params(product, PARAMS)
        assert_close(flat(product), dense_product(data, loss, 0.7))


def test_empirical_fisher_mv_without_data_is_jittable_in_data():
    mv = fo.create_empirical_fisher_mv_without_data(mlp, PARAMS, "mse", 2.0)
    jitted = jax.jit(mv)
    for seed in (1, 11):
        data = make_data("vector", seed=seed)
        assert_close(flat(jitted(VECTOR, data)), dense_product(data, "mse", 2.0))


@pytest.mark.parametrize("vmap_over_data", [True, False], ids=["vmap", "batched"])
def test_empirical_fisher_mv_without_data_loss_grad_fn(vmap_over_data):
    guard = per_datum if vmap_over_data else batched
    mv = fo.create_empirical_fisher_mv_without_data(
        model_for(vmap_over_data),
        PARAMS,
        None,
        3.0,
        vmap_over_data=vmap_over_data,
        loss_grad_fn=guard(quartic_grad),
    )
    data = make_data("vector")
    assert_close(flat(mv(VECTOR, data)), dense_product(data, "quartic", 3.0))


@pytest.mark.parametrize("vmap_over_data", [True, False], ids=["vmap", "batched"])
@pytest.mark.parametrize(("loss", "target_kind"), LOSS_TARGETS, ids=LOSS_TARGET_IDS)
def test_mc_fisher_mv(loss, target_kind, vmap_over_data):
    """The functional form is the operator's mv (whose dense checks over every
    mc_samples are in test_mc.py); M = 3 here."""
    mc_samples = 3
    data = make_data(target_kind)
    model_fn = model_for(vmap_over_data)
    kwargs = {"vmap_over_data": vmap_over_data, "mc_samples": mc_samples}
    mv = fo.create_MC_fisher_mv(model_fn, PARAMS, data, loss, KEY, **kwargs)
    op = fo.MCFisherOperator(model_fn, PARAMS, data, loss, KEY, **kwargs)
    product = mv(VECTOR)
    assert_like_params(product, PARAMS)
    assert_close(flat(product), flat(op.mv(VECTOR)))
    np.testing.assert_array_equal(flat(mv(VECTOR)), flat(product))


def test_mc_fisher_mv_scaling():
    data = make_data("labels")
    plain = fo.create_MC_fisher_mv(mlp, PARAMS, data, "cross_entropy", KEY)
    scaled = fo.create_MC_fisher_mv(
        mlp,
        PARAMS,
        data,
        "cross_entropy",
        KEY,
        num_curv_samples=4,
        num_total_samples=10,
    )
    assert_close(flat(scaled(VECTOR)), 2.5 * flat(plain(VECTOR)))


@pytest.mark.parametrize("vmap_over_data", [True, False], ids=["vmap", "batched"])
@pytest.mark.parametrize(
    ("loss", "target_kind"),
    [
        ("mse", "vector"),
        ("cross_entropy", "labels"),
        ("binary_cross_entropy", "binary"),
    ],
)
def test_mc_fisher_mv_without_data(loss, target_kind, vmap_over_data):
    """mv(v, data) = factor * (the MC operator on that data with the same key)."""
    mc_samples = 2
    model_fn = model_for(vmap_over_data)
    kwargs = {"vmap_over_data": vmap_over_data, "mc_samples": mc_samples}
    mv = fo.create_MC_fisher_mv_without_data(model_fn, PARAMS, loss, KEY, 0.7, **kwargs)
    data = make_data(target_kind)
    op = fo.MCFisherOperator(model_fn, PARAMS, data, loss, KEY, **kwargs)
    product = mv(VECTOR, data)
    assert_like_params(product, PARAMS)
    assert_close(flat(product), 0.7 * flat(op.mv(VECTOR)))
    unit = fo.create_MC_fisher_mv_without_data(
        model_fn, PARAMS, loss, KEY, 1.0, **kwargs
    )
    assert_close(flat(product), 0.7 * flat(unit(VECTOR, data)))


def test_mc_fisher_mv_without_data_is_jittable_in_data():
    mv = fo.create_MC_fisher_mv_without_data(
        mlp, PARAMS, "cross_entropy", KEY, 1.0, mc_samples=2
    )
    data = make_data("labels")
    assert_close(flat(jax.jit(mv)(VECTOR, data)), flat(mv(VECTOR, data)))


def test_functions_are_linear():
    data = make_data("labels")
    mv = fo.create_empirical_fisher_mv(mlp, PARAMS, data, "cross_entropy")
    other = random_vector(PARAMS, seed=9)
    combined = jax.tree.map(lambda a, b: 2.0 * a - b, VECTOR, other)
    assert_close(flat(mv(combined)), 2.0 * flat(mv(VECTOR)) - flat(mv(other)))
    zero = jax.tree.map(jnp.zeros_like, VECTOR)
    assert_close(flat(mv(zero)), 0.0)


def test_repeated_eager_calls_compile_nothing():
    """Each closure (chunked too), called again with new arrays of the same shapes
    and rebuilt from the same functions, compiles nothing after its first call."""
    data = make_data("labels")
    other_data = make_data("labels", seed=5)
    other_vector = random_vector(PARAMS, seed=9)
    with_data = {
        "ef": lambda: fo.create_empirical_fisher_mv(mlp, PARAMS, data, "cross_entropy"),
        "ef_chunked": lambda: fo.create_empirical_fisher_mv(
            mlp, PARAMS, data, "cross_entropy", chunk_size=1
        ),
        "mc": lambda: fo.create_MC_fisher_mv(
            mlp, PARAMS, data, "cross_entropy", KEY, mc_samples=2
        ),
    }
    without_data = {
        "ef": lambda: fo.create_empirical_fisher_mv_without_data(
            mlp, PARAMS, "cross_entropy", 2.0
        ),
        "mc": lambda: fo.create_MC_fisher_mv_without_data(
            mlp, PARAMS, "cross_entropy", KEY, 2.0, chunk_size=1
        ),
    }
    for make in with_data.values():
        make()(VECTOR)
    for make in without_data.values():
        make()(VECTOR, data)
    with counted_compilations() as events:
        for make in with_data.values():
            make()(other_vector)
        for make in without_data.values():
            make()(other_vector, other_data)
    assert events == []
