"""KFAC against dense float64 references built the obvious way.

The reference computes, datum by datum, each layer's input `a_{n,r}` (a 1
appended for the bias) and the backpropagation `g_{n,r,k} = J_{y,n}^T B_n e_k` of
the likelihood factor to the layer output `y` (by `jax.jacrev` with respect to an
additive tap on `y`), then

    A = 1/(N R) sum_{n,r} a a^T,   G = sum_{n,r,k} g g^T,   block = scale A ⊗ G

placed at the `ravel_pytree` indices of `[W; b]` (row-major). `B_n` comes from
the exact operator of the same kind, so the reference and KFAC use the same
samples and Hessian square roots.
"""

import importlib.util
import subprocess
import sys

import _transformer as transformer
import equinox as eqx
import jax
import jax.monitoring
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


# --------------------------------------------------------------------------- #
# Models: each with a tapped twin returning (output, layer inputs (R, D_in)).
# --------------------------------------------------------------------------- #


def mlp_tapped(x, p, taps):
    y0 = x @ p["w0"] + p["b0"] + taps[0].reshape(-1)
    h = jnp.tanh(y0)
    y1 = h @ p["w1"] + p["b1"] + taps[1].reshape(-1)
    return y1, (x[None], h[None])


def mlp(x, p):
    h = jnp.tanh(x @ p["w0"] + p["b0"])
    return h @ p["w1"] + p["b1"]


MLP_PARAMS = {
    "w0": _normal(jax.random.key(1), (3, 5)),
    "b0": _normal(jax.random.key(2), (5,)),
    "w1": _normal(jax.random.key(3), (5, 4)),
    "b1": _normal(jax.random.key(4), (4,)),
}
MLP_LAYERS = [("w0", "b0", (1, 5)), ("w1", "b1", (1, 4))]
N = 6
MLP_DATA = (
    _normal(jax.random.key(5), (N, 3)),
    jax.random.randint(jax.random.key(6), (N,), 0, 4),
)


def cnn_tapped(x, p, taps):
    """`x (2, 5, 5)`; a 3x3 VALID convolution (OIHW kernel), tanh, a dense layer."""
    y0 = jax.lax.conv_general_dilated(x[None], p["k"], (1, 1), "VALID")[0]
    y0 = y0 + p["c"][:, None, None] + jnp.reshape(taps[0].T, (3, 3, 3))
    h = jnp.tanh(y0)
    y1 = h.reshape(-1) @ p["w"] + p["b"] + jnp.reshape(taps[1], (4,))
    # Patches by slicing: (c, i, j)-ordered, like the kernel's (I, kh, kw).
    patches = jnp.stack(
        [x[:, i : i + 3, j : j + 3].reshape(-1) for i in range(3) for j in range(3)]
    )
    return y1, (patches, h.reshape(1, -1))


def cnn(x, p):
    return cnn_tapped(x, p, (jnp.zeros((9, 3)), jnp.zeros(4)))[0]


CNN_PARAMS = {
    "k": _normal(jax.random.key(7), (3, 2, 3, 3), 0.5),
    "c": _normal(jax.random.key(8), (3,)),
    "w": _normal(jax.random.key(9), (27, 4), 0.3),
    "b": _normal(jax.random.key(10), (4,)),
}
CNN_DATA = (
    _normal(jax.random.key(11), (4, 2, 5, 5)),
    jax.random.randint(jax.random.key(12), (4,), 0, 4),
)


def cnn_block_index(index):
    return {
        "k": index["k"].reshape(3, -1).T,  # (I kh kw, O)
        "w": index["w"],
    }


