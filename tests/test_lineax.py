"""The operators as lineax citizens: queries, priors, solves under jit/vmap/grad."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from _reference import (
    assert_close,
    assert_like_params,
    dense_ef,
    dense_ggn,
    dense_prior,
    flat,
    init_params,
    make_data,
    mlp,
    random_vector,
)
from jax.flatten_util import ravel_pytree

import fisherops as fo

PARAMS = init_params()
DATA = make_data("labels")
LOSS = "cross_entropy"
KEY = jax.random.key(3)
RHS = random_vector(PARAMS, seed=5)
KINDS = ["empirical", "mc", "ggn"]

SOLVERS = {
    "cg": lx.CG(rtol=1e-10, atol=1e-10),
    "cholesky": lx.Cholesky(),
    "auto": lx.AutoLinearSolver(well_posed=True),
    "svd": lx.SVD(),
}

PRECISIONS = {
    "scalar": 1.5,
    "per_leaf": {"layer1": {"w": 0.5, "b": 2.0}, "layer2": (1.0, 3.0)},
    "diagonal": jax.tree.map(
        lambda leaf: jnp.asarray(
            np.random.default_rng(leaf.size).uniform(0.5, 2.0, size=leaf.shape)
        ),
        PARAMS,
    ),
}


def build(kind, params=PARAMS, data=DATA, key=KEY, model_fn=mlp):
    if kind == "empirical":
        return fo.EmpiricalFisherOperator(model_fn, params, data, LOSS)
    if kind == "mc":
        return fo.MCFisherOperator(model_fn, params, data, LOSS, key, mc_samples=2)
    return fo.GGNOperator(model_fn, params, data, LOSS)


def dense(kind, params=PARAMS, data=DATA):
    """jnp, differentiable in params. The MC matrix is read off the operator."""
    if kind == "empirical":
        return dense_ef(mlp, params, data, LOSS)
    if kind == "mc":
        return build("mc", params, data).as_matrix()
    return dense_ggn(mlp, params, data, LOSS)


def numpy_solve(matrix, vector):
    return np.linalg.solve(np.asarray(matrix), flat(vector))


def assert_solution(solution, expected):
    assert_like_params(solution, PARAMS)
    assert_close(flat(solution), expected, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------
# structure and single-dispatch queries
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_structure(kind):
    op = build(kind)
    assert isinstance(op, lx.AbstractLinearOperator)
    assert isinstance(op, eqx.Module)
    for structure in (op.in_structure(), op.out_structure()):
        assert jax.tree.structure(structure) == jax.tree.structure(PARAMS)
        for leaf, param in zip(
            jax.tree.leaves(structure), jax.tree.leaves(PARAMS), strict=True
        ):
            assert isinstance(leaf, jax.ShapeDtypeStruct)
            assert leaf.shape == param.shape
            assert leaf.dtype == param.dtype
            assert not leaf.weak_type
    assert op.in_structure() == op.out_structure()


@pytest.mark.parametrize("kind", KINDS)
def test_queries(kind):
    op = build(kind)
    matrix = np.asarray(op.as_matrix())
    assert lx.is_symmetric(op)
    assert lx.is_positive_semidefinite(op)
    assert not lx.is_negative_semidefinite(op)
    assert not lx.is_diagonal(op)
    assert not lx.is_tridiagonal(op)
    assert not lx.has_unit_diagonal(op)
    assert not lx.is_lower_triangular(op)
    assert not lx.is_upper_triangular(op)
    assert_close(op.transpose().as_matrix(), matrix)
    assert_close(op.T.as_matrix(), matrix)
    assert_close(flat(op.transpose().mv(RHS)), matrix @ flat(RHS))
    assert_close(lx.conj(op).as_matrix(), matrix)
    assert_close(lx.materialise(op).as_matrix(), matrix)
    assert_close(lx.diagonal(op), np.diag(matrix))
    diag, lower, upper = lx.tridiagonal(op)
    assert_close(diag, np.diag(matrix))
    assert_close(lower, np.diag(matrix, -1))
    assert_close(upper, np.diag(matrix, 1))
    linearised = op.linearise()
    assert isinstance(linearised, lx.AbstractLinearOperator)
    assert linearised.in_structure() == op.in_structure()
    assert lx.is_positive_semidefinite(linearised)
    assert_close(linearised.as_matrix(), matrix)
    assert_close(lx.linearise(op).as_matrix(), matrix)


def test_materialise_holds_the_matrix_and_the_model():
    """`lx.materialise` keeps the dense matrix once and the operator's model:
    every read is the same number, scaling scales both, and the posterior and
    the prior tuning read the held matrix instead of computing it again."""
    op = build("ggn")
    matrix = np.asarray(dense_ggn(mlp, PARAMS, DATA, LOSS))
    held = lx.materialise(op)
    assert isinstance(held, fo.MaterialisedCurvatureOperator)
    assert lx.materialise(held) is held and lx.linearise(held) is held
    assert lx.is_symmetric(held) and lx.is_positive_semidefinite(held)
    assert held.model_fn is op.model_fn and held.params is op.params
    assert_close(held.as_matrix(), matrix)
    assert_close(lx.diagonal(held), np.diag(matrix))
    product = held.mv(RHS)
    assert_like_params(product, PARAMS)
    assert_close(flat(product), matrix @ flat(RHS))
    shape = held.sqrt_shape()
    basis = jnp.eye(shape[0] * shape[1]).reshape(-1, *shape)
    columns = jax.vmap(lambda e: ravel_pytree(held.sqrt_mv(e))[0])(basis)
    assert_close(columns.T @ columns, matrix)
    scaled = 2.5 * held
    assert isinstance(scaled, fo.MaterialisedCurvatureOperator)
    assert_close(scaled.as_matrix(), 2.5 * matrix)
    assert_close(flat(scaled.mv(RHS)), 2.5 * matrix @ flat(RHS))
    assert_close(flat(scaled.sqrt_mv(basis[0])), np.sqrt(2.5) * columns[0])
    with pytest.raises(ValueError, match="algorithm must be None"):
        held.as_matrix("qr")
    with pytest.raises(ValueError, match=r"matrix must be the operator's \(P, P\)"):
        fo.MaterialisedCurvatureOperator(op, jnp.eye(3))

    # Nothing downstream recomputes the matrix: a held matrix that differs from
    # the operator's own is what the posterior and the tuning see.
    fake = fo.MaterialisedCurvatureOperator(op, jnp.asarray(2 * matrix))
    posterior = fo.LaplacePosterior(fake, 1.5).factorise()
    expected = np.linalg.solve(2 * matrix + 1.5 * np.eye(len(matrix)), flat(RHS))
    assert_close(flat(posterior.solve(RHS)), expected)
    result = fo.optimize_prior_precision(fake)
    reference = fo.optimize_prior_precision(2.0 * op)
    assert_close(result.prior_precision.precision, reference.prior_precision.precision)
    assert_close(
        posterior.predictive(DATA[0]),
        fo.LaplacePosterior(2.0 * op, 1.5).predictive(DATA[0], solve_method="dense"),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_linearised_mv_does_not_run_the_model(kind):
    """linearise() does the primal work once; its mv only does linear work."""
    calls = []

    def counting_model(x, params):
        calls.append(None)
        return mlp(x, params)

    linearised = build(kind, model_fn=counting_model).linearise()
    calls.clear()
    product = linearised.mv(RHS)
    assert not calls, f"model_fn ran {len(calls)} time(s) in a linearised mv"
    assert_close(flat(product), np.asarray(dense(kind)) @ flat(RHS))


# --------------------------------------------------------------------------
# priors and sums
# --------------------------------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS.values(), ids=PRECISIONS.keys())
def test_prior_precision(precision):
    prior = fo.PriorPrecision(PARAMS, precision)
    expected = dense_prior(PARAMS, precision)
    assert isinstance(prior, lx.AbstractLinearOperator)
    assert prior.in_structure() == build("empirical").in_structure()
    assert_close(prior.as_matrix(), expected)
    assert_close(flat(prior.mv(RHS)), expected @ flat(RHS))
    assert_close(lx.diagonal(prior), np.diag(expected))
    assert_close(prior.diagonal(), np.diag(expected))
    assert lx.is_symmetric(prior)
    assert lx.is_positive_semidefinite(prior)
    assert lx.is_diagonal(prior)


def test_prior_precision_accepts_a_jax_scalar():
    prior = fo.PriorPrecision(PARAMS, jnp.asarray(2.5))
    assert_close(prior.as_matrix(), dense_prior(PARAMS, 2.5))
    assert lx.is_positive_semidefinite(prior)


@pytest.mark.parametrize("solver", SOLVERS.values(), ids=SOLVERS.keys())
@pytest.mark.parametrize("precision", PRECISIONS.values(), ids=PRECISIONS.keys())
def test_solve_fisher_plus_prior(precision, solver):
    op = build("empirical")
    prior = fo.PriorPrecision(PARAMS, precision)
    total = op + prior
    assert lx.is_symmetric(total)
    assert lx.is_positive_semidefinite(total)
    matrix = np.asarray(dense("empirical")) + dense_prior(PARAMS, precision)
    assert_close(total.as_matrix(), matrix)
    solution = lx.linear_solve(total, RHS, solver).value
    assert_solution(solution, numpy_solve(matrix, RHS))


@pytest.mark.parametrize("solver", SOLVERS.values(), ids=SOLVERS.keys())
def test_solve_prior_plus_fisher(solver):
    precision = PRECISIONS["per_leaf"]
    total = fo.PriorPrecision(PARAMS, precision) + build("ggn")
    assert lx.is_positive_semidefinite(total)
    matrix = np.asarray(dense("ggn")) + dense_prior(PARAMS, precision)
    solution = lx.linear_solve(total, RHS, solver).value
    assert_solution(solution, numpy_solve(matrix, RHS))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("solver", ["cg", "cholesky"])
def test_solve_every_operator(kind, solver):
    total = build(kind) + fo.PriorPrecision(PARAMS, 1.0)
    matrix = np.asarray(dense(kind)) + np.eye(flat(PARAMS).size)
    solution = lx.linear_solve(total, RHS, SOLVERS[solver]).value
    assert_solution(solution, numpy_solve(matrix, RHS))


@pytest.mark.parametrize("scalar", [0.5, jnp.asarray(0.5)], ids=["python", "jax"])
@pytest.mark.parametrize("solver", ["cg", "cholesky"])
def test_scaled_fisher_plus_prior(scalar, solver):
    scaled = fo.scale(build("empirical"), scalar)
    assert isinstance(scaled, fo.EmpiricalFisherOperator)
    assert float(scaled.scale) == 0.5
    assert lx.is_symmetric(scaled)
    assert lx.is_positive_semidefinite(scaled)
    assert_close(scaled.as_matrix(), 0.5 * np.asarray(dense("empirical")))
    total = scaled + fo.PriorPrecision(PARAMS, 2.0)
    assert lx.is_positive_semidefinite(total)
    matrix = 0.5 * np.asarray(dense("empirical")) + dense_prior(PARAMS, 2.0)
    solution = lx.linear_solve(total, RHS, SOLVERS[solver]).value
    assert_solution(solution, numpy_solve(matrix, RHS))


def test_scale_by_a_traced_scalar_under_jit():
    @jax.jit
    def solve(scalar, params):
        op = fo.scale(fo.EmpiricalFisherOperator(mlp, params, DATA, LOSS), scalar)
        total = op + fo.PriorPrecision(params, 1.0)
        return lx.linear_solve(total, RHS, SOLVERS["cg"]).value

    matrix = 3.0 * np.asarray(dense("empirical")) + np.eye(flat(PARAMS).size)
    assert_solution(solve(3.0, PARAMS), numpy_solve(matrix, RHS))


# --------------------------------------------------------------------------
# jit, vmap, grad
# --------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["cg", "cholesky", "auto"])
@pytest.mark.parametrize("kind", KINDS)
def test_build_and_solve_under_jit(kind, solver):
    @jax.jit
    def solve(params, data, key, rhs):
        total = build(kind, params, data, key) + fo.PriorPrecision(params, 1.0)
        return lx.linear_solve(total, rhs, SOLVERS[solver]).value

    matrix = np.asarray(dense(kind)) + np.eye(flat(PARAMS).size)
    assert_solution(solve(PARAMS, DATA, KEY, RHS), numpy_solve(matrix, RHS))


@pytest.mark.parametrize("solver", ["cg", "cholesky"])
def test_vmap_over_right_hand_sides(solver):
    total = build("empirical") + fo.PriorPrecision(PARAMS, PRECISIONS["diagonal"])
    rhs = [random_vector(PARAMS, seed) for seed in range(3)]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *rhs)
    solutions = jax.vmap(lambda b: lx.linear_solve(total, b, SOLVERS[solver]).value)(
        stacked
    )
    matrix = np.asarray(dense("empirical")) + dense_prior(
        PARAMS, PRECISIONS["diagonal"]
    )
    for i, b in enumerate(rhs):
        assert_solution(
            jax.tree.map(lambda leaf, i=i: leaf[i], solutions), numpy_solve(matrix, b)
        )


def test_vmap_over_prior_precision():
    op = build("ggn")

    def solve(precision):
        total = op + fo.PriorPrecision(PARAMS, precision)
        return lx.linear_solve(total, RHS, SOLVERS["cg"]).value

    precisions = jnp.asarray([0.5, 1.0, 4.0])
    solutions = jax.vmap(solve)(precisions)
    for i, precision in enumerate(precisions):
        matrix = np.asarray(dense("ggn")) + float(precision) * np.eye(flat(PARAMS).size)
        assert_solution(
            jax.tree.map(lambda leaf, i=i: leaf[i], solutions), numpy_solve(matrix, RHS)
        )


def _sum_of_squares(tree):
    return sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("solver", ["cg", "cholesky"])
@pytest.mark.parametrize("kind", KINDS)
def test_grad_through_solve_wrt_params(kind, solver):
    """d/dparams sum(solve(F(params) + I, b)^2) against the dense computation."""
    rhs = flat(RHS)

    def through_fisherops(params):
        total = build(kind, params) + fo.PriorPrecision(params, 1.0)
        return _sum_of_squares(lx.linear_solve(total, RHS, SOLVERS[solver]).value)

    def through_dense(params):
        matrix = dense(kind, params) + jnp.eye(rhs.size)
        return jnp.sum(jnp.linalg.solve(matrix, rhs) ** 2)

    expected = flat(jax.grad(through_dense)(PARAMS))
    assert np.abs(expected).max() > 1e-6
    value, gradient = jax.jit(jax.value_and_grad(through_fisherops))(PARAMS)
    assert_close(value, through_dense(PARAMS), rtol=1e-7)
    assert_like_params(gradient, PARAMS)
    assert_close(flat(gradient), expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("solver", ["cg", "cholesky"])
def test_grad_through_solve_wrt_prior_precision(solver):
    op = build("ggn")
    matrix = jnp.asarray(dense("ggn"))
    rhs = flat(RHS)

    def through_fisherops(precision):
        total = op + fo.PriorPrecision(PARAMS, precision)
        return _sum_of_squares(lx.linear_solve(total, RHS, SOLVERS[solver]).value)

    def through_dense(precision):
        solution = jnp.linalg.solve(matrix + precision * jnp.eye(rhs.size), rhs)
        return jnp.sum(solution**2)

    precision = jnp.asarray(0.8)
    assert_close(
        jax.grad(through_fisherops)(precision),
        jax.grad(through_dense)(precision),
        rtol=1e-6,
    )


# --------------------------------------------------------------------------
# no recompilation
# --------------------------------------------------------------------------


def _new_inputs(seed):
    data = make_data("labels", seed=10 + seed)
    return init_params(seed), data, jax.random.key(seed), random_vector(PARAMS, seed)


@pytest.mark.parametrize("kind", KINDS)
def test_build_and_solve_traces_once(kind):
    @jax.jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def solve(params, data, key, rhs):
        total = build(kind, params, data, key) + fo.PriorPrecision(params, 1.0)
        return lx.linear_solve(total, rhs, SOLVERS["cg"]).value

    for seed in range(3):
        params, data, key, rhs = _new_inputs(seed)
        solve(params, data, key, rhs)


@pytest.mark.parametrize("kind", KINDS)
def test_operator_passed_into_jit_traces_once(kind):
    """Operators built outside jit from new arrays hit the same compiled function."""

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def solve(operator, rhs):
        total = operator + fo.PriorPrecision(rhs, 1.0)
        return lx.linear_solve(total, rhs, SOLVERS["cg"]).value

    for seed in range(3):
        params, data, key, rhs = _new_inputs(seed)
        operator = build(kind, params, data, key)
        solution = solve(operator, rhs)
        matrix = np.asarray(operator.as_matrix()) + np.eye(flat(params).size)
        assert_close(flat(solution), numpy_solve(matrix, rhs), rtol=1e-6, atol=1e-8)


def test_unravel_order_matches_as_matrix():
    """as_matrix is in ravel_pytree order: column i is mv(e_i)."""
    op = build("ggn")
    flat_params, unravel = ravel_pytree(PARAMS)
    matrix = np.asarray(op.as_matrix())
    for i in (0, 7, 12, 16, 30):
        basis = jnp.zeros_like(flat_params).at[i].set(1.0)
        assert_close(flat(op.mv(unravel(basis))), matrix[:, i])


@pytest.mark.parametrize("kind", KINDS)
def test_scalar_times_operator_is_an_operator(kind):
    """`s * op`, `op * s`, `op / s` and `fisherops.scale` with non-negative
    scalars keep the fisherops operator (PSD, `sqrt_mv`, diagonal, linearised)."""
    op = build(kind)
    matrix = np.asarray(op.as_matrix())
    linearised = op.linearise()
    cases = [
        (2.0 * op, 2.0),
        (op * np.float64(3.0), 3.0),
        (op / 4, 0.25),
        (fo.scale(linearised, 2.0), 2.0),
        (0.5 * linearised, 0.5),
    ]
    for scaled, factor in cases:
        assert type(scaled) is type(op) or type(scaled) is type(linearised)
        assert lx.is_positive_semidefinite(scaled)
        assert_close(lx.diagonal(scaled), factor * np.diag(matrix))
        coefficients = jnp.ones(scaled.sqrt_shape())
        assert_close(
            flat(scaled.sqrt_mv(coefficients)),
            np.sqrt(factor) * flat(op.sqrt_mv(coefficients)),
        )
    assert "scale=2.0" in repr(2.0 * op)
    assert not isinstance(-1.0 * op, type(op))  # lineax's product: not PSD
    total = 2.0 * op + fo.PriorPrecision(PARAMS, 1.0)
    solution = lx.linear_solve(total, RHS, SOLVERS["cg"]).value
    assert_solution(solution, numpy_solve(2.0 * matrix + np.eye(matrix.shape[0]), RHS))


def test_vector_widened_by_lineax_is_accepted():
    """Mixed-dtype params (float32 + float64): a float32 leaf may come in float64
    (lineax promotes inside CG) and is cast back; float32 where float64 is wanted
    is still an error."""
    params = {"layer1": jax.tree.map(lambda x: x.astype(jnp.float32), PARAMS["layer1"])}
    params["layer2"] = PARAMS["layer2"]
    op = build("ggn", params)
    vector = random_vector(params)
    product = op.mv(vector)
    assert_like_params(product, params)
    widened = jax.tree.map(lambda leaf: leaf.astype(jnp.float64), vector)
    for result in (op.mv(widened), op.linearise().mv(widened)):
        assert_like_params(result, params)
        assert_close(flat(result), flat(product))
    narrowed = jax.tree.map(lambda leaf: leaf.astype(jnp.float32), vector)
    with pytest.raises(ValueError, match=r"vector\['layer2'\]\[0\] must be float64"):
        op.mv(narrowed)
