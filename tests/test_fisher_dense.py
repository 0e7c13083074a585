"""The empirical Fisher and the GGN against dense float64 references.

EF  = factor * sum_n J_n^T g_n g_n^T J_n
GGN = factor * sum_n J_n^T H_n J_n
with `J_n` from `jax.jacfwd` and `g_n`, `H_n` written out by hand (SPEC.md).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import (
    LOSS_TARGET_IDS,
    LOSS_TARGETS,
    N_DATA,
    assert_close,
    assert_like_params,
    batched,
    check_operator,
    dense_ef,
    dense_ggn,
    flat,
    init_params,
    make_data,
    mlp,
    model_for,
    per_datum,
    quartic_grad,
    quartic_loss,
    random_vector,
)
from jax.flatten_util import ravel_pytree

import fisherops as fo

PARAMS = init_params()
PARAMS_2 = init_params(d_in=2)  # for single data whose input (2,) is not (N_OUT,)
KINDS = ["empirical", "ggn"]


def build(kind, model_fn, params, data, loss_fn, **kwargs):
    if kind == "empirical":
        return fo.EmpiricalFisherOperator(model_fn, params, data, loss_fn, **kwargs)
    return fo.GGNOperator(model_fn, params, data, loss_fn, **kwargs)


def dense(kind, params, data, loss, factor=1.0):
    reference = dense_ef if kind == "empirical" else dense_ggn
    return np.asarray(reference(mlp, params, data, loss, factor))


@functools.cache
def dense_default(kind, loss, target_kind):
    return dense(kind, PARAMS, make_data(target_kind), loss)


CHUNKED_CASES = [
    ("mse", "vector"),
    ("cross_entropy", "labels"),
    ("binary_cross_entropy", "binary"),
]


@pytest.mark.parametrize(
    ("loss", "target_kind", "chunk_size"),
    [(*case, None) for case in LOSS_TARGETS] + [(*case, 2) for case in CHUNKED_CASES],
    ids=[f"{i}-unchunked" for i in LOSS_TARGET_IDS]
    + [f"{loss}-{kind}-chunk2" for loss, kind in CHUNKED_CASES],
)
@pytest.mark.parametrize("vmap_over_data", [True, False], ids=["vmap", "batched"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_dense(kind, loss, target_kind, vmap_over_data, chunk_size):
    """Every loss x target layout x mode, unchunked; every loss x mode in chunks of
    2 (N=5, so uneven); every read-off (linearised, diagonal, square root) in each.
    """
    data = make_data(target_kind)
    op = build(
        kind,
        model_for(vmap_over_data),
        PARAMS,
        data,
        loss,
        vmap_over_data=vmap_over_data,
        chunk_size=chunk_size,
    )
    expected = dense_default(kind, loss, target_kind)
    check_operator(op, expected, PARAMS)


@pytest.mark.parametrize(("loss", "target_kind"), LOSS_TARGETS, ids=LOSS_TARGET_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_dict_and_tuple_data_agree(kind, loss, target_kind):
    inputs, targets = make_data(target_kind)
    from_dict = build(
        kind, mlp, PARAMS, {"input": inputs, "target": targets}, loss
    ).as_matrix()
    assert_close(from_dict, dense_default(kind, loss, target_kind))


@pytest.mark.parametrize(
    ("num_curv_samples", "num_total_samples", "factor"),
    [(None, None, 1.0), (None, 20, 4.0), (10, None, 1.0), (10, 30, 3.0), (2, 7, 3.5)],
)
@pytest.mark.parametrize("kind", KINDS)
def test_scaling(kind, num_curv_samples, num_total_samples, factor):
    """factor = num_total_samples / num_curv_samples; defaults give a plain sum."""
    data = make_data("vector")
    op = build(
        kind,
        mlp,
        PARAMS,
        data,
        "mse",
        num_curv_samples=num_curv_samples,
        num_total_samples=num_total_samples,
    )
    check_operator(op, dense(kind, PARAMS, data, "mse", factor), PARAMS)


@pytest.mark.parametrize("kind", KINDS)
def test_default_is_a_sum_over_data(kind):
    """Giving every datum twice doubles the matrix (a sum, not a mean)."""
    inputs, targets = make_data("labels")
    once = build(kind, mlp, PARAMS, (inputs, targets), "cross_entropy").as_matrix()
    twice = build(
        kind,
        mlp,
        PARAMS,
        (jnp.concatenate([inputs, inputs]), jnp.concatenate([targets, targets])),
        "cross_entropy",
    ).as_matrix()
    assert_close(twice, 2.0 * np.asarray(once))


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["unchunked", "chunk2"])
@pytest.mark.parametrize("vmap_over_data", [True, False], ids=["vmap", "batched"])
def test_callable_loss(vmap_over_data, chunk_size):
    """A per-datum callable loss: its output gradient comes from autodiff."""
    data = make_data("vector")
    op = fo.EmpiricalFisherOperator(
        model_for(vmap_over_data),
        PARAMS,
        data,
        quartic_loss,
        vmap_over_data=vmap_over_data,
        chunk_size=chunk_size,
    )
    expected = dense("empirical", PARAMS, data, "quartic")
    check_operator(op, expected, PARAMS)


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["unchunked", "chunk2"])
@pytest.mark.parametrize("vmap_over_data", [True, False], ids=["vmap", "batched"])
def test_loss_grad_fn(vmap_over_data, chunk_size):
    """loss_grad_fn sees one datum with vmap_over_data=True, the batch otherwise."""
    data = make_data("vector")
    guard = per_datum if vmap_over_data else batched
    op = fo.EmpiricalFisherOperator(
        model_for(vmap_over_data),
        PARAMS,
        data,
        vmap_over_data=vmap_over_data,
        loss_grad_fn=guard(quartic_grad),
        chunk_size=chunk_size,
    )
    expected = dense("empirical", PARAMS, data, "quartic")
    check_operator(op, expected, PARAMS)


def test_loss_grad_fn_is_scaled():
    data = make_data("vector")
    op = fo.EmpiricalFisherOperator(
        mlp,
        PARAMS,
        data,
        loss_grad_fn=lambda f, y: 2.0 * (f - y),
        num_curv_samples=5,
        num_total_samples=15,
    )
    check_operator(op, dense("empirical", PARAMS, data, "mse", 3.0), PARAMS)


@pytest.mark.parametrize(("loss", "target_kind"), LOSS_TARGETS, ids=LOSS_TARGET_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_single_unbatched_datum(kind, loss, target_kind):
    """vmap_over_data=False accepts one datum without a batch axis (N=1): its
    input (2,) is not a batch, as the output (3,) has another length."""
    inputs, targets = make_data(target_kind)
    inputs = inputs[:, :2]
    op = build(kind, mlp, PARAMS_2, (inputs[0], targets[0]), loss, vmap_over_data=False)
    assert op.num_data == 1
    expected = dense(kind, PARAMS_2, (inputs[:1], targets[:1]), loss)
    check_operator(op, expected, PARAMS_2)


@pytest.mark.parametrize(
    ("kind", "loss", "target_kind"),
    [("empirical", "mse", "vector"), ("ggn", "cross_entropy", "labels")],
)
def test_batch_of_one(kind, loss, target_kind):
    inputs, targets = make_data(target_kind)
    data = (inputs[:1], targets[:1])
    expected = dense(kind, PARAMS, data, loss)
    for vmap_over_data in (True, False):
        op = build(
            kind,
            model_for(vmap_over_data),
            PARAMS,
            data,
            loss,
            vmap_over_data=vmap_over_data,
        )
        check_operator(op, expected, PARAMS)


def test_single_datum_scaling_defaults_to_one():
    """num_curv_samples defaults to 1 for a single unbatched datum."""
    inputs, targets = make_data("vector")
    inputs = inputs[:, :2]
    op = fo.EmpiricalFisherOperator(
        mlp,
        PARAMS_2,
        (inputs[0], targets[0]),
        "mse",
        vmap_over_data=False,
        num_total_samples=4,
    )
    expected = dense("empirical", PARAMS_2, (inputs[:1], targets[:1]), "mse", 4.0)
    assert_close(op.as_matrix(), expected)


@pytest.mark.parametrize(
    ("loss", "target_kind"),
    [
        ("mse", "vector"),
        ("cross_entropy", "labels"),
        ("binary_cross_entropy", "binary"),
    ],
)
def test_empirical_fisher_rank_is_at_most_n(loss, target_kind):
    """Each datum adds the rank-one term (J_n^T g_n)(J_n^T g_n)^T."""
    n = 3
    data = make_data(target_kind, n=n)
    matrix = np.asarray(fo.EmpiricalFisherOperator(mlp, PARAMS, data, loss).as_matrix())
    assert matrix.shape == (31, 31)
    assert np.linalg.matrix_rank(matrix, tol=1e-8 * np.abs(matrix).max()) == n


@pytest.mark.parametrize(("loss", "target_kind"), LOSS_TARGETS, ids=LOSS_TARGET_IDS)
def test_ggn_is_symmetric_psd_with_rank_above_n(loss, target_kind):
    """Unlike the EF, the GGN adds rank(H_n) > 1 per datum."""
    op = fo.GGNOperator(mlp, PARAMS, make_data(target_kind), loss)
    matrix = np.asarray(op.as_matrix())
    assert_close(matrix, matrix.T)
    assert np.linalg.eigvalsh(matrix).min() > -1e-10
    assert np.linalg.matrix_rank(matrix, tol=1e-8 * np.abs(matrix).max()) > N_DATA


# --------------------------------------------------------------------------
# scalar outputs, scale dtype, float32
# --------------------------------------------------------------------------


def scalar_mlp(x, params):
    """One output per datum, as a scalar: a batch gives outputs of shape (N,)."""
    return mlp(x, params)[..., 0]


@pytest.mark.parametrize(
    ("kind", "loss"), [("empirical", "mse"), ("ggn", "binary_cross_entropy")]
)
def test_scalar_outputs_in_both_modes(kind, loss):
    """A batched model returning (N,) is N data points, not one datum with N
    outputs: the matrix is `sum_n J_n^T h_n J_n` with scalar `h_n` in both modes."""
    inputs = make_data("vector")[0]
    targets = jnp.asarray(np.random.default_rng(4).integers(0, 2, N_DATA), float)
    flat_params, unravel = ravel_pytree(PARAMS)
    jacobians = jax.vmap(
        lambda x: jax.grad(lambda p: scalar_mlp(x, unravel(p)))(flat_params)
    )(inputs)
    outputs = jax.vmap(scalar_mlp, (0, None))(inputs, PARAMS)
    probs = jax.nn.sigmoid(outputs)
    if kind == "empirical":
        grads = 2 * (outputs - targets) if loss == "mse" else probs - targets
        weights = grads**2
    else:
        weights = 2 * jnp.ones(N_DATA) if loss == "mse" else probs * (1 - probs)
    expected = np.asarray(jnp.einsum("n,np,nq->pq", weights, jacobians, jacobians))
    for vmap_over_data in (True, False):
        op = build(
            kind,
            (per_datum if vmap_over_data else batched)(scalar_mlp),
            PARAMS,
            (inputs, targets),
            loss,
            vmap_over_data=vmap_over_data,
        )
        assert op.num_data == N_DATA
        check_operator(op, expected, PARAMS)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_scale_is_computed_in_float32(dtype):
    """num_total / num_curv = 1e5 / 128 overflows float16 and is 0.16% off in
    bfloat16: it is computed (and kept) in float32."""
    params = jax.tree.map(lambda leaf: leaf.astype(dtype), PARAMS)
    inputs, targets = make_data("labels", n=128)
    op = fo.GGNOperator(
        mlp,
        params,
        (inputs.astype(dtype), targets),
        "cross_entropy",
        num_total_samples=1e5,
    )
    assert op.scale.dtype == jnp.float32
    assert float(op.scale) == np.float32(1e5 / 128)
    product = op.mv(jax.tree.map(jnp.ones_like, params))
    assert all(jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(product))


@pytest.mark.parametrize("kind", KINDS)
def test_float32(kind):
    """float32 params: every read-off within float32 tolerance of the float64
    reference (chunked, so every path is in float32 too)."""
    data = make_data("labels")
    params = jax.tree.map(lambda leaf: leaf.astype(jnp.float32), PARAMS)
    op = build(
        kind,
        mlp,
        params,
        (data[0].astype(jnp.float32), data[1]),
        "cross_entropy",
        chunk_size=2,
    )
    expected = dense_default(kind, "cross_entropy", "labels")
    eps = float(jnp.finfo(jnp.float32).eps)
    scale = np.abs(expected).max()
    tolerance = {"rtol": 100 * eps, "atol": 100 * eps * scale}
    assert_close(op.as_matrix(), expected, **tolerance)
    assert_close(op.as_matrix("mv"), expected, **tolerance)
    assert_close(op.diagonal(), np.diag(expected), **tolerance)
    vector = jax.tree.map(lambda leaf: leaf.astype(jnp.float32), random_vector(PARAMS))
    product = op.linearise().mv(vector)
    assert_like_params(product, params)
    assert_close(
        flat(product),
        expected @ flat(vector),
        rtol=100 * eps,
        atol=100 * eps * scale * np.abs(flat(vector)).sum(),
    )


# --------------------------------------------------------------------------
# dense routes (issue 14) and the GGN's O(N C) linearisation
# --------------------------------------------------------------------------


def build_any(kind, chunk_size, model_fn=mlp):
    data = make_data("labels")
    if kind == "mc":
        return fo.MCFisherOperator(
            model_fn,
            PARAMS,
            data,
            "cross_entropy",
            jax.random.key(0),
            mc_samples=2,
            chunk_size=chunk_size,
        )
    return build(kind, model_fn, PARAMS, data, "cross_entropy", chunk_size=chunk_size)


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["unchunked", "chunk2"])
@pytest.mark.parametrize("kind", [*KINDS, "mc"])
def test_dense_routes_agree(kind, chunk_size):
    """The rows route (`sum_n R_n^T R_n`) and the mv route (`P` products) give
    the same matrix and diagonal, on the operator and on its linearisation."""
    op = build_any(kind, chunk_size)
    rows = np.asarray(op.as_matrix(algorithm="rows"))
    if kind != "mc":
        assert_close(rows, dense_default(kind, "cross_entropy", "labels"))
    linearised = op.linearise()
    for matrix in (op.as_matrix(algorithm="mv"), linearised.as_matrix(algorithm="mv")):
        assert_close(matrix, rows)
    for algorithm in ("rows", "mv"):
        assert_close(op.diagonal(algorithm=algorithm), np.diag(rows))
        assert_close(linearised.diagonal(algorithm=algorithm), np.diag(rows))


def test_forcing_a_route(monkeypatch):
    """`algorithm=` decides whether the per-datum rows are computed at all."""
    calls = []
    per_datum_rows = fo._core.per_datum_rows

    def counting(*args, **kwargs):
        calls.append(None)
        return per_datum_rows(*args, **kwargs)

    monkeypatch.setattr(fo._core, "per_datum_rows", counting)
    expected = dense_default("ggn", "cross_entropy", "labels")
    for algorithm, computes_rows in (("mv", False), ("rows", True)):
        for method, reference in (
            ("as_matrix", expected),
            ("diagonal", np.diag(expected)),
        ):
            calls.clear()
            # A new model_fn: a fresh trace, so the patched function is seen.
            op = build_any("ggn", None, model_fn=lambda x, p: mlp(x, p))
            assert_close(getattr(op, method)(algorithm=algorithm), reference)
            assert bool(calls) == computes_rows, (algorithm, method)
    with pytest.raises(ValueError, match="algorithm must be"):
        build_any("ggn", None).as_matrix(algorithm="jacobian")


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["unchunked", "chunk2"])
def test_linearised_ggn_keeps_outputs_not_hessian_roots(chunk_size):
    """The linearised GGN stores O(N C) numbers per datum, never (N, C, C)."""
    state = build_any("ggn", chunk_size).linearise().output_state
    assert all(leaf.size <= N_DATA * 3 for leaf in jax.tree.leaves(state))