def reference_kfac(
    tapped,
    params,
    data,
    exact,
    layers,
    weight_matrices=None,
    weight_sharing="expand",
    merge_positions=False,
):
    """The dense KFAC matrix, per datum and per layer, as in the module docstring;
    for `weight_sharing="reduce"`, `a` averaged and `g` summed over `r` first and
    `A` divided by `N` only. `merge_positions`: the GGN's block-diagonal root of
    outputs `(T, C)` with its `T` column groups summed (`K = C`)."""
    inputs, targets = data
    flat, unravel = ravel_pytree(params)
    index = jax.tree_util.tree_map(
        lambda x: np.asarray(x).astype(int), unravel(jnp.arange(flat.size, dtype=float))
    )
    if weight_matrices is not None:
        index = {**index, **weight_matrices(index)}
    tap_shapes = [shape for _, _, shape in layers]
    zeros = tuple(jnp.zeros(s) for s in tap_shapes)
    n = jax.tree_util.tree_leaves(inputs)[0].shape[0]
    outputs = jax.vmap(lambda x: tapped(x, params, zeros)[0])(inputs)
    b = exact._likelihood_factors(outputs, targets, jnp.arange(n))
    if merge_positions:
        b = b.reshape(*b.shape[:2], -1, outputs.shape[-1]).sum(2)
    rows = [shape[0] for shape in tap_shapes]

    def one_datum(x, b_n):  # b_n (O, K)
        _, acts = tapped(x, params, zeros)
        jac = jax.jacrev(lambda t: tapped(x, params, t)[0].reshape(-1))(zeros)
        sums = []
        for li in range(len(layers)):  # jac[li]: (O, R, Do)
            a = jnp.concatenate([acts[li], jnp.ones((rows[li], 1))], axis=1)
            g = jnp.einsum("ok,ord->krd", b_n, jac[li])
            if weight_sharing == "reduce":
                a, g = a.mean(0, keepdims=True), g.sum(1, keepdims=True)
            g = g.reshape(-1, jac[li].shape[-1])
            sums.append((a.T @ a, g.T @ g))
        return sums

    per_datum = jax.jit(jax.vmap(one_datum))(inputs, b)
    matrix = np.zeros((flat.size, flat.size))
    for li, (w, bias, _) in enumerate(layers):
        block = np.concatenate([index[w], index[bias][None]], axis=0).reshape(-1)
        a_sum, g_sum = (np.sum(x, axis=0) for x in per_datum[li])
        positions = rows[li] if weight_sharing == "expand" else 1
        kron = np.kron(a_sum / (n * positions), g_sum)
        matrix[np.ix_(block, block)] = kron
    return exact.scale * matrix


def exact_operator(kind, model_fn, params, data, loss, **kwargs):
    if kind == "ggn":
        return fo.GGNOperator(model_fn, params, data, loss, **kwargs)
    if kind == "mc":
        return fo.MCFisherOperator(
            model_fn, params, data, loss, KEY, mc_samples=2, **kwargs
        )
    return fo.EmpiricalFisherOperator(model_fn, params, data, loss, **kwargs)


def kfac_operator(kind, model_fn, params, data, loss, **kwargs):
    extra = {"key": KEY, "mc_samples": 2} if kind == "mc" else {}
    return fo.KFACOperator(model_fn, params, data, loss, kind=kind, **extra, **kwargs)


def dense(vector_fn, params):
    flat, unravel = ravel_pytree(params)
    return jax.vmap(lambda e: ravel_pytree(vector_fn(unravel(e)))[0])(
        jnp.eye(flat.size)
    ).T


