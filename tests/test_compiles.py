"""Repeated products and solves with new params or data of the same shapes reuse
one compilation: building an operator inside `jit` traces once per shape."""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
import pytest
from _reference import init_params, make_data, mlp, random_vector

import fisherops as fo

KINDS = ["ef", "mc", "ggn"]


def make_operator(kind, params, data, key, chunk_size):
    if kind == "ef":
        return fo.EmpiricalFisherOperator(
            mlp, params, data, "cross_entropy", chunk_size=chunk_size
        )
    if kind == "mc":
        return fo.MCFisherOperator(
            mlp,
            params,
            data,
            "cross_entropy",
            key,
            mc_samples=2,
            chunk_size=chunk_size,
        )
    return fo.GGNOperator(mlp, params, data, "cross_entropy", chunk_size=chunk_size)


def shifted(tree, amount):
    return jax.tree_util.tree_map(lambda leaf: leaf + amount, tree)


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_mv_and_solve_trace_once(kind, chunk_size):
    @jax.jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def mv_and_solve(params, inputs, targets, key, vector):
        operator = make_operator(kind, params, (inputs, targets), key, chunk_size)
        product = operator.mv(vector)
        precision = operator + fo.PriorPrecision(params, 1.0)
        solution = lx.linear_solve(precision, vector, lx.CG(rtol=1e-8, atol=1e-8))
        return product, solution.value, lx.diagonal(operator)

    params = init_params()
    inputs, targets = make_data("labels")
    vector = random_vector(params)
    first = mv_and_solve(params, inputs, targets, jax.random.key(0), vector)
    # New values of the same shapes and dtypes: no second trace (the decorator
    # raises if there is one), and new numbers.
    second = mv_and_solve(
        shifted(params, 0.1),
        inputs + 1.0,
        (targets + 1) % 3,
        jax.random.key(1),
        shifted(vector, 1.0),
    )
    for before, after in zip(
        jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(second), strict=True
    ):
        assert before.shape == after.shape
        assert not jnp.allclose(before, after)


@pytest.mark.parametrize("kind", KINDS)
def test_linearised_mv_traces_once(kind):
    """The linearised operator passes through `jit` as data: new params, new data
    and new vectors reuse the compiled `mv`."""

    @eqx.filter_jit
    def linearise(params, inputs, targets, key):
        operator = make_operator(kind, params, (inputs, targets), key, None)
        return operator.linearise()

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def mv(linearised, vector):
        return linearised.mv(vector)

    params = init_params()
    inputs, targets = make_data("labels")
    vector = random_vector(params)
    first = mv(linearise(params, inputs, targets, jax.random.key(0)), vector)
    second = mv(
        linearise(shifted(params, 0.1), inputs + 1.0, targets, jax.random.key(1)),
        shifted(vector, 1.0),
    )
    assert not jnp.allclose(
        jax.flatten_util.ravel_pytree(first)[0],
        jax.flatten_util.ravel_pytree(second)[0],
    )
