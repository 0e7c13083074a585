"""EKFAC against a dense float64 EKFAC built the obvious way.

The reference takes, datum by datum, the gradient of the params along each
column `k` of the likelihood factor `B_n` (`Γ_{n,k} = J_n^T B_n e_k`, with
`jax.jacrev` on the params and `B_n` from the exact operator of the same kind,
so both use the same samples), arranges each layer's part as `[W; b]`
`(D_in (+1), D_out)`, projects it on the eigenvectors `U`, `Q` of the layer's
KFAC factors `A`, `G` (`np.linalg.eigh`; KFAC's factors are checked against their
own dense reference in `test_kfac.py`), and sums the squares:

    E = sum_{n,k} (U^T Γ_{n,k} Q)^2,   block = scale (U ⊗ Q) diag(vec E) (U ⊗ Q)^T,

placed at the `ravel_pytree` indices of `[W; b]` (row-major); params in no layer
get the exact curvature's diagonal.
"""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from _reference import counted_compilations
from jax.flatten_util import ravel_pytree

import fisherops as fo

KEY = jax.random.key(0)


def _normal(key, shape, scale=1.0):
    return scale * jax.random.normal(key, shape)


# A dense layer shared by the 2 positions of a datum (R = 2), a dense layer on the
# flattened positions (R = 1), and an elementwise output scale in no layer.
def shared_mlp(x, p):  # x: (2, 3)
    h = jnp.tanh(x @ p["w0"] + p["b0"])
    return (h.reshape(-1) @ p["w1"] + p["b1"]) * p["s"]


MLP_PARAMS = {
    "w0": _normal(jax.random.key(1), (3, 5)),
    "b0": _normal(jax.random.key(2), (5,)),
    "w1": _normal(jax.random.key(3), (10, 4), 0.5),
    "b1": _normal(jax.random.key(4), (4,)),
    "s": 1 + 0.3 * _normal(jax.random.key(5), (4,)),
}
MLP_DATA = (
    _normal(jax.random.key(6), (7, 2, 3)),
    jax.random.randint(jax.random.key(7), (7,), 0, 4),
)


def mlp_blocks(p):
    return [
        jnp.concatenate([p["w0"], p["b0"][None]]),
        jnp.concatenate([p["w1"], p["b1"][None]]),
    ]


# A 3x3 VALID convolution (OIHW kernel; R = 9 output locations), tanh, dense.
def cnn(x, p):  # x: (2, 5, 5)
    y = jax.lax.conv_general_dilated(x[None], p["k"], (1, 1), "VALID")[0]
    h = jnp.tanh(y + p["c"][:, None, None])
    return h.reshape(-1) @ p["w"] + p["b"]


CNN_PARAMS = {
    "k": _normal(jax.random.key(8), (3, 2, 3, 3), 0.5),
    "c": _normal(jax.random.key(9), (3,)),
    "w": _normal(jax.random.key(10), (27, 4), 0.3),
    "b": _normal(jax.random.key(11), (4,)),
}
CNN_DATA = (
    _normal(jax.random.key(12), (5, 2, 5, 5)),
    jax.random.randint(jax.random.key(13), (5,), 0, 4),
)


def cnn_blocks(p):
    # The patches are (input channel, kh, kw)-ordered: the kernel's (I, kh, kw).
    return [
        jnp.concatenate([p["k"].reshape(3, -1).T, p["c"][None]]),
        jnp.concatenate([p["w"], p["b"][None]]),
    ]


def exact_operator(kind, model_fn, params, data, **kwargs):
    if kind == "ggn":
        return fo.GGNOperator(model_fn, params, data, "cross_entropy", **kwargs)
    if kind == "mc":
        return fo.MCFisherOperator(
            model_fn, params, data, "cross_entropy", KEY, mc_samples=2, **kwargs
        )
    return fo.EmpiricalFisherOperator(model_fn, params, data, "cross_entropy", **kwargs)


def operator(cls, kind, model_fn, params, data, **kwargs):
    extra = {"key": KEY, "mc_samples": 2} if kind == "mc" else {}
    return cls(model_fn, params, data, "cross_entropy", kind=kind, **extra, **kwargs)


