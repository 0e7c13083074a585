"""float32 and odd shapes (issue 10.11): what most users run, and where a wrong
number hides.

Every fisherops computation here runs with 64-bit types OFF (`float32` fixture:
`jax.enable_x64(False)`, as in a user's session), so a float64 default inside
the library cannot paper over a float32 problem. Tolerances come from the float32
eps. The dense references are float64: per-datum Jacobians by `jax.jacfwd` in
float64 (64-bit types on) and numpy linear algebra.

Covered: operators against dense references in float32; the Laplace solve,
log-determinant and evidence in float32 (never a NaN prior precision); scalar
outputs per datum in both `vmap_over_data` modes; C = 1000 classes; float16 and
bfloat16 params (the scale factor); 1-based and negative labels (an error); a
`Likelihood` closing over a traced noise scale (the right gradient); mixed-dtype
params through CG.
"""

import math

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import fisherops as fo

EPS32 = float(np.finfo(np.float32).eps)  # 1.2e-7
D_IN, HIDDEN, CLASSES, N = 4, 6, 3, 16


@pytest.fixture
def float32():
    """64-bit types off for the test body (the session default is on)."""
    with jax.enable_x64(False):
        yield


def mlp(x, params):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def numpy_problem(seed=0, d_out=CLASSES, n=N):
    rng = np.random.default_rng(seed)
    params = {
        "w1": rng.normal(size=(D_IN, HIDDEN)) / 2,
        "b1": rng.normal(size=HIDDEN) / 4,
        "w2": rng.normal(size=(HIDDEN, d_out)) / 2,
        "b2": np.zeros(d_out),
    }
    inputs = rng.normal(size=(n, D_IN))
    labels = rng.integers(0, d_out, n)
    return params, inputs, labels


def cast(tree, dtype):
    return jax.tree.map(lambda leaf: jnp.asarray(leaf, dtype), tree)


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0], np.float64)


@jax.enable_x64(True)
def jacobians(model_fn, params, inputs):
    """`(N, O, P)` per-datum Jacobians in float64 (64-bit types on here, also
    inside a float32 test)."""
    params64 = cast(params, jnp.float64)
    vector, unravel = ravel_pytree(params64)

    def one(x):
        return jnp.reshape(
            jax.jacfwd(lambda v: model_fn(jnp.asarray(x), unravel(v)))(vector),
            (-1, vector.size),
        )

    return np.stack([np.asarray(one(x)) for x in np.asarray(inputs, np.float64)])


@jax.enable_x64(True)
def outputs64(model_fn, params, inputs):
    """`(N, O)` outputs in float64."""
    params64 = cast(params, jnp.float64)
    return np.stack(
        [
            np.reshape(np.asarray(model_fn(jnp.asarray(x), params64)), -1)
            for x in np.asarray(inputs, np.float64)
        ]
    )


def softmax(f):
    e = np.exp(f - f.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def dense_ggn_ce(params, inputs, labels):
    del labels  # the cross-entropy Hessian does not depend on the targets
    J = jacobians(mlp, params, inputs)
    p = softmax(outputs64(mlp, params, inputs))
    H = np.stack([np.diag(q) - np.outer(q, q) for q in p])
    return np.einsum("nop,noq,nqr->pr", J, H, J)


def dense_ef_ce(params, inputs, labels):
    J = jacobians(mlp, params, inputs)
    p = softmax(outputs64(mlp, params, inputs))
    g = p - np.eye(p.shape[1])[labels]
    Jg = np.einsum("nop,no->np", J, g)
    return Jg.T @ Jg


def assert_close32(actual, expected, rtol_eps=300.0):
    """Agreement to `rtol_eps` float32 eps, relative to the largest entry."""
    actual = np.asarray(actual, np.float64)
    scale = np.abs(expected).max()
    error = np.abs(actual - expected).max()
    assert error <= rtol_eps * EPS32 * scale, (
        f"max error {error:.3g} > {rtol_eps} eps32 * {scale:.3g}"
    )


# --------------------------------------------------------------------------
# operators in float32
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, reference",
    [("ef", dense_ef_ce), ("ggn", dense_ggn_ce)],
    ids=["ef", "ggn"],
)
def test_operators_in_float32(kind, reference, float32):
    params, inputs, labels = numpy_problem()
    expected = reference(params, inputs, labels)
    params32 = cast(params, jnp.float32)
    data = (jnp.asarray(inputs, jnp.float32), jnp.asarray(labels))
    cls = fo.EmpiricalFisherOperator if kind == "ef" else fo.GGNOperator
    op = cls(mlp, params32, data, "cross_entropy")

    assert jnp.result_type(op.scale) == jnp.float32
    matrix = op.as_matrix()
    assert matrix.dtype == jnp.float32
    assert_close32(matrix, expected)
    vector = cast(jax.tree.map(np.ones_like, params), jnp.float32)
    product = op.mv(vector)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(product))
    assert_close32(flat(product), expected @ flat(vector))
    assert_close32(op.diagonal(), np.diag(expected))


