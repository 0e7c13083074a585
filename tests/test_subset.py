"""Subset-of-weights curvature and Laplace: `fisherops.subset` and `last_layer`.

The reference is the full network's dense matrix (float64, from `jax.jacfwd`)
restricted to the selected rows and columns.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import (
    assert_close,
    check_operator,
    dense_ef,
    dense_ggn,
    flat,
    init_params,
    jacobian,
    make_data,
    mlp,
)

import fisherops as fo

DATA = make_data("labels", n=6)


def selected(params, params_sub):
    """Indices into `ravel_pytree(params)` of the leaves kept in `params_sub`."""
    pairs = zip(
        jax.tree.leaves(params, is_leaf=lambda x: x is None),
        jax.tree.leaves(params_sub, is_leaf=lambda x: x is None),
        strict=True,
    )
    mask = [
        np.full(leaf.size, sub is not None) for leaf, sub in pairs if leaf is not None
    ]
    return np.flatnonzero(np.concatenate(mask))


def restricted(matrix, index):
    return np.asarray(matrix)[np.ix_(index, index)]


def equinox_model():
    mlp = eqx.nn.MLP(
        3, 3, 4, depth=1, activation=jnp.tanh, dtype=jnp.float64, key=jax.random.key(0)
    )
    return fo.from_equinox(mlp)


def flax_model():
    nnx = pytest.importorskip("flax.nnx")
    rngs = nnx.Rngs(0)
    module = nnx.Sequential(
        nnx.Linear(3, 4, param_dtype=jnp.float64, rngs=rngs),
        nnx.tanh,
        nnx.Linear(4, 3, param_dtype=jnp.float64, rngs=rngs),
    )
    return fo.from_flax_nnx(module)


def first_weight_only(params):
    """An equinox-style filter_spec: a pytree of bools made with eqx.tree_at."""
    spec = jax.tree.map(lambda _: False, params)
    return eqx.tree_at(lambda p: p.layers[0].weight, spec, True)


CASES = {  # model, filter_spec: a pytree of bools or one callable
    "plain-last-layer": (lambda: (mlp, init_params()), fo.last_layer),
    "plain-biases": (lambda: (mlp, init_params()), lambda _: lambda x: x.ndim == 1),
    "equinox-first-weight": (equinox_model, first_weight_only),
    "flax-last-layer": (flax_model, fo.last_layer),
}


@pytest.mark.parametrize("case", CASES)
def test_ggn_on_a_subset_is_the_restricted_full_ggn(case):
    make_model, make_spec = CASES[case]
    model_fn, params = make_model()
    model_fn_sub, params_sub, combine = fo.subset(model_fn, params, make_spec(params))
    index = selected(params, params_sub)
    assert 0 < index.size < flat(params).size

    full = dense_ggn(model_fn, params, DATA, "cross_entropy")
    ggn = fo.GGNOperator(model_fn_sub, params_sub, DATA, "cross_entropy")
    # mv, linearise, diagonal once; the matrix for every case.
    check_operator(
        ggn, restricted(full, index), params_sub, full=case == "plain-last-layer"
    )

    x = DATA[0][0]
    assert_close(model_fn_sub(x, params_sub), model_fn(x, params))
    assert_close(flat(combine(params_sub)), flat(params))


def test_fishers_on_the_last_layer():
    params = init_params()
    model_fn_sub, params_sub, _ = fo.subset(mlp, params, fo.last_layer(params))
    index = selected(params, params_sub)
    assert index.size == 4 * 3 + 3
    full_ef = dense_ef(mlp, params, DATA, "cross_entropy")
    ef = fo.EmpiricalFisherOperator(model_fn_sub, params_sub, DATA, "cross_entropy")
    check_operator(ef, restricted(full_ef, index), params_sub, full=False)

    key = jax.random.key(3)
    full_mc = fo.MCFisherOperator(mlp, params, DATA, "cross_entropy", key, mc_samples=3)
    mc = fo.MCFisherOperator(
        model_fn_sub, params_sub, DATA, "cross_entropy", key, mc_samples=3
    )
    assert_close(mc.as_matrix(), restricted(full_mc.as_matrix(), index))


def test_last_layer_posterior_and_predictive():
    """Variance `J_sub (C_sub + λ I)^{-1} J_sub^T` with `J_sub` the full network's
    Jacobian columns of the last layer; samples put back into the full params."""
    params = init_params()
    model_fn_sub, params_sub, combine = fo.subset(mlp, params, fo.last_layer(params))
    index = selected(params, params_sub)
    ggn = fo.GGNOperator(model_fn_sub, params_sub, DATA, "cross_entropy")
    posterior = fo.LaplacePosterior(ggn, 2.0)

    precision = restricted(dense_ggn(mlp, params, DATA, "cross_entropy"), index)
    covariance = np.linalg.inv(precision + 2.0 * np.eye(index.size))
    x_new = DATA[0][:2] + 0.5
    expected = [
        np.diag(jac @ covariance @ jac.T)
        for jac in (np.asarray(jacobian(mlp, params, x))[:, index] for x in x_new)
    ]
    mean, variance = posterior.predictive(x_new, approximation="none")
    assert_close(variance, np.stack(expected))
    assert_close(mean, jax.vmap(mlp, (0, None))(x_new, params))

    samples = jax.vmap(combine)(posterior.sample(jax.random.key(1), 2))
    for leaf, sample in zip(
        jax.tree.leaves(params["layer1"]),
        jax.tree.leaves(samples["layer1"]),
        strict=True,
    ):
        assert_close(sample, jnp.broadcast_to(leaf, sample.shape))
    assert not np.allclose(samples["layer2"][0], params["layer2"][0])


def test_last_layer_of_equinox_and_flax_models():
    _, params = equinox_model()
    spec = fo.last_layer(params)
    assert spec.layers[-1].weight and spec.layers[-1].bias
    assert not (spec.layers[0].weight or spec.layers[0].bias)
    _, params = flax_model()
    spec = fo.last_layer(params)
    assert spec["layers"][2] == {"bias": True, "kernel": True}
    assert spec["layers"][0] == {"bias": False, "kernel": False}


def test_bad_filters_say_what_is_wrong():
    params = init_params()
    with pytest.raises(ValueError, match="selects no params"):
        fo.subset(mlp, params, False)
    with pytest.raises(ValueError, match="top level"):
        fo.last_layer({"w1": jnp.ones(2), "w2": jnp.ones(2)})
    with pytest.raises(TypeError, match="model_fn must be a callable"):
        fo.subset("mlp", params, True)
