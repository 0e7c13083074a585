"""Models and likelihoods beyond the built-in MLP: equinox modules, other params
pytrees, dtypes, and user likelihoods."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from _reference import (
    D_IN,
    N_OUT,
    assert_close,
    assert_like_params,
    check_operator,
    dense_ef,
    dense_ggn,
    flat,
    init_params,
    jacobian,
    make_data,
    make_inputs,
    mlp,
    random_vector,
)

import fisherops as fo

KEY = jax.random.key(0)


def dense_from_output_terms(model_fn, params, inputs, term):
    """sum_n J_n^T term(f_n, n) J_n."""
    total = 0.0
    for n, x in enumerate(inputs):
        jac = jacobian(model_fn, params, x)
        total = total + jac.T @ term(model_fn(x, params), n) @ jac
    return np.asarray(total)


def mc_mean_over_keys(model_fn, params, data, loss_fn, mc_samples, num_keys):
    @jax.jit
    def mean(keys):
        def one(key):
            op = fo.MCFisherOperator(
                model_fn, params, data, loss_fn, key, mc_samples=mc_samples
            )
            return op.as_matrix()

        return jnp.mean(jax.vmap(one)(keys), axis=0)

    return np.asarray(mean(jax.random.split(jax.random.key(99), num_keys)))


def relative_error(estimate, exact):
    return np.linalg.norm(estimate - exact) / np.linalg.norm(exact)


# --------------------------------------------------------------------------
# equinox
# --------------------------------------------------------------------------


def equinox_mlp():
    return eqx.nn.MLP(
        D_IN,
        N_OUT,
        width_size=4,
        depth=1,
        activation=jax.nn.tanh,
        dtype=jnp.float64,
        key=jax.random.key(5),
    )


def test_from_equinox_mlp():
    module = equinox_mlp()
    model_fn, params = fo.from_equinox(module)
    assert all(
        isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.inexact)
        for leaf in jax.tree.leaves(params)
    )
    assert flat(params).size == 3 * 4 + 4 + 4 * 3 + 3
    x = make_inputs()[0]
    assert_close(model_fn(x, params), module(x))
    doubled = jax.tree.map(lambda leaf: 2.0 * leaf, params)
    assert not np.allclose(model_fn(x, doubled), module(x))


@pytest.mark.parametrize(
    ("loss", "target_kind"),
    [
        ("cross_entropy", "labels"),
        ("mse", "vector"),
        ("binary_cross_entropy", "binary"),
    ],
)
def test_equinox_mlp_operators_match_dense(loss, target_kind):
    model_fn, params = fo.from_equinox(equinox_mlp())
    data = make_data(target_kind)
    empirical = fo.EmpiricalFisherOperator(model_fn, params, data, loss)
    check_operator(empirical, dense_ef(model_fn, params, data, loss), params)
    ggn = fo.GGNOperator(model_fn, params, data, loss)
    check_operator(ggn, dense_ggn(model_fn, params, data, loss), params)
    mc = fo.MCFisherOperator(model_fn, params, data, loss, KEY, chunk_size=2)
    assert_like_params(mc.mv(random_vector(params)), params)


class _TinyNet(eqx.Module):
    """A module with an integer array, a static field and a function field."""

    weight: jax.Array
    bias: jax.Array
    power: jax.Array  # integer: not a parameter
    activation: object
    name: str = eqx.field(static=True)

    def __call__(self, x):
        hidden = self.activation(x @ self.weight + self.bias)
        return hidden**self.power


def test_from_equinox_drops_non_floating_leaves():
    rng = np.random.default_rng(4)
    module = _TinyNet(
        weight=jnp.asarray(rng.normal(size=(D_IN, N_OUT))),
        bias=jnp.asarray(rng.normal(size=(N_OUT,))),
        power=jnp.asarray(3),
        activation=jnp.sin,
        name="tiny",
    )
    model_fn, params = fo.from_equinox(module)
    assert flat(params).size == D_IN * N_OUT + N_OUT
    data = make_data("vector")
    assert_close(model_fn(data[0][1], params), module(data[0][1]))
    op = fo.EmpiricalFisherOperator(model_fn, params, data, "mse")
    check_operator(op, dense_ef(model_fn, params, data, "mse"), params)


def test_equinox_batched_module_without_vmap():
    """A module that takes batches works with vmap_over_data=False."""
    rng = np.random.default_rng(6)
    module = _TinyNet(
        weight=jnp.asarray(rng.normal(size=(D_IN, N_OUT))),
        bias=jnp.asarray(rng.normal(size=(N_OUT,))),
        power=jnp.asarray(1),
        activation=jnp.tanh,
        name="batched",
    )
    model_fn, params = fo.from_equinox(module)
    data = make_data("labels")
    op = fo.GGNOperator(model_fn, params, data, "cross_entropy", vmap_over_data=False)
    check_operator(op, dense_ggn(model_fn, params, data, "cross_entropy"), params)


def test_equinox_end_to_end_solve():
    model_fn, params = fo.from_equinox(equinox_mlp())
    data = make_data("labels")
    posterior = fo.GGNOperator(model_fn, params, data, "cross_entropy")
    posterior = posterior + fo.PriorPrecision(params, 1.0)
    rhs = random_vector(params)
    solution = lx.linear_solve(posterior, rhs, lx.CG(rtol=1e-10, atol=1e-10)).value
    matrix = np.asarray(dense_ggn(model_fn, params, data, "cross_entropy"))
    expected = np.linalg.solve(matrix + np.eye(matrix.shape[0]), flat(rhs))
    assert_close(flat(solution), expected, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------
# params pytrees and dtypes
# --------------------------------------------------------------------------


def _linear_tanh(x, weight):
    return jnp.tanh(x @ jnp.reshape(weight, (D_IN, N_OUT)))


def _list_mlp(x, params):
    w1, b1, w2, b2 = params
    return jnp.tanh(x @ w1 + b1) @ w2 + b2


@pytest.mark.parametrize(
    ("layout", "vmap_over_data"),
    [("array", True), ("list", True), ("list", False)],
    ids=["array-vmap", "list-vmap", "list-batched"],
)
def test_other_params_pytrees(layout, vmap_over_data):
    if layout == "array":
        model_fn = _linear_tanh
        params = jnp.asarray(np.random.default_rng(0).normal(size=(D_IN * N_OUT,)))
    else:
        model_fn = _list_mlp
        nested = init_params()
        params = [*nested["layer1"].values(), *nested["layer2"]]
    data = make_data("labels")
    kwargs = {"vmap_over_data": vmap_over_data}
    for operator, reference, full in (
        (fo.EmpiricalFisherOperator, dense_ef, False),
        (fo.GGNOperator, dense_ggn, True),
    ):
        op = operator(model_fn, params, data, "cross_entropy", **kwargs)
        expected = reference(model_fn, params, data, "cross_entropy")
        check_operator(op, expected, params, full=full)


@pytest.mark.parametrize("kind", ["empirical", "mc", "ggn"])
def test_float32_params_give_float32_operator(kind):
    params64 = init_params()
    params = jax.tree.map(lambda leaf: leaf.astype(jnp.float32), params64)
    inputs, targets = make_data("labels")
    data = (inputs.astype(jnp.float32), targets)
    if kind == "empirical":
        op = fo.EmpiricalFisherOperator(mlp, params, data, "cross_entropy")
    elif kind == "mc":
        op = fo.MCFisherOperator(mlp, params, data, "cross_entropy", KEY)
    else:
        op = fo.GGNOperator(mlp, params, data, "cross_entropy")
    for leaf in jax.tree.leaves(op.in_structure()):
        assert leaf.dtype == jnp.float32
    vector = random_vector(params)
    assert_like_params(op.mv(vector), params)
    assert op.as_matrix().dtype == jnp.float32
    if kind != "mc":
        reference = dense_ef if kind == "empirical" else dense_ggn
        expected = reference(mlp, params64, (inputs, targets), "cross_entropy")
        assert_close(op.as_matrix(), expected, rtol=1e-4, atol=1e-5)


def test_weak_typed_params_give_strong_structure():
    params = jax.jit(lambda: {"w": jnp.ones((D_IN, N_OUT)) * 0.3, "s": 0.5})()
    assert params["s"].weak_type

    def model_fn(x, p):
        return p["s"] * jnp.tanh(x @ p["w"])

    data = make_data("vector")
    op = fo.EmpiricalFisherOperator(model_fn, params, data, "mse")
    for leaf in jax.tree.leaves(op.in_structure()):
        assert not leaf.weak_type
    strong = jax.tree.map(lambda leaf: jnp.asarray(leaf, dtype=jnp.float64), params)
    check_operator(op, dense_ef(model_fn, strong, data, "mse"), strong)


# --------------------------------------------------------------------------
# user likelihoods
# --------------------------------------------------------------------------

SIGMA = 0.5


def gaussian_loss(f, y):
    return jnp.sum((f - y) ** 2) / (2 * SIGMA**2)


def gaussian_likelihood(with_grad=False):
    """N(f, SIGMA^2 I): g = (f - y) / SIGMA^2, H = I / SIGMA^2."""
    return fo.Likelihood(
        gaussian_loss,
        sample=lambda key, f: f + SIGMA * jax.random.normal(key, f.shape, f.dtype),
        output_grad=(lambda f, y: (f - y) / SIGMA**2) if with_grad else None,
        hessian_sqrt=lambda f, y: jnp.eye(f.shape[0], dtype=f.dtype) / SIGMA,
    )


@pytest.mark.parametrize(
    ("with_grad", "vmap_over_data"),
    [(False, True), (True, True), (False, False)],
    ids=["autodiff-vmap", "output_grad-vmap", "autodiff-batched"],
)
def test_gaussian_likelihood(with_grad, vmap_over_data):
    likelihood = gaussian_likelihood(with_grad)
    assert isinstance(likelihood, fo.AbstractLikelihood)
    params = init_params()
    inputs, targets = make_data("vector")
    kwargs = {"vmap_over_data": vmap_over_data}

    def ef_term(f, n):
        g = (f - targets[n]) / SIGMA**2
        return jnp.outer(g, g)

    def ggn_term(f, n):
        return jnp.eye(f.shape[0]) / SIGMA**2

    ef = fo.EmpiricalFisherOperator(
        mlp, params, (inputs, targets), likelihood, **kwargs
    )
    check_operator(ef, dense_from_output_terms(mlp, params, inputs, ef_term), params)
    ggn = fo.GGNOperator(mlp, params, (inputs, targets), likelihood, **kwargs)
    check_operator(ggn, dense_from_output_terms(mlp, params, inputs, ggn_term), params)


def test_gaussian_likelihood_mc_is_unbiased():
    params = init_params()
    inputs, targets = make_data("vector")
    likelihood = gaussian_likelihood()
    estimate = mc_mean_over_keys(mlp, params, (inputs, targets), likelihood, 2, 1000)
    exact = dense_from_output_terms(
        mlp, params, inputs, lambda f, n: jnp.eye(f.shape[0]) / SIGMA**2
    )
    assert relative_error(estimate, exact) < 0.1


def sum_likelihood():
    """A scalar target per datum: c = (sum(f) - y)^2 / 2, so H = 1 1^T (K = 1)."""
    return fo.Likelihood(
        lambda f, y: 0.5 * (jnp.sum(f) - y) ** 2,
        sample=lambda key, f: jnp.sum(f) + jax.random.normal(key, (), f.dtype),
        hessian_sqrt=lambda f, y: jnp.ones((f.shape[0], 1), f.dtype),
    )


@pytest.mark.parametrize("vmap_over_data", [True, False], ids=["vmap", "batched"])
def test_likelihood_with_scalar_targets_and_thin_hessian_sqrt(vmap_over_data):
    params = init_params()
    inputs = make_inputs()
    targets = jnp.asarray(np.random.default_rng(8).normal(size=(inputs.shape[0],)))
    data = (inputs, targets)
    likelihood = sum_likelihood()
    kwargs = {"vmap_over_data": vmap_over_data}
    ones = jnp.ones((N_OUT, N_OUT))

    ef = fo.EmpiricalFisherOperator(mlp, params, data, likelihood, **kwargs)
    expected = dense_from_output_terms(
        mlp, params, inputs, lambda f, n: (jnp.sum(f) - targets[n]) ** 2 * ones
    )
    check_operator(ef, expected, params)

    ggn = fo.GGNOperator(mlp, params, data, likelihood, **kwargs)
    expected = dense_from_output_terms(mlp, params, inputs, lambda f, n: ones)
    check_operator(ggn, expected, params)
    assert (
        np.linalg.matrix_rank(np.asarray(ggn.as_matrix()), tol=1e-8) <= inputs.shape[0]
    )

    mc = fo.MCFisherOperator(mlp, params, data, likelihood, KEY, mc_samples=3, **kwargs)
    reference = fo.MCFisherOperator(mlp, params, data, likelihood, KEY, mc_samples=3)
    check_operator(mc, reference.as_matrix(), params, full=False)


def test_scalar_target_likelihood_mc_is_unbiased():
    params = init_params()
    inputs = make_inputs()
    targets = jnp.zeros((inputs.shape[0],))
    estimate = mc_mean_over_keys(
        mlp, params, (inputs, targets), sum_likelihood(), 1, 2000
    )
    exact = dense_from_output_terms(
        mlp, params, inputs, lambda f, n: jnp.ones((N_OUT, N_OUT))
    )
    assert relative_error(estimate, exact) < 0.1


def test_builtin_names_equal_their_likelihood_written_out():
    """A Likelihood with the mse formulas gives the same EF and GGN as "mse"."""
    likelihood = fo.Likelihood(
        lambda f, y: jnp.sum((f - y) ** 2),
        sample=lambda key, f: f + jnp.sqrt(0.5) * jax.random.normal(key, f.shape),
        hessian_sqrt=lambda f, y: jnp.sqrt(2.0) * jnp.eye(f.shape[0]),
    )
    params = init_params()
    data = make_data("vector")
    for operator in (fo.EmpiricalFisherOperator, fo.GGNOperator):
        assert_close(
            operator(mlp, params, data, likelihood).as_matrix(),
            operator(mlp, params, data, "mse").as_matrix(),
        )