def test_mc_fisher_in_float32_is_one_fixed_matrix(float32):
    params, inputs, labels = numpy_problem()
    op = fo.MCFisherOperator(
        mlp,
        cast(params, jnp.float32),
        (jnp.asarray(inputs, jnp.float32), jnp.asarray(labels)),
        "cross_entropy",
        jax.random.key(0),
        mc_samples=3,
    )
    matrix = np.asarray(op.as_matrix(), np.float64)
    assert np.all(np.isfinite(matrix))
    vector = cast(jax.tree.map(np.ones_like, params), jnp.float32)
    assert_close32(flat(op.mv(vector)), matrix @ flat(vector))
    # Symmetric PSD to float32 accuracy.
    assert_close32(matrix, matrix.T)
    assert np.linalg.eigvalsh(matrix).min() > -300 * EPS32 * np.abs(matrix).max()


# --------------------------------------------------------------------------
# the Laplace workflow in float32
# --------------------------------------------------------------------------


def test_laplace_solve_and_logdet_in_float32(float32):
    params, inputs, labels = numpy_problem()
    curvature = dense_ggn_ce(params, inputs, labels)
    prior = 0.3
    precision = curvature + prior * np.eye(len(curvature))
    params32 = cast(params, jnp.float32)
    data = (jnp.asarray(inputs, jnp.float32), jnp.asarray(labels))
    ggn = fo.GGNOperator(mlp, params32, data, "cross_entropy")
    posterior = fo.LaplacePosterior(ggn, prior)
    rhs = cast(jax.tree.map(np.ones_like, params), jnp.float32)
    expected = np.linalg.solve(precision, flat(rhs))
    condition = np.linalg.cond(precision)
    for method in ("dense", "cg"):
        solution = posterior.solve(rhs, solve_method=method)
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(solution))
        error = np.abs(flat(solution) - expected).max() / np.abs(expected).max()
        assert error < 100 * EPS32 * condition, (method, error, condition)
    _, exact = np.linalg.slogdet(precision)
    for method in ("dense", "eigh"):
        value = float(posterior.logdet(method))
        assert abs(value - exact) < 100 * EPS32 * len(precision) * max(1, abs(exact))


def test_evidence_in_float32_is_finite_or_an_error(float32):
    """Issue 10.2: float32, many training points, small λ: the dense Cholesky of
    `C + λI` breaks down. The evidence must stay finite (one eigendecomposition)
    or raise; a NaN prior precision is never selected or returned."""
    params, inputs, labels = numpy_problem(n=30)
    params32 = cast(params, jnp.float32)
    data = (jnp.asarray(inputs, jnp.float32), jnp.asarray(labels))
    ggn = fo.GGNOperator(mlp, params32, data, "cross_entropy", num_total_samples=60000)
    grid = np.logspace(-4, 2, 7)
    for kwargs in ({"grid": grid}, {}):
        try:
            result = fo.optimize_prior_precision(ggn, params32, -3.0, **kwargs)
        except (ValueError, FloatingPointError) as error:
            assert "finite" in str(error) or "positive definite" in str(error)
            continue
        leaves = jax.tree.leaves(result.prior_precision.precision)
        precision = np.concatenate(
            [np.ravel(np.asarray(x, np.float64)) for x in leaves]
        )
        assert np.all(np.isfinite(precision)) and np.all(precision > 0)
        assert np.isfinite(float(result.objective))
    with pytest.raises(ValueError, match="precision"):
        fo.PriorPrecision(params32, jnp.nan)


