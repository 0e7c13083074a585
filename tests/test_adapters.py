"""Model adapters: an equinox MLP and a Flax NNX MLP give the same curvature as
the same network written as a plain function of a params dict.

The adapters lay the params out differently (equinox stores `W^T`, NNX its own
nesting), so each adapter's matrix is compared with `T F T^T`, where `T` is the
permutation `d adapter_params / d plain_params` (by `jax.jacfwd`, in
`ravel_pytree` order on both sides).
"""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import fisherops as fo

D_IN, HIDDEN, N_OUT, N_DATA = 3, 5, 4, 7
KEY = jax.random.key(3)


def plain_params():
    rng = np.random.default_rng(0)
    return {
        "w1": jnp.asarray(rng.normal(size=(D_IN, HIDDEN))),
        "b1": jnp.asarray(0.5 * rng.normal(size=(HIDDEN,))),
        "w2": jnp.asarray(rng.normal(size=(HIDDEN, N_OUT))),
        "b2": jnp.asarray(0.5 * rng.normal(size=(N_OUT,))),
    }


def plain_mlp(x, p):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def data(loss):
    rng = np.random.default_rng(1)
    inputs = jnp.asarray(rng.normal(size=(N_DATA, D_IN)))
    if loss == "cross_entropy":
        targets = jnp.asarray(rng.integers(0, N_OUT, size=(N_DATA,)))
    elif loss == "mse":
        targets = jnp.asarray(rng.normal(size=(N_DATA, N_OUT)))
    else:
        targets = jnp.asarray(rng.integers(0, 2, size=(N_DATA, N_OUT)), jnp.float64)
    return inputs, targets


def permutation(to_adapter):
    """`T = d ravel(to_adapter(p)) / d ravel(p)` at the plain params."""
    flat, unravel = ravel_pytree(plain_params())
    return np.asarray(
        jax.jacfwd(lambda f: ravel_pytree(to_adapter(unravel(f)))[0])(flat)
    )


def operators(model_fn, params, loss, **kwargs):
    inputs_targets = data(loss)
    return {
        "empirical": fo.EmpiricalFisherOperator(
            model_fn, params, inputs_targets, loss, **kwargs
        ),
        "mc": fo.MCFisherOperator(
            model_fn, params, inputs_targets, loss, KEY, mc_samples=3, **kwargs
        ),
        "ggn": fo.GGNOperator(model_fn, params, inputs_targets, loss, **kwargs),
    }


@eqx.filter_jit
def dense(operators):
    return jax.tree.map(
        lambda operator: operator.as_matrix(),
        operators,
        is_leaf=lambda x: isinstance(x, lx.AbstractLinearOperator),
    )


def assert_same_curvature(model_fn, params, to_adapter, loss, **kwargs):
    transform = permutation(to_adapter)
    np.testing.assert_allclose(
        ravel_pytree(params)[0], transform @ ravel_pytree(plain_params())[0]
    )
    plain = dense(operators(plain_mlp, plain_params(), loss))
    adapted = dense(operators(model_fn, params, loss, **kwargs))
    for kind, matrix in adapted.items():
        expected = transform @ np.asarray(plain[kind]) @ transform.T
        np.testing.assert_allclose(
            matrix, expected, rtol=1e-10, atol=1e-12, err_msg=kind
        )


LOSSES = ["cross_entropy", "mse", "binary_cross_entropy"]

# --------------------------------------------------------------------------
# equinox
# --------------------------------------------------------------------------


def equinox_to_adapter(p):
    return {
        "layers": (
            {"weight": p["w1"].T, "bias": p["b1"]},
            {"weight": p["w2"].T, "bias": p["b2"]},
        )
    }


def equinox_mlp():
    mlp = eqx.nn.MLP(
        D_IN,
        N_OUT,
        HIDDEN,
        depth=1,
        activation=jnp.tanh,
        dtype=jnp.float64,
        key=jax.random.key(0),
    )
    weights = equinox_to_adapter(plain_params())["layers"]
    for i, layer in enumerate(weights):
        mlp = eqx.tree_at(
            lambda m, i=i: (m.layers[i].weight, m.layers[i].bias),
            mlp,
            (layer["weight"], layer["bias"]),
        )
    return mlp


def equinox_weights(params):
    return [leaf for layer in params.layers for leaf in (layer.weight, layer.bias)]


@pytest.mark.parametrize("loss", LOSSES)
def test_equinox_mlp_has_the_plain_function_curvature(loss):
    model_fn, params = fo.from_equinox(equinox_mlp())

    def to_adapter(p):
        weights = equinox_to_adapter(p)["layers"]
        return eqx.tree_at(
            equinox_weights,
            params,
            [leaf for layer in weights for leaf in (layer["weight"], layer["bias"])],
        )

    assert_same_curvature(model_fn, params, to_adapter, loss)


# --------------------------------------------------------------------------
# Flax NNX
# --------------------------------------------------------------------------


