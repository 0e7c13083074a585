"""Every public object saves and loads (issue 19.8).

Through `eqx.tree_serialise_leaves` into a skeleton built with other arrays (other
params, another key: so the test sees that the arrays were loaded), and through
`pickle`: the loaded object gives the same products, bit for bit.
"""

import functools as ft
import io
import pickle

import equinox as eqx
import jax
import lineax as lx
import numpy as np
import pytest
from _reference import init_params, make_data, mlp, random_vector
from jax.flatten_util import ravel_pytree

import fisherops as fo

DATA = tuple(np.asarray(leaf) for leaf in make_data("labels", n=8))
VECTOR = random_vector(init_params())


def curvature(kind, params, key):
    if kind == "ef":
        return fo.EmpiricalFisherOperator(mlp, params, DATA, "cross_entropy")
    if kind == "mc":
        return fo.MCFisherOperator(mlp, params, DATA, "cross_entropy", key)
    if kind == "mc_raw_key":
        raw = jax.random.key_data(key)
        return fo.MCFisherOperator(mlp, params, DATA, "cross_entropy", raw)
    if kind in ("kfac", "ekfac"):
        kfac = fo.KFACOperator if kind == "kfac" else fo.EKFACOperator
        return kfac(mlp, params, DATA, "cross_entropy", kind="mc", key=key)
    if kind == "hessian":
        return fo.HessianOperator(mlp, params, DATA, "cross_entropy")
    return fo.GGNOperator(mlp, params, DATA, "cross_entropy")


BUILDERS = {
    **{
        kind: ft.partial(curvature, kind)
        for kind in ("ef", "mc", "mc_raw_key", "ggn", "kfac", "ekfac", "hessian")
    },
    "linearised": lambda params, key: curvature("mc", params, key).linearise(),
    "linearised_hessian": lambda params, key: curvature(
        "hessian", params, key
    ).linearise(),
    "materialised": lambda params, key: lx.materialise(curvature("mc", params, key)),
    "prior": lambda params, key: fo.PriorPrecision(params, 1 + jax.random.uniform(key)),
}


def built(name, seed):
    """The object `name`; `seed` sets its params and key."""
    return BUILDERS[name](init_params(seed), jax.random.key(seed))


def saved_and_loaded(tree, skeleton):
    file = io.BytesIO()
    eqx.tree_serialise_leaves(file, tree)
    file.seek(0)
    return eqx.tree_deserialise_leaves(file, skeleton)


def products(operator):
    return np.asarray(ravel_pytree(operator.mv(VECTOR))[0])


@pytest.mark.parametrize("name", BUILDERS)
def test_operators_round_trip(name):
    original = built(name, 0)
    expected = products(original)
    assert not np.array_equal(products(built(name, 1)), expected)
    loaded = saved_and_loaded(original, built(name, 1))
    np.testing.assert_array_equal(products(loaded), expected)
    np.testing.assert_array_equal(
        products(pickle.loads(pickle.dumps(original))), expected
    )


def test_streamed_operator_round_trips():
    """Its params live in `operator_fn` and its data in the loader: a skeleton built
    with the same arguments loads, and it pickles when they do."""

    def streamed():
        operator_fn = ft.partial(
            fo.MCFisherOperator,
            mlp,
            init_params(),
            loss_fn="cross_entropy",
            key=jax.random.key(0),
        )
        halves = [tuple(leaf[:4] for leaf in DATA), tuple(leaf[4:] for leaf in DATA)]
        return fo.StreamedOperator(operator_fn, halves, num_total_samples=100)

    original = streamed()
    expected = products(original)
    np.testing.assert_array_equal(
        products(saved_and_loaded(original, streamed())), expected
    )
    np.testing.assert_array_equal(
        products(pickle.loads(pickle.dumps(original))), expected
    )


def posterior(kind, params, key, prior_precision):
    """A fitted posterior: dense (factorised), KFAC or matrix-free (CG), each on a
    Monte-Carlo curvature (a key to save)."""
    if kind == "kfac":
        curvature = fo.KFACOperator(
            mlp, params, DATA, "cross_entropy", kind="mc", key=key
        )
    else:
        curvature = fo.MCFisherOperator(mlp, params, DATA, "cross_entropy", key)
        if kind == "dense":
            curvature = lx.materialise(curvature)
    fitted = fo.LaplacePosterior(curvature, prior_precision)
    return fitted.factorise() if kind == "dense" else fitted


def samples(fitted):
    draws = fitted.sample(jax.random.key(5), 3)
    return np.asarray(jax.vmap(lambda tree: ravel_pytree(tree)[0])(draws))


@pytest.mark.parametrize("kind", ["dense", "kfac", "cg"])
def test_posteriors_round_trip(kind):
    """Into a skeleton from `eqx.filter_eval_shape` (shapes only, as
    docs/saving.md does) with other params, key and prior: the same samples."""
    original = posterior(kind, init_params(0), jax.random.key(0), 2.0)
    expected = samples(original)
    skeleton = eqx.filter_eval_shape(
        posterior, kind, init_params(1), jax.random.key(1), 1.0
    )
    np.testing.assert_array_equal(
        samples(saved_and_loaded(original, skeleton)), expected
    )
    np.testing.assert_array_equal(
        samples(pickle.loads(pickle.dumps(original))), expected
    )