# --------------------------------------------------------------------------
# odd shapes
# --------------------------------------------------------------------------


def scalar_model(x, params):
    """One scalar per datum `()`, or `(N,)` for a batch."""
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"][:, 0]


@pytest.mark.parametrize("loss", ["mse", "binary_cross_entropy"])
def test_scalar_outputs_in_both_vmap_modes(loss, float32):
    """Issue 10.1: a batched model returning `(N,)` is N data points with one
    output each, not one datum with N outputs."""
    params, inputs, _ = numpy_problem(d_out=1)
    rng = np.random.default_rng(3)
    targets = (
        rng.normal(size=N) if loss == "mse" else rng.integers(0, 2, N).astype(float)
    )
    J = jacobians(scalar_model, params, inputs)[:, 0]  # (N, P)
    f = outputs64(scalar_model, params, inputs)[:, 0]
    if loss == "mse":
        g, h = 2 * (f - targets), np.full(N, 2.0)
    else:
        p = 1 / (1 + np.exp(-f))
        g, h = p - targets, p * (1 - p)
    expected = {
        "ef": np.einsum("n,np,nq->pq", g**2, J, J),
        "ggn": np.einsum("n,np,nq->pq", h, J, J),
    }
    params32 = cast(params, jnp.float32)
    data = (jnp.asarray(inputs, jnp.float32), jnp.asarray(targets, jnp.float32))
    kinds = {"ef": fo.EmpiricalFisherOperator, "ggn": fo.GGNOperator}
    if loss == "binary_cross_entropy":
        kinds.pop("ggn")
    for vmap_over_data in (True, False):
        for kind, cls in kinds.items():
            op = cls(
                scalar_model,
                params32,
                data,
                loss,
                vmap_over_data=vmap_over_data,
                num_total_samples=2 * N,
            )
            assert float(op.scale) == 2.0, (kind, vmap_over_data)
            assert_close32(np.asarray(op.as_matrix()) / 2, expected[kind])


def wide_model(x, params):
    """1000 logits from P = 2 * 3 params: `tanh(x W) @ E`, `E` fixed."""
    basis = jnp.cos(jnp.arange(3)[:, None] * jnp.linspace(0, 3, 1000)[None, :])
    return jnp.tanh(x @ params["w"]) @ basis.astype(params["w"].dtype)


def test_a_thousand_classes(float32):
    rng = np.random.default_rng(4)
    params = {"w": rng.normal(size=(2, 3))}
    inputs = rng.normal(size=(3, 2))
    labels = rng.integers(0, 1000, 3)
    J = jacobians(wide_model, params, inputs)
    p = softmax(outputs64(wide_model, params, inputs))
    ggn64 = np.einsum("nop,no,noq->pq", J, p, J) - np.einsum(
        "nop,no,nq,nqr->pr", J, p, p, J
    )
    params32 = cast(params, jnp.float32)
    data = (jnp.asarray(inputs, jnp.float32), jnp.asarray(labels))
    ggn = fo.GGNOperator(wide_model, params32, data, "cross_entropy")
    assert_close32(ggn.as_matrix(), ggn64, rtol_eps=1000)
    # The MC Fisher samples one of 1000 classes by inverse CDF in float32: every
    # draw must be a valid class, and the average is an unbiased GGN estimate.
    mc = fo.MCFisherOperator(
        wide_model, params32, data, "cross_entropy", jax.random.key(5), mc_samples=2000
    )
    estimate = np.asarray(mc.as_matrix(), np.float64)
    error = np.linalg.norm(estimate - ggn64) / np.linalg.norm(ggn64)
    assert error < 0.2, error


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["f16", "bf16"])
def test_scale_of_half_precision_params(dtype):
    """Issue 10.4: `num_total_samples / num_curv_samples` in at least float32
    (1e5 overflows float16; bfloat16 rounds 12500 to 12480)."""
    params, inputs, labels = numpy_problem(n=8)
    op = fo.EmpiricalFisherOperator(
        mlp,
        cast(params, dtype),
        (jnp.asarray(inputs, dtype), jnp.asarray(labels)),
        "cross_entropy",
        num_total_samples=100_000,
    )
    assert jnp.finfo(jnp.result_type(op.scale)).bits >= 32
    assert float(op.scale) == 12_500.0
    assert "12500" in repr(op)


