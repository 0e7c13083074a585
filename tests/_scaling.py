"""The problem the sharding, multi-process and streaming tests share.

64 data points (a multiple of 8 devices), a 31-parameter MLP, cross-entropy.
Importing this module needs float64 enabled first (the conftest does it).
"""

import functools as ft

import jax
import lineax as lx
import numpy as np
from _reference import dense_ef, dense_ggn, init_params, make_data, mlp, random_vector
from jax.flatten_util import ravel_pytree

import fisherops as fo

NUM_DATA = 64
KINDS = ("ef", "mc", "ggn")
KEY = jax.random.key(11)
MC_SAMPLES = 3
PARAMS = init_params()
DATA = make_data("labels", n=NUM_DATA)
VECTOR = random_vector(PARAMS)
PRIOR = 1.0


def operator(kind, data, chunk_size=None, **kwargs):
    """The curvature operator of one kind on `data`."""
    if kind == "ef":
        return fo.EmpiricalFisherOperator(
            mlp, PARAMS, data, "cross_entropy", chunk_size=chunk_size, **kwargs
        )
    if kind == "mc":
        return fo.MCFisherOperator(
            mlp,
            PARAMS,
            data,
            "cross_entropy",
            KEY,
            mc_samples=MC_SAMPLES,
            chunk_size=chunk_size,
            **kwargs,
        )
    return fo.GGNOperator(
        mlp, PARAMS, data, "cross_entropy", chunk_size=chunk_size, **kwargs
    )


def mv(kind, inputs, targets, chunk_size=None):
    """One matrix-vector product, flattened: jit it with the data as arguments."""
    return ravel_pytree(operator(kind, (inputs, targets), chunk_size).mv(VECTOR))[0]


def quantities(kind, inputs, targets, chunk_size=None):
    """`as_matrix`, `diagonal` and a CG solve with the prior: jit it like `mv`.

    lineax's CG linearises the operator first, so the solve runs the
    `linearise()`d operator's `mv`.
    """
    op = operator(kind, (inputs, targets), chunk_size)
    solve = lx.linear_solve(
        op + fo.PriorPrecision(PARAMS, PRIOR),
        VECTOR,
        lx.CG(rtol=1e-12, atol=1e-12, max_steps=200),
    )
    return {
        "as_matrix": op.as_matrix(),
        "diagonal": lx.diagonal(op),
        "cg": ravel_pytree(solve.value)[0],
    }


@ft.cache
def expected(kind):
    """The same, unsharded, from the dense matrix of one device.

    The dense references for EF and GGN; for MC the unsharded, unchunked operator
    (its samples are the ones every sharding and chunking must reproduce).
    """
    if kind == "ef":
        matrix = dense_ef(mlp, PARAMS, DATA, "cross_entropy")
    elif kind == "ggn":
        matrix = dense_ggn(mlp, PARAMS, DATA, "cross_entropy")
    else:
        matrix = jax.jit(lambda: operator("mc", DATA).as_matrix())()
    matrix = np.asarray(matrix)
    vector = np.asarray(ravel_pytree(VECTOR)[0])
    return {
        "mv": matrix @ vector,
        "as_matrix": matrix,
        "diagonal": np.diag(matrix),
        "cg": np.linalg.solve(matrix + PRIOR * np.eye(len(vector)), vector),
    }