# --------------------------------------------------------------------------- #
# The matrix.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("kind", ["ggn", "mc", "ef"])
def test_mlp_matches_per_datum_reference(kind):
    kwargs = {"num_total_samples": 10.0}
    op = kfac_operator(kind, mlp, MLP_PARAMS, MLP_DATA, "cross_entropy", **kwargs)
    exact = exact_operator(kind, mlp, MLP_PARAMS, MLP_DATA, "cross_entropy", **kwargs)
    expected = reference_kfac(mlp_tapped, MLP_PARAMS, MLP_DATA, exact, MLP_LAYERS)
    matrix = op.as_matrix()
    np.testing.assert_allclose(matrix, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(op.diagonal(), np.diag(expected), rtol=1e-10)
    np.testing.assert_allclose(lx.diagonal(op), np.diag(expected), rtol=1e-10)
    np.testing.assert_allclose(dense(op.mv, MLP_PARAMS), expected, atol=1e-12)
    assert op.layers == {"w0": 0, "b0": 0, "w1": 1, "b1": 1}
    if kind != "mc":
        return
    # Chunked (3 chunks, one shifted back; MC keys by global index) and a batched
    # model: the same matrix.
    chunked = kfac_operator(
        kind,
        jax.vmap(mlp, in_axes=(0, None)),
        MLP_PARAMS,
        MLP_DATA,
        "cross_entropy",
        vmap_over_data=False,
        chunk_size=4,
        **kwargs,
    )
    np.testing.assert_allclose(chunked.as_matrix(), expected, rtol=1e-10, atol=1e-12)


def test_cnn_matches_per_datum_reference():
    op = fo.KFACOperator(cnn, CNN_PARAMS, CNN_DATA, "cross_entropy", chunk_size=3)
    exact = fo.GGNOperator(cnn, CNN_PARAMS, CNN_DATA, "cross_entropy")
    layers = [("k", "c", (9, 3)), ("w", "b", (1, 4))]
    expected = reference_kfac(
        cnn_tapped, CNN_PARAMS, CNN_DATA, exact, layers, cnn_block_index
    )
    np.testing.assert_allclose(op.as_matrix(), expected, rtol=1e-10, atol=1e-12)
    assert op.layers == {"k": 0, "c": 0, "w": 1, "b": 1}


# --------------------------------------------------------------------------- #
# Weight sharing: sequences (issue 21.2).
# --------------------------------------------------------------------------- #

T = 3


def mixer_tapped(x, p, taps):
    """`x (T, 3) -> (T, 4)` logits; a causal running mean mixes the positions."""
    y0 = x @ p["w0"] + p["b0"] + taps[0]
    h = jnp.tanh(jnp.cumsum(y0, axis=0) / jnp.arange(1, T + 1)[:, None])
    return h @ p["w1"] + p["b1"] + taps[1], (x, h)


def mixer(x, p):
    return mixer_tapped(x, p, (jnp.zeros((T, 5)), jnp.zeros((T, 4))))[0]


SEQUENCE_DATA = (
    _normal(jax.random.key(40), (4, T, 3)),
    jax.random.randint(jax.random.key(41), (4, T), 0, 4),
)


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
@pytest.mark.parametrize("kind", ["ggn", "mc"])
def test_weight_sharing_matches_its_definition(kind, weight_sharing):
    """Layers applied at every position of a sequence, positions mixed in between,
    per-token cross-entropy: both conventions against the per-datum reference."""
    op = kfac_operator(
        kind,
        mixer,
        MLP_PARAMS,
        SEQUENCE_DATA,
        "cross_entropy",
        weight_sharing=weight_sharing,
    )
    exact = exact_operator(kind, mixer, MLP_PARAMS, SEQUENCE_DATA, "cross_entropy")
    layers = [("w0", "b0", (T, 5)), ("w1", "b1", (T, 4))]
    expected = reference_kfac(
        mixer_tapped,
        MLP_PARAMS,
        SEQUENCE_DATA,
        exact,
        layers,
        weight_sharing=weight_sharing,
        merge_positions=kind == "ggn",
    )
    np.testing.assert_allclose(op.as_matrix(), expected, rtol=1e-10, atol=1e-12)
    assert f"x 5 at {T} positions" in repr(op)


def position_wise(x, p):
    """`(T, 3) -> (T, 4)`: LayerNorm, a tanh layer and a dense layer per position."""
    mean = jnp.mean(x, -1, keepdims=True)
    x = (x - mean) / jnp.std(x, -1, keepdims=True) * p["scale"] + p["shift"]
    return mlp(x, p)


def test_position_wise_sequence_kfac_is_the_flattened_kfac():
    """Expand: every position one datum, so without interaction between positions
    the sequence KFAC is the KFAC of the flattened positions, diagonal blocks
    (LayerNorm) included; reduce differs."""
    params = {
        **MLP_PARAMS,
        "scale": _normal(jax.random.key(42), (3,)),
        "shift": _normal(jax.random.key(43), (3,)),
    }
    inputs, targets = SEQUENCE_DATA
    flat = (inputs.reshape(-1, 3), targets.reshape(-1))
    sequence = fo.KFACOperator(position_wise, params, SEQUENCE_DATA, "cross_entropy")
    flattened = fo.KFACOperator(position_wise, params, flat, "cross_entropy")
    assert sequence.layers == {**flattened.layers, "scale": None, "shift": None}
    np.testing.assert_allclose(
        sequence.as_matrix(), flattened.as_matrix(), rtol=1e-10, atol=1e-13
    )
    reduced = fo.KFACOperator(
        position_wise, params, SEQUENCE_DATA, "cross_entropy", weight_sharing="reduce"
    )
    assert np.abs(reduced.as_matrix() - flattened.as_matrix()).max() > 1e-3


def test_transformer_ggn_and_kfac_layers():
    """A tiny causal transformer LM: the GGN is `Σ_n Σ_t J_nt^T H_nt J_nt` over
    positions (`J_nt` the Jacobian of position t's logits); KFAC finds the q, k,
    v, o, MLP and unembedding projections as Kronecker layers shared over the
    positions, and gives the embedding, positions and LayerNorms the exact
    diagonal; KFAC's Laplace predictive is one distribution per position."""
    params = transformer.init_params()
    data = transformer.make_data(3)
    flat, unravel = ravel_pytree(params)

    def position_terms(tokens):
        jac = jax.jacfwd(lambda v: transformer.transformer(tokens, unravel(v)))(flat)
        probs = jax.nn.softmax(transformer.transformer(tokens, params))
        hessians = jax.vmap(jnp.diag)(probs) - jnp.einsum("tc,td->tcd", probs, probs)
        return jnp.einsum("tcp,tcd,tdq->pq", jac, hessians, jac)

    expected = np.sum(jax.jit(jax.vmap(position_terms))(data[0]), axis=0)
    ggn = fo.GGNOperator(transformer.transformer, params, data, "cross_entropy")
    np.testing.assert_allclose(ggn.as_matrix(), expected, rtol=1e-10, atol=1e-12)

    kfac = fo.KFACOperator(transformer.transformer, params, data, "cross_entropy")
    labels = kfac.layers
    kronecker = ["q", "k", "v", "o", "up", "down", "unembed"]
    assert [labels[name]["w"] for name in kronecker] == list(range(7))
    assert all(labels[name].get("b", i) == i for i, name in enumerate(kronecker))
    diagonal = ["embed", "position", "norm1", "norm2", "norm3"]
    assert set(jax.tree_util.tree_leaves({n: labels[n] for n in diagonal})) == set()
    index = ravel_pytree(unravel(jnp.arange(flat.size, dtype=float)))[0]
    index = unravel(index)
    rest = np.concatenate(
        [
            np.asarray(leaf, int).reshape(-1)
            for leaf in jax.tree_util.tree_leaves({n: index[n] for n in diagonal})
        ]
    )
    np.testing.assert_allclose(
        np.diag(kfac.as_matrix())[rest], np.diag(expected)[rest], rtol=1e-10
    )
    assert f"dense (4 + 1) x 5 at {transformer.LENGTH} positions" in repr(kfac)

    # The KFAC Laplace predictive: one distribution per position, its logit
    # variances the diagonal of `J_* (K + I)^{-1} J_*^T` for each position.
    tokens = data[0][:2]
    jacobians = jax.vmap(
        jax.jacfwd(lambda x, v: transformer.transformer(x, unravel(v)), 1), (0, None)
    )(tokens, flat).reshape(2, -1, flat.size)
    covariance = np.linalg.inv(kfac.as_matrix() + np.eye(flat.size))
    reference = np.einsum("nop,pq,noq->no", jacobians, covariance, jacobians)
    mean, variance = fo.LaplacePosterior(kfac, 1.0).predictive(
        tokens, approximation="none"
    )
    logits = jax.vmap(transformer.transformer, (0, None))(tokens, params)
    np.testing.assert_allclose(mean, logits, rtol=1e-12)
    np.testing.assert_allclose(variance, reference.reshape(logits.shape), rtol=1e-8)


def as_tree(params, flat):
    return ravel_pytree(params)[1](flat)


def _layer_indices(params, names):
    flat, unravel = ravel_pytree(params)
    index = unravel(jnp.arange(flat.size, dtype=float))
    return np.concatenate(
        [np.asarray(index[name]).reshape(-1) for name in names]
    ).astype(int)


def test_exact_where_the_maths_says_so():
    x = _normal(jax.random.key(20), (1, 3))
    y = jnp.array([2])
    # One datum, one factor column (EF): every layer block is exact.
    kfac = fo.KFACOperator(mlp, MLP_PARAMS, (x, y), "cross_entropy", kind="ef")
    exact = fo.EmpiricalFisherOperator(mlp, MLP_PARAMS, (x, y), "cross_entropy")
    matrix, reference = kfac.as_matrix(), exact.as_matrix()
    for names in (["b0", "w0"], ["b1", "w1"]):
        idx = _layer_indices(MLP_PARAMS, names)
        np.testing.assert_allclose(
            matrix[np.ix_(idx, idx)], reference[np.ix_(idx, idx)], rtol=1e-10
        )

    # A single dense layer with MSE: the exact GGN.
    def dense_layer(x, p):
        return x @ p["w"] + p["b"]

    params = {"w": MLP_PARAMS["w0"], "b": MLP_PARAMS["b0"]}
    data = (_normal(jax.random.key(21), (7, 3)), _normal(jax.random.key(22), (7, 5)))
    kfac = fo.KFACOperator(dense_layer, params, data, "mse")
    exact = fo.GGNOperator(dense_layer, params, data, "mse")
    np.testing.assert_allclose(kfac.as_matrix(), exact.as_matrix(), rtol=1e-10)

    # A deep linear network with MSE: the exact GGN block of the last layer.
    def deep_linear(x, p):
        return (x @ p["w0"] + p["b0"]) @ p["w1"] + p["b1"]

    data = (_normal(jax.random.key(23), (7, 3)), _normal(jax.random.key(24), (7, 4)))
    kfac = fo.KFACOperator(deep_linear, MLP_PARAMS, data, "mse")
    exact = fo.GGNOperator(deep_linear, MLP_PARAMS, data, "mse")
    idx = _layer_indices(MLP_PARAMS, ["b1", "w1"])
    np.testing.assert_allclose(
        kfac.as_matrix()[np.ix_(idx, idx)],
        exact.as_matrix()[np.ix_(idx, idx)],
        rtol=1e-10,
    )


# --------------------------------------------------------------------------- #
# The damped algebra.
# --------------------------------------------------------------------------- #

GGN_KFAC = fo.KFACOperator(mlp, MLP_PARAMS, MLP_DATA, "cross_entropy")
LAYERWISE = {"w0": 0.3, "b0": 2.0, "w1": 1.1, "b1": 0.5}


@pytest.mark.parametrize("prior", [0.7, LAYERWISE], ids=["scalar", "layerwise"])
def test_inverse_logdet_and_square_root_are_exact(prior):
    op = GGN_KFAC
    prior_matrix = np.diag(
        ravel_pytree(fo.PriorPrecision(MLP_PARAMS, prior).full_diagonal())[0]
    )
    damped = np.asarray(op.as_matrix()) + prior_matrix
    inverse = np.linalg.inv(damped)
    assert op.is_exact(prior)
    kfac_inverse = op.inverse(prior)
    np.testing.assert_allclose(kfac_inverse.as_matrix(), inverse, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dense(kfac_inverse.mv, MLP_PARAMS), inverse, atol=1e-10)
    np.testing.assert_allclose(lx.diagonal(kfac_inverse), np.diag(inverse), rtol=1e-9)
    np.testing.assert_allclose(
        op.logdet(prior), np.linalg.slogdet(damped)[1], rtol=1e-10
    )
    root = dense(lambda e: op.inverse_sqrt_mv(prior, e), MLP_PARAMS)
    np.testing.assert_allclose(root @ root.T, inverse, rtol=1e-9, atol=1e-12)
    if not isinstance(prior, dict):  # the symmetric square root
        np.testing.assert_allclose(root, root.T, atol=1e-12)


def test_scaling_keeps_a_kfac_operator():
    for scaled in (fo.scale(GGN_KFAC, 2.5), 2.5 * GGN_KFAC):
        assert isinstance(scaled, fo.KFACOperator)
        np.testing.assert_allclose(scaled.as_matrix(), 2.5 * GGN_KFAC.as_matrix())
        assert "scale=2.5" in repr(scaled)
        assert "layers=[dense (3 + 1) x 5, dense (5 + 1) x 4]" in repr(scaled)


def test_diagonal_prior_preconditions_cg_on_the_exact_ggn():
    prior = jax.tree_util.tree_map(
        lambda p: 0.5 + jax.random.uniform(jax.random.key(30), p.shape), MLP_PARAMS
    )
    op = GGN_KFAC
    assert not op.is_exact(prior)
    with pytest.raises(ValueError, match="exact only"):
        op.logdet(prior)
    with pytest.raises(ValueError, match="exact only"):
        op.inverse_sqrt_mv(prior, MLP_PARAMS)
    exact = fo.GGNOperator(mlp, MLP_PARAMS, MLP_DATA, "cross_entropy")
    precision = exact + fo.PriorPrecision(MLP_PARAMS, prior)
    rhs = jax.tree_util.tree_map(jnp.ones_like, MLP_PARAMS)
    solver = lx.CG(rtol=1e-10, atol=1e-10, max_steps=200)
    solution = lx.linear_solve(
        precision, rhs, solver, options={"preconditioner": op.inverse(prior)}
    )
    expected = np.linalg.solve(
        np.asarray(exact.as_matrix())
        + np.diag(
            ravel_pytree(fo.PriorPrecision(MLP_PARAMS, prior).full_diagonal())[0]
        ),
        np.ones(ravel_pytree(MLP_PARAMS)[0].size),
    )
    np.testing.assert_allclose(ravel_pytree(solution.value)[0], expected, rtol=1e-8)


# --------------------------------------------------------------------------- #
# Layer discovery.
# --------------------------------------------------------------------------- #


def test_equinox_mlp_matches_the_plain_function():
    mlp_eqx = eqx.nn.MLP(3, 4, 5, 1, activation=jnp.tanh, key=jax.random.key(40))
    model_fn, params = fo.from_equinox(mlp_eqx)
    first, last = params.layers
    plain = {
        "w0": first.weight.T,
        "b0": first.bias,
        "w1": last.weight.T,
        "b1": last.bias,
    }
    op = fo.KFACOperator(model_fn, params, MLP_DATA, "cross_entropy")
    reference = fo.KFACOperator(mlp, plain, MLP_DATA, "cross_entropy")
    assert [(layer.weight, layer.bias) for layer in op.layers.layers] == [
        (0, 0),
        (1, 1),
    ]
    want = as_tree(plain, reference.diagonal())
    got = as_tree(params, op.diagonal())
    np.testing.assert_allclose(got.layers[0].weight, want["w0"].T, rtol=1e-10)
    np.testing.assert_allclose(got.layers[1].bias, want["b1"], rtol=1e-10)


def test_equinox_cnn_and_flax_mlp_with_layer_norm():
    keys = jax.random.split(jax.random.key(41), 2)
    cnn_eqx = eqx.nn.Sequential(
        [
            eqx.nn.Conv2d(2, 3, 3, key=keys[0]),
            eqx.nn.Lambda(jnp.tanh),
            eqx.nn.Lambda(jnp.ravel),
            eqx.nn.Linear(27, 4, key=keys[1]),
        ]
    )
    model_fn, params = fo.from_equinox(cnn_eqx)
    op = fo.KFACOperator(model_fn, params, CNN_DATA, "cross_entropy")
    conv, dense_layer = op.layers.layers[0], op.layers.layers[3]
    assert (conv.weight, conv.bias, dense_layer.weight, dense_layer.bias) == (
        0,
        0,
        1,
        1,
    )
    # The same network as a plain function (OIHW kernel, (in, out) dense weight).
    plain = {
        "k": params.layers[0].weight,
        "c": params.layers[0].bias.reshape(-1),
        "w": params.layers[3].weight.T,
        "b": params.layers[3].bias,
    }
    want = fo.KFACOperator(cnn, plain, CNN_DATA, "cross_entropy")
    got_diag = as_tree(params, op.diagonal())
    want_diag = as_tree(plain, want.diagonal())
    np.testing.assert_allclose(got_diag.layers[0].weight, want_diag["k"], rtol=1e-10)
    np.testing.assert_allclose(got_diag.layers[3].weight, want_diag["w"].T, rtol=1e-10)

    nnx = pytest.importorskip("flax.nnx")
    rngs = nnx.Rngs(0)
    module = nnx.Sequential(
        nnx.Linear(3, 5, rngs=rngs),
        nnx.tanh,
        nnx.LayerNorm(5, rngs=rngs),
        nnx.Linear(5, 4, rngs=rngs),
    )
    model_fn, params = fo.from_flax_nnx(module)
    op = fo.KFACOperator(model_fn, params, MLP_DATA, "cross_entropy")
    assert op.layers == {
        "layers": {
            0: {"kernel": 0, "bias": 0},
            2: {"scale": None, "bias": None},
            3: {"kernel": 1, "bias": 1},
        }
    }
    # The layer norm's params get the exact diagonal of the GGN.
    exact = fo.GGNOperator(model_fn, params, MLP_DATA, "cross_entropy")
    got = as_tree(params, op.diagonal())
    want = as_tree(params, exact.diagonal())
    for name in ("scale", "bias"):
        np.testing.assert_allclose(
            got["layers"][2][name], want["layers"][2][name], rtol=1e-5
        )
    with pytest.raises(ValueError, match=r"\['layers'\]\[2\]\['scale'\]"):
        fo.KFACOperator(model_fn, params, MLP_DATA, "cross_entropy", other="error")


def test_layers_by_hand():
    # w0 on its own (its bias in no layer), layer 1 as found.
    labels = {"w0": "first", "b0": None, "w1": "second", "b1": "second"}
    op = fo.KFACOperator(mlp, MLP_PARAMS, MLP_DATA, "cross_entropy", layers=labels)
    assert op.layers == {"w0": 0, "b0": None, "w1": 1, "b1": 1}
    matrix = np.asarray(op.as_matrix())
    b0 = _layer_indices(MLP_PARAMS, ["b0"])
    exact = fo.GGNOperator(mlp, MLP_PARAMS, MLP_DATA, "cross_entropy")
    np.testing.assert_allclose(
        matrix[np.ix_(b0, b0)], np.diag(np.asarray(exact.diagonal())[b0]), rtol=1e-10
    )
    np.testing.assert_allclose(matrix, GGN_KFAC.as_matrix() * (matrix != 0), atol=1e-12)
    with pytest.raises(ValueError, match="not the bias"):
        fo.KFACOperator(
            mlp,
            MLP_PARAMS,
            MLP_DATA,
            "cross_entropy",
            layers={"w0": 0, "b0": 1, "w1": 1, "b1": 0},
        )


# --------------------------------------------------------------------------- #
# Compilation and the Laplace posterior.
# --------------------------------------------------------------------------- #


def test_repeated_calls_compile_nothing():
    def calls(shift):
        params = jax.tree_util.tree_map(lambda p: p + shift, MLP_PARAMS)
        data = (MLP_DATA[0] + shift, MLP_DATA[1])
        op = fo.KFACOperator(mlp, params, data, "cross_entropy", kind="mc", key=KEY)
        prior = fo.PriorPrecision(params, 1.0 + shift)
        return (
            op.mv(params),
            op.diagonal(),
            op.inverse(prior).mv(params),
            op.logdet(prior),
            op.inverse_sqrt_mv(prior, params),
        )

    first = calls(0.0)
    with counted_compilations() as compiles:
        second = calls(0.5)
    assert compiles == []
    assert not np.allclose(first[3], second[3])


def test_laplace_posterior_uses_the_kronecker_algebra():
    op = GGN_KFAC.decompose()
    posterior = fo.LaplacePosterior(op, LAYERWISE)
    damped = np.asarray(op.as_matrix()) + np.diag(
        ravel_pytree(fo.PriorPrecision(MLP_PARAMS, LAYERWISE).full_diagonal())[0]
    )
    covariance = np.linalg.inv(damped)
    rhs = jax.tree_util.tree_map(jnp.ones_like, MLP_PARAMS)
    np.testing.assert_allclose(
        ravel_pytree(posterior.solve(rhs))[0],
        covariance @ np.ones(len(damped)),
        rtol=1e-9,
    )
    np.testing.assert_allclose(
        posterior.logdet(), np.linalg.slogdet(damped)[1], rtol=1e-10
    )
    tuned = fo.optimize_prior_precision(op, prior="layerwise")
    assert tuned.converged
    samples = posterior.sample(jax.random.key(50), 20_000)
    flat = jax.vmap(lambda s: ravel_pytree(s)[0])(samples)
    np.testing.assert_allclose(flat.mean(0), ravel_pytree(MLP_PARAMS)[0], atol=0.05)
    scale = np.sqrt(np.outer(np.diag(covariance), np.diag(covariance)))
    np.testing.assert_allclose(np.cov(flat.T) / scale, covariance / scale, atol=0.04)


_LAPLACE_TORCH_SCRIPT = """
import sys

import numpy as np
import torch
import laplace

torch.manual_seed(0)
n = int(sys.argv[2])
model = torch.nn.Sequential(
    torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)
).double()
x, y = torch.randn(n, 3, dtype=torch.float64), torch.randint(0, 4, (n,))
loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(x, y), batch_size=n
)
la = laplace.Laplace(
    model, "classification", subset_of_weights="all", hessian_structure="kron"
)
la.fit(loader)
out = {"x": x.numpy(), "y": y.numpy()}
for i, layer in enumerate([model[0], model[2]]):
    (g, a), (g_bias,) = la.H_facs.kfacs[2 * i], la.H_facs.kfacs[2 * i + 1]
    out[f"w{i}"] = layer.weight.detach().numpy().T
    out[f"b{i}"] = layer.bias.detach().numpy()
    out[f"g{i}"], out[f"a{i}"], out[f"g_bias{i}"] = g.numpy(), a.numpy(), g_bias.numpy()
np.savez(sys.argv[1], **out)
"""


def test_factors_match_laplace_torch(tmp_path):
    """laplace-torch's 'kron' (curvlinops backend) keeps a layer's weight and bias
    apart: its weight factors are `[G, A[:-1, :-1]]`, its bias factor `[G]`.

    torch runs in a subprocess: loaded into the test process next to jaxlib, its
    own LLVM and thread pools have crashed XLA's compiler later in the session.
    """
    if importlib.util.find_spec("torch") is None or (
        importlib.util.find_spec("laplace") is None
    ):
        pytest.skip("laplace-torch is not installed")
    path = tmp_path / "factors.npz"
    subprocess.run(
        [sys.executable, "-c", _LAPLACE_TORCH_SCRIPT, str(path), str(N)],
        check=True,
        timeout=240,
    )
    torch_side = np.load(path)
    params = {}
    for i in range(2):
        params[f"w{i}"] = jnp.asarray(torch_side[f"w{i}"])
        params[f"b{i}"] = jnp.asarray(torch_side[f"b{i}"])
    data = (jnp.asarray(torch_side["x"]), jnp.asarray(torch_side["y"]))
    op = fo.KFACOperator(mlp, params, data, "cross_entropy")
    for i in range(2):
        gradients = op.gradient_covariances[i]
        np.testing.assert_allclose(torch_side[f"g{i}"], gradients, atol=1e-12)
        np.testing.assert_allclose(torch_side[f"g_bias{i}"], gradients, atol=1e-12)
        np.testing.assert_allclose(
            torch_side[f"a{i}"], op.input_covariances[i][:-1, :-1], atol=1e-12
        )