@pytest.mark.parametrize("labels", [[1, 2, 3, 1], [0, -1, 2, 1]], ids=["1-based", "-1"])
def test_labels_out_of_range_are_an_error(labels, float32):
    """Issue 10.5: labels outside [0, C) would give a zero one-hot row."""
    params, inputs, _ = numpy_problem(n=4)
    data = (jnp.asarray(inputs, jnp.float32), jnp.asarray(labels))
    for cls in (fo.EmpiricalFisherOperator, fo.GGNOperator):
        with pytest.raises(ValueError, match=r"labels in \[0, 3\).*got labels in"):
            cls(mlp, cast(params, jnp.float32), data, "cross_entropy")


def test_likelihood_closing_over_a_traced_noise_scale():
    """Issue 10.3: `d/dσ` of a Cholesky solve through an operator whose
    `Likelihood` closes over σ is the same as with `Gaussian(σ)`, whose σ is a
    field (it was a silent 0 through CG and Cholesky)."""
    params, inputs, _ = numpy_problem(d_out=2, n=6)
    targets = jnp.asarray(np.random.default_rng(6).normal(size=(6, 2)))
    data = (jnp.asarray(inputs), targets)
    rhs = jax.tree.map(jnp.ones_like, cast(params, jnp.float64))

    def solution_norm(sigma, make_likelihood):
        likelihood = make_likelihood(sigma)
        ggn = fo.GGNOperator(mlp, cast(params, jnp.float64), data, likelihood)
        precision = ggn + fo.PriorPrecision(rhs, 1.0)
        x = lx.linear_solve(precision, rhs, lx.Cholesky()).value
        return sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(x))

    def closure(sigma):
        return fo.Likelihood(lambda f, y: jnp.sum((f - y) ** 2) / (2 * sigma**2))

    expected = jax.grad(solution_norm)(0.7, fo.Gaussian)
    assert abs(expected) > 1e-3  # the gradient that went missing is not 0
    try:
        actual = jax.grad(solution_norm)(0.7, closure)
    except (TypeError, ValueError) as error:  # refusing is allowed, silence is not
        assert "clos" in str(error)
    else:
        assert float(actual) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize(
    "dtypes",
    [(jnp.bfloat16, jnp.float32), (jnp.float32, jnp.float64)],
    ids=["bf16+f32", "f32+f64"],
)
def test_mixed_dtype_params_through_cg(dtypes):
    """Issue 10.7: params with leaves of two dtypes through a CG solve (lineax's
    CG promotes its iterates to the widest dtype). The solution has the params'
    dtypes and matches a float64 solve to the narrower dtype's accuracy."""
    params, inputs, labels = numpy_problem()
    narrow, wide = dtypes
    mixed = {
        "w1": jnp.asarray(params["w1"], narrow),
        "b1": jnp.asarray(params["b1"], narrow),
        "w2": jnp.asarray(params["w2"], wide),
        "b2": jnp.asarray(params["b2"], wide),
    }
    data = (jnp.asarray(inputs, wide), jnp.asarray(labels))
    ggn = fo.GGNOperator(mlp, mixed, data, "cross_entropy")
    rhs = jax.tree.map(jnp.ones_like, mixed)
    x = fo.LaplacePosterior(ggn, 1.0).solve(rhs, solve_method="cg")
    assert jax.tree.map(lambda leaf: leaf.dtype, x) == jax.tree.map(
        lambda leaf: leaf.dtype, mixed
    )
    rounded = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), mixed)
    dense = dense_ggn_ce(rounded, np.asarray(data[0], np.float64), labels)
    expected = np.linalg.solve(dense + np.eye(len(dense)), np.ones(len(dense)))
    error = np.abs(flat(x) - expected).max() / np.abs(expected).max()
    assert error < math.sqrt(float(jnp.finfo(narrow).eps)), error
