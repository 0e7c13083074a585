"""The library never compiles a batched LAPACK call (issue 10.9).

jaxlib's CPU LAPACK kernels run a batch of decompositions as tasks on XLA's
intra-op thread pool and block until they finish; two such calls at once can
deadlock a 2-core machine (`tests/repro_lapack_deadlock.py`). A user's call into
fisherops must not be able to reach that. The paths that decompose a matrix
inside a map or a vmap (SLQ, the evidence search, the dense predictive, default
likelihood Hessian square roots) run here, and the batched LAPACK calls they
traced (`batched_lapack_calls`, see conftest.py) must be none. Every other test
is watched too: a batched call anywhere shows as a `BatchedLapackWarning` in the
run's warnings summary.

The shapes (3 inputs, 5 hidden, 4 classes, 11 points) are used by no other test,
so nothing here is served from an earlier compilation.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BatchedLapackWarning

import fisherops as fo

D_IN, HIDDEN, CLASSES, N = 3, 5, 4, 11


def mlp(x, params):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def problem():
    rng = np.random.default_rng(11)
    params = {
        "w1": jnp.asarray(rng.normal(size=(D_IN, HIDDEN)) / 2),
        "b1": jnp.asarray(rng.normal(size=HIDDEN) / 4),
        "w2": jnp.asarray(rng.normal(size=(HIDDEN, CLASSES)) / 2),
        "b2": jnp.zeros(CLASSES),
    }
    data = (
        jnp.asarray(rng.normal(size=(N, D_IN))),
        jnp.asarray(rng.integers(0, CLASSES, N)),
    )
    return params, data


def test_the_watch_sees_a_batched_call(batched_lapack_calls):
    """The guard itself: a vmapped `inv` in a test is seen, with its line."""
    stack = jnp.stack([jnp.eye(2), 2 * jnp.eye(2), 3 * jnp.eye(2)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jax.vmap(jnp.linalg.inv)(stack)
    assert any(
        issubclass(w.category, BatchedLapackWarning) and "lu on shape" in str(w.message)
        for w in caught
    )
    calls = batched_lapack_calls()
    assert ("lu", (3, 2, 2)) in [(name, shape) for name, shape, _ in calls]
    assert all(where.startswith(__file__) for _, _, where in calls)


@pytest.mark.filterwarnings("ignore:optimize_prior_precision did not converge")
def test_slq_and_prior_tuning(batched_lapack_calls):
    """SLQ's tridiagonal eigendecompositions (one per probe), alone and inside
    the evidence search (the search whose test reference hung CI)."""
    params, data = problem()
    ggn = fo.GGNOperator(mlp, params, data, "cross_entropy")
    key = jax.random.key(0)
    slq = dict(logdet_method="slq", key=key, num_probes=3, num_lanczos_steps=5)
    fo.LaplacePosterior(ggn, 0.5).logdet(**slq)
    fo.optimize_prior_precision(ggn, params, -3.0, num_steps=2, **slq)
    assert batched_lapack_calls() == []


def test_dense_posterior(batched_lapack_calls):
    """One Cholesky for solves, samples and the predictive variances of many
    inputs (triangular solves with many right-hand sides, not a stack)."""
    params, data = problem()
    ggn = fo.GGNOperator(mlp, params, data, "cross_entropy")
    posterior = fo.LaplacePosterior(ggn, 0.5).factorise()
    posterior.sample(jax.random.key(1), 3)
    posterior.predictive(data[0][:4], chunk_size=2)
    assert batched_lapack_calls() == []


@pytest.mark.timeout(240)
def test_a_users_vmap_over_prior_precisions(batched_lapack_calls):
    """Issue 19.2: `jit(vmap(λ -> evidence))` and its `value_and_grad`, with two
    curvatures' evidence in one program (the form that hung): the dense
    log-determinant's Cholesky-else-`eigh` runs one λ after another, so no
    decomposition is batched; then many calls with new λs, under a timeout."""
    params, data = problem()
    curvatures = (
        fo.GGNOperator(mlp, params, data, "cross_entropy"),
        fo.EmpiricalFisherOperator(mlp, params, data, "cross_entropy"),
    )

    def evidence(precision):
        return sum(
            fo.LaplacePosterior(c, precision).log_marginal_likelihood(-3.0)
            for c in curvatures
        )

    values = jax.jit(jax.vmap(evidence))
    values_and_grads = jax.jit(jax.vmap(jax.value_and_grad(evidence)))
    precisions = jnp.array([1e-3, 10.0])
    value, grad = values_and_grads(precisions)
    slq = dict(logdet_method="slq", num_probes=2, num_lanczos_steps=4)
    slq_logdet = lambda p: fo.LaplacePosterior(curvatures[0], p).logdet(**slq)  # noqa: E731
    jax.vmap(jax.grad(slq_logdet))(precisions)
    assert batched_lapack_calls() == []
    for i, precision in enumerate(precisions):
        one_value, one_grad = jax.value_and_grad(evidence)(precision)
        assert float(value[i]) == pytest.approx(float(one_value), rel=1e-10)
        assert float(grad[i]) == pytest.approx(float(one_grad), rel=1e-8)
    np.testing.assert_allclose(values(precisions), value, rtol=1e-12)
    for step in range(20):
        jax.block_until_ready(values(precisions * (1 + step)))
        jax.block_until_ready(values_and_grads(precisions / (1 + step)))


def test_likelihood_hessian_square_roots(batched_lapack_calls):
    """A likelihood without a closed-form `hessian_sqrt` gets one from its dense
    output Hessian by `eigh`: per datum, not one call on a stack of N."""
    params, (inputs, _) = problem()
    targets = jnp.asarray(np.random.default_rng(2).normal(size=(N, CLASSES)))
    quartic = fo.Likelihood(lambda f, y: jnp.sum((f - y) ** 4 + (f - y) ** 2))
    ggn = fo.GGNOperator(mlp, params, (inputs, targets), quartic)
    ggn.as_matrix()
    assert batched_lapack_calls() == []