def reference_ekfac(model_fn, params, data, exact_matrix, kfac, blocks, b_fn):
    """The dense EKFAC matrix (module docstring); `b_fn(outputs, targets, indices)`
    gives the exact operator's `B_n`."""
    inputs, targets = data

    @jax.jit
    def per_datum_blocks(inputs, targets):
        outputs = jax.vmap(model_fn, in_axes=(0, None))(inputs, params)
        b = b_fn(outputs, targets, jnp.arange(len(targets)))  # (n, O, K)
        jacobians = jax.vmap(jax.jacrev(model_fn, argnums=1), in_axes=(0, None))(
            inputs, params
        )  # leaves (n, O, *leaf)
        gradients = jax.tree_util.tree_map(
            lambda j: jnp.einsum("no...,nok->nk...", j, b), jacobians
        )  # Γ_{n,k}: leaves (n, K, *leaf)
        return jax.vmap(jax.vmap(blocks))(gradients)

    flat, unravel = ravel_pytree(params)
    index = unravel(jnp.arange(flat.size, dtype=flat.dtype))
    index_blocks = [np.asarray(x).astype(int).reshape(-1) for x in blocks(index)]
    matrix = np.diag(np.diag(exact_matrix))  # the params in no layer
    for rows in index_blocks:
        matrix[np.ix_(rows, rows)] = 0.0
    for layer, (gamma, rows) in enumerate(
        zip(per_datum_blocks(inputs, targets), index_blocks, strict=True)
    ):
        _, u = np.linalg.eigh(np.asarray(kfac.input_covariances[layer]))
        _, q = np.linalg.eigh(np.asarray(kfac.gradient_covariances[layer]))
        projected = np.einsum("ip,nkij,jq->nkpq", u, np.asarray(gamma), q)
        values = np.sum(projected**2, axis=(0, 1))
        basis = np.kron(u, q)
        block = (basis * values.reshape(-1)) @ basis.T
        matrix[np.ix_(rows, rows)] = float(kfac.scale) * block
    return matrix, index_blocks


def check_against_reference(op, kfac, exact_matrix, reference, index_blocks):
    """The matrix; each layer block's trace is the exact block's (KFAC's is not);
    the Frobenius distance to the exact matrix is below KFAC's."""
    matrix = np.asarray(op.as_matrix())
    np.testing.assert_allclose(matrix, reference, rtol=1e-10, atol=1e-12)
    kfac_matrix = np.asarray(kfac.as_matrix())
    for rows in index_blocks:
        block = np.ix_(rows, rows)
        exact_trace = np.trace(exact_matrix[block])
        np.testing.assert_allclose(np.trace(matrix[block]), exact_trace, rtol=1e-10)
        assert not np.isclose(np.trace(kfac_matrix[block]), exact_trace)
    ekfac_error = np.linalg.norm(exact_matrix - matrix)
    assert ekfac_error < np.linalg.norm(exact_matrix - kfac_matrix)
    return matrix


def check_products(op, matrix):
    """`mv` on a random vector and the diagonal against the dense matrix."""
    flat, unravel = ravel_pytree(op.params)
    vector = jax.random.normal(jax.random.key(99), flat.shape, flat.dtype)
    np.testing.assert_allclose(
        ravel_pytree(op.mv(unravel(vector)))[0], matrix @ vector, rtol=1e-10
    )
    np.testing.assert_allclose(lx.diagonal(op), np.diag(matrix), rtol=1e-10)


# --------------------------------------------------------------------------- #
# The matrix.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("kind", ["ggn", "mc", "ef"])
def test_shared_mlp_matches_the_dense_ekfac(kind):
    kwargs = {"num_total_samples": 14.0}
    args = (kind, shared_mlp, MLP_PARAMS, MLP_DATA)
    op = operator(fo.EKFACOperator, *args, **kwargs)
    kfac = operator(fo.KFACOperator, *args, **kwargs)
    exact = exact_operator(*args, **kwargs)
    exact_matrix = np.asarray(exact.as_matrix())
    reference, index_blocks = reference_ekfac(
        shared_mlp,
        MLP_PARAMS,
        MLP_DATA,
        exact_matrix,
        kfac,
        mlp_blocks,
        exact._likelihood_factors,
    )
    matrix = check_against_reference(op, kfac, exact_matrix, reference, index_blocks)
    if kind == "ggn":
        check_products(op, matrix)
        assert op.layers == {"w0": 0, "b0": 0, "w1": 1, "b1": 1, "s": None}
        assert "EKFACOperator(kind='ggn', scale=2.0" in repr(op)


