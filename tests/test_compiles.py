"""Compiled once: repeated eager calls of every operator method with new arrays of
the same shapes compile nothing, and building an operator inside `jit` traces
once per shape."""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
import pytest
from _reference import (
    counted_compilations,
    init_params,
    make_data,
    mlp,
    random_vector,
)

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


METHODS = {
    "mv": lambda op, vector, coefficients: op.mv(vector),
    "sqrt_mv": lambda op, vector, coefficients: op.sqrt_mv(coefficients),
    "as_matrix": lambda op, vector, coefficients: op.as_matrix(),
    "diagonal": lambda op, vector, coefficients: op.diagonal(),
    "linearise": lambda op, vector, coefficients: op.linearise(),
    "linearised.mv": lambda op, vector, coefficients: op.linearise().mv(vector),
    "linearised.sqrt_mv": lambda op, vector, coefficients: op.linearise().sqrt_mv(
        coefficients
    ),
    "linearised.diagonal": lambda op, vector, coefficients: op.linearise().diagonal(),
    "lineax.diagonal": lambda op, vector, coefficients: lx.diagonal(op),
}


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["unchunked", "chunk2"])
@pytest.mark.parametrize("kind", KINDS)
def test_repeated_eager_calls_compile_once(kind, chunk_size):
    """Three eager calls of each method, each on a NEW operator built from new
    params, data, key and vector of the same shapes: only the first compiles."""
    params = init_params()
    inputs, targets = make_data("labels")
    vector = random_vector(params)
    counts = {}
    for name, method in METHODS.items():
        counts[name] = []
        for call in range(3):
            operator = make_operator(
                kind,
                shifted(params, 0.1 * call),
                (inputs + call, (targets + call) % 3),
                jax.random.key(call),
                chunk_size,
            )
            coefficients = jnp.full(operator.sqrt_shape(), 1.0 + call)
            with counted_compilations() as compilations:
                jax.block_until_ready(method(operator, vector, coefficients))
            counts[name].append(len(compilations))
    assert all(later == [0, 0] for _, *later in counts.values()), counts


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