def nnx_mlp():
    nnx = pytest.importorskip("flax.nnx", reason="flax is not installed")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(D_IN, HIDDEN, param_dtype=jnp.float64, rngs=rngs)
            self.out = nnx.Linear(HIDDEN, N_OUT, param_dtype=jnp.float64, rngs=rngs)
            self.calls = nnx.Variable(jnp.asarray(0))  # not a parameter
            self.power = nnx.Param(jnp.asarray(1))  # integer: not a parameter

        def __call__(self, x):
            return self.out(jnp.tanh(self.hidden(x))) ** self.power

    module = MLP(nnx.Rngs(0))
    p = plain_params()
    module.hidden.kernel.set_value(p["w1"])
    module.hidden.bias.set_value(p["b1"])
    module.out.kernel.set_value(p["w2"])
    module.out.bias.set_value(p["b2"])
    return module


def nnx_to_adapter(p):
    return {
        "hidden": {"kernel": p["w1"], "bias": p["b1"]},
        "out": {"kernel": p["w2"], "bias": p["b2"]},
    }


@pytest.mark.parametrize(
    ("loss", "vmap_over_data"),
    [(loss, True) for loss in LOSSES] + [("cross_entropy", False)],
)
def test_flax_nnx_mlp_has_the_plain_function_curvature(loss, vmap_over_data):
    module = nnx_mlp()
    model_fn, params = fo.from_flax_nnx(module)
    assert jax.tree.structure(params) == jax.tree.structure(
        nnx_to_adapter(plain_params())
    )
    assert_same_curvature(
        model_fn, params, nnx_to_adapter, loss, vmap_over_data=vmap_over_data
    )


def test_flax_nnx_model_fn_calls_the_module():
    module = nnx_mlp()
    model_fn, params = fo.from_flax_nnx(module)
    x = data("mse")[0]
    np.testing.assert_allclose(model_fn(x[0], params), module(x[0]))
    np.testing.assert_allclose(model_fn(x, params), module(x))
    doubled = jax.tree.map(lambda leaf: 2 * leaf, params)
    assert not np.allclose(model_fn(x, doubled), module(x))


def test_flax_nnx_solve_and_gradient_under_jit():
    """`model_fn` holds no traced arrays: CG under jit, Cholesky under grad."""
    model_fn, params = fo.from_flax_nnx(nnx_mlp())
    inputs_targets = data("cross_entropy")

    def precision(p):
        return fo.GGNOperator(
            model_fn, p, inputs_targets, "cross_entropy"
        ) + fo.PriorPrecision(p, 1.0)

    @jax.jit
    def cg(p):
        return lx.linear_solve(precision(p), p, lx.CG(rtol=1e-12, atol=1e-12)).value

    matrix = np.asarray(dense(precision(params)))
    flat = ravel_pytree(params)[0]
    np.testing.assert_allclose(
        ravel_pytree(cg(params))[0], np.linalg.solve(matrix, flat), rtol=1e-8
    )

    @jax.jit
    @jax.grad
    def objective(p):
        solution = lx.linear_solve(precision(p), p, lx.Cholesky()).value
        return ravel_pytree(solution)[0] @ ravel_pytree(p)[0]

    @jax.jit
    @jax.grad
    def dense_objective(f):
        p = ravel_pytree(params)[1](f)
        return f @ jnp.linalg.solve(precision(p).as_matrix(), f)

    np.testing.assert_allclose(
        ravel_pytree(objective(params))[0],
        dense_objective(flat),
        rtol=1e-8,
    )


def test_from_flax_nnx_rejects_other_objects():
    pytest.importorskip("flax.nnx", reason="flax is not installed")
    with pytest.raises(
        TypeError, match=r"from_flax_nnx needs a flax\.nnx\.Module; got function\."
    ):
        fo.from_flax_nnx(plain_mlp)


def test_from_flax_nnx_refuses_a_module_in_training_mode():
    nnx = pytest.importorskip("flax.nnx", reason="flax is not installed")
    rngs = nnx.Rngs(0)
    module = nnx.Sequential(
        nnx.Linear(D_IN, HIDDEN, rngs=rngs),
        nnx.Dropout(0.5, rngs=rngs),
        nnx.Linear(HIDDEN, N_OUT, rngs=rngs),
    )
    with pytest.raises(
        ValueError,
        match=re.escape(
            "module must be in evaluation mode: the curvature is that of the "
            "deterministic network, and a module in training mode updates its state "
            "on every call; got layers/1 (Dropout, deterministic=False). Call "
            "module.eval() first."
        ),
    ):
        fo.from_flax_nnx(module)
    module.eval()
    model_fn, params = fo.from_flax_nnx(module)
    inputs = jnp.ones((2, D_IN))
    np.testing.assert_allclose(model_fn(inputs[0], params), module(inputs[0]))


def test_flax_nnx_module_that_updates_state_is_reported_at_first_use():
    nnx = pytest.importorskip("flax.nnx", reason="flax is not installed")

    class Counting(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(D_IN, N_OUT, rngs=rngs)
            self.calls = nnx.Variable(jnp.asarray(0))

        def __call__(self, x):
            self.calls[...] += 1
            return self.linear(x)

    model_fn, params = fo.from_flax_nnx(Counting(nnx.Rngs(0)))
    data = (jnp.ones((N_DATA, D_IN)), jnp.zeros(N_DATA, int))
    with pytest.raises(
        ValueError,
        match=r"the Flax module updates its state when called \(.*call "
        r"module\.eval\(\) before fisherops\.from_flax_nnx\(module\)\.",
    ):
        fo.GGNOperator(model_fn, params, data, "cross_entropy")