def test_cnn_chunked_batched_and_float32():
    """Convolution patches (R = 9); three chunks with the last shifted back and a
    batched model give the same matrix; float32 within its precision."""
    kfac = fo.KFACOperator(cnn, CNN_PARAMS, CNN_DATA, "cross_entropy")
    exact = fo.GGNOperator(cnn, CNN_PARAMS, CNN_DATA, "cross_entropy")
    exact_matrix = np.asarray(exact.as_matrix())
    reference, index_blocks = reference_ekfac(
        cnn,
        CNN_PARAMS,
        CNN_DATA,
        exact_matrix,
        kfac,
        cnn_blocks,
        exact._likelihood_factors,
    )
    op = fo.EKFACOperator(
        jax.vmap(cnn, in_axes=(0, None)),
        CNN_PARAMS,
        CNN_DATA,
        "cross_entropy",
        vmap_over_data=False,
        chunk_size=2,
    )
    matrix = check_against_reference(op, kfac, exact_matrix, reference, index_blocks)
    check_products(op, matrix)
    with jax.enable_x64(False):
        single = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), CNN_PARAMS)
        data = (CNN_DATA[0].astype(jnp.float32), CNN_DATA[1].astype(jnp.int32))
        matrix32 = fo.EKFACOperator(cnn, single, data, "cross_entropy").as_matrix()
    assert matrix32.dtype == jnp.float32
    scale = np.max(np.abs(reference))
    np.testing.assert_allclose(matrix32 / scale, reference / scale, atol=1e-4)


# --------------------------------------------------------------------------- #
# The damped algebra.
# --------------------------------------------------------------------------- #

EKFAC = fo.EKFACOperator(shared_mlp, MLP_PARAMS, MLP_DATA, "cross_entropy")
LAYERWISE = {"w0": 0.3, "b0": 2.0, "w1": 1.1, "b1": 0.5, "s": 0.8}


def test_inverse_logdet_and_square_root_are_those_of_the_dense_matrix():
    """Layerwise prior: a bias precision different from its weight's (the rank-one
    update in the eigenbasis) and a different one on the params in no layer."""
    prior = fo.PriorPrecision(MLP_PARAMS, LAYERWISE)
    damped = np.asarray(EKFAC.as_matrix()) + np.diag(
        ravel_pytree(prior.full_diagonal())[0]
    )
    inverse = np.linalg.inv(damped)
    assert EKFAC.is_exact(prior)
    np.testing.assert_allclose(
        EKFAC.inverse(prior).as_matrix(), inverse, rtol=1e-9, atol=1e-12
    )
    np.testing.assert_allclose(
        lx.diagonal(EKFAC.inverse(prior)), np.diag(inverse), rtol=1e-9
    )
    np.testing.assert_allclose(
        EKFAC.logdet(prior), np.linalg.slogdet(damped)[1], rtol=1e-10
    )
    flat, unravel = ravel_pytree(MLP_PARAMS)
    root = jax.vmap(
        lambda e: ravel_pytree(EKFAC.inverse_sqrt_mv(prior, unravel(e)))[0]
    )(jnp.eye(flat.size)).T
    np.testing.assert_allclose(root @ root.T, inverse, rtol=1e-9, atol=1e-12)
    # A prior that varies within a layer: no exact logdet.
    varying = jax.tree_util.tree_map(lambda p: 1 + 0.1 * jnp.abs(p), MLP_PARAMS)
    assert not EKFAC.is_exact(varying)
    with pytest.raises(ValueError, match="EKFACOperator.logdet is exact only"):
        EKFAC.logdet(varying)


def test_scaling_and_repeated_calls_compile_nothing():
    scaled = 2.5 * EKFAC
    assert isinstance(scaled, fo.EKFACOperator)
    np.testing.assert_allclose(scaled.as_matrix(), 2.5 * EKFAC.as_matrix())

    def calls(shift):
        params = jax.tree_util.tree_map(lambda p: p + shift, MLP_PARAMS)
        data = (MLP_DATA[0] + shift, MLP_DATA[1])
        op = fo.EKFACOperator(shared_mlp, params, data, "cross_entropy")
        prior = fo.PriorPrecision(params, 1.0 + shift)
        return op.mv(params), op.logdet(prior), op.inverse_sqrt_mv(prior, params)

    first = calls(0.0)
    with counted_compilations() as compiles:
        second = calls(0.5)
    assert compiles == []
    assert not np.allclose(first[1], second[1])
