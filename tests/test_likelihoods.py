"""Likelihoods: each method against the obvious autodiff reference of its loss.

References are dense float64 (`jax.hessian` of the loss, `np.linalg`); every
built-in is also checked in float32 with tolerances from its eps.
"""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import fisherops as fo

OUTPUT = np.array([0.3, -1.2, 0.8, 2.0])


def target_for(likelihood):
    if isinstance(likelihood, fo.CrossEntropy):
        return np.array(2)
    if isinstance(likelihood, fo.BinaryCrossEntropy):
        return np.array([1.0, 0.0, 1.0, 0.0])
    return np.array([0.1, 0.2, -0.3, 0.5])


def quartic(f, y):
    """Non-convex in f: its Hessian has negative eigenvalues near f = y."""
    return jnp.sum((f - y) ** 4) - jnp.sum((f - y) ** 2)


LIKELIHOODS = {
    "mse": fo.MSE(),
    "gaussian": fo.Gaussian(0.7),
    "gaussian_per_output": fo.Gaussian(jnp.array([0.5, 1.0, 2.0, 0.3])),
    "cross_entropy": fo.CrossEntropy(),
    "cross_entropy_soft": fo.CrossEntropy(),
    "binary_cross_entropy": fo.BinaryCrossEntropy(),
    "callable": fo.Likelihood(quartic),
}


def case(name, dtype):
    likelihood = LIKELIHOODS[name]
    target = target_for(likelihood)
    if name == "cross_entropy_soft":
        target = np.array([0.1, 0.2, 0.3, 0.4])
    if jnp.issubdtype(target.dtype, jnp.floating):
        target = target.astype(dtype)
    return likelihood, jnp.asarray(OUTPUT, dtype), jnp.asarray(target)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("name", LIKELIHOODS)
def test_methods_match_autodiff_of_the_loss(name, dtype):
    likelihood, output, target = case(name, dtype)
    f64 = jnp.asarray(OUTPUT)
    y64 = target.astype(jnp.float64) if target.dtype == dtype else target
    loss64 = jax.tree_util.Partial(likelihood.loss)
    grad = np.asarray(jax.grad(loss64)(f64, y64))
    hessian = np.asarray(jax.hessian(loss64)(f64, y64))
    tangent = np.array([1.0, -2.0, 0.5, 3.0])
    tol = 50 * float(jnp.finfo(dtype).eps)
    scale = 1 + np.abs(hessian).max()

    np.testing.assert_allclose(likelihood.output_grad(output, target), grad, atol=tol)
    product = likelihood.hessian_mv(output, target, jnp.asarray(tangent, dtype))
    assert product.dtype == dtype
    np.testing.assert_allclose(product, hessian @ tangent, atol=tol * scale * 4)

    root = np.asarray(likelihood.hessian_sqrt(output, target), np.float64)
    values, vectors = np.linalg.eigh(hessian)
    positive_part = (vectors * np.maximum(values, 0)) @ vectors.T
    np.testing.assert_allclose(root @ root.T, positive_part, atol=tol * scale * 4)


def test_callable_default_clips_negative_curvature():
    """The quartic has a negative Hessian at f = y: its GGN factor is 0 there."""
    likelihood = fo.Likelihood(quartic)
    root = likelihood.hessian_sqrt(jnp.zeros(3), jnp.zeros(3))
    np.testing.assert_allclose(root, 0.0)


def test_hessian_sqrt_default_is_differentiable():
    """d/ds of (B B^T) for H(s) = s^2 A + I (repeated eigenvalues included)."""
    matrix = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.0]])

    class Quadratic(fo.AbstractLikelihood):
        scale: jax.Array

        def loss(self, output, target):
            hessian = self.scale**2 * matrix + jnp.eye(3)
            return 0.5 * output @ hessian @ output

    def gram(s):
        root = Quadratic(s).hessian_sqrt(jnp.ones(3), None)
        return jnp.sum(jnp.sin(root @ root.T))

    def reference(s):
        return jnp.sum(jnp.sin(s**2 * matrix + jnp.eye(3)))

    np.testing.assert_allclose(
        jax.grad(gram)(jnp.asarray(0.8)), jax.grad(reference)(0.8), rtol=1e-10
    )
    assert np.isfinite(jax.grad(gram)(jnp.asarray(0.0)))


def test_default_hessian_sqrt_under_vmap_is_right():
    likelihood = fo.Likelihood(quartic)
    outputs = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)))
    roots = jax.vmap(likelihood.hessian_sqrt)(outputs, jnp.zeros_like(outputs))
    for output, root in zip(outputs, roots, strict=True):
        hessian = np.asarray(jax.hessian(quartic)(output, jnp.zeros(4)))
        values, vectors = np.linalg.eigh(hessian)
        expected = (vectors * np.maximum(values, 0)) @ vectors.T
        np.testing.assert_allclose(root @ root.T, expected, atol=1e-10)


def test_samplers_and_has_sampler():
    key = jax.random.key(0)
    for likelihood in (fo.MSE(), fo.Gaussian(2.0), fo.BinaryCrossEntropy()):
        assert fo.has_sampler(likelihood)
        assert likelihood.sample(key, jnp.zeros(3)).shape == (3,)
    assert fo.CrossEntropy().sample(key, jnp.zeros(5)).shape == ()
    assert not fo.has_sampler(fo.Likelihood(quartic))
    draws = jax.vmap(lambda k: fo.Gaussian(2.0).sample(k, jnp.zeros(2)))(
        jax.random.split(key, 4000)
    )
    np.testing.assert_allclose(np.std(draws), 2.0, rtol=0.05)

    class NoSampler(fo.AbstractLikelihood):
        def loss(self, output, target):
            return jnp.sum((output - target) ** 2)

    assert not fo.has_sampler(NoSampler())
    with pytest.raises(NotImplementedError, match=r"NoSampler has no sampler"):
        NoSampler().sample(key, jnp.zeros(2))


def test_strings_are_the_classes():
    model_fn = lambda x, p: x @ p  # noqa: E731
    params = jnp.ones((2, 3))
    data = (jnp.ones((4, 2)), jnp.zeros(4, int))
    for name, cls in [
        ("cross_entropy", fo.CrossEntropy),
        ("binary_cross_entropy", fo.BinaryCrossEntropy),
        ("mse", fo.MSE),
    ]:
        targets = data[1] if cls is fo.CrossEntropy else jnp.zeros((4, 3))
        operator = fo.GGNOperator(model_fn, params, (data[0], targets), name)
        assert type(operator.likelihood) is cls
        assert repr(operator.likelihood) == f"{cls.__name__}()"


# ---------------------------------------------------------------------------
# Gaussian(sigma) and closures over traced arrays (issue 10.3)
# ---------------------------------------------------------------------------

RNG = np.random.default_rng(1)
PARAMS = {"w": jnp.asarray(RNG.normal(size=(3, 2))), "b": jnp.asarray([0.1, -0.2])}
INPUTS = jnp.asarray(RNG.normal(size=(5, 3)))
TARGETS = jnp.asarray(RNG.normal(size=(5, 2)))
RHS = jax.tree.map(jnp.ones_like, PARAMS)


def model_fn(x, params):
    return jnp.tanh(x @ params["w"] + params["b"])


def dense_solve(sigma):
    """`sum(solve(J^T J / sigma^2 + I, 1))` built the obvious way."""
    flat, unravel = jax.flatten_util.ravel_pytree(PARAMS)
    jacobians = jax.vmap(lambda x: jax.jacfwd(lambda v: model_fn(x, unravel(v)))(flat))(
        INPUTS
    )
    ggn = jnp.einsum("nop,noq->pq", jacobians, jacobians) / sigma**2
    return jnp.sum(jnp.linalg.solve(ggn + jnp.eye(flat.size), jnp.ones(flat.size)))


def closure_likelihood(sigma):
    return fo.Likelihood(
        lambda f, y: jnp.sum((f - y) ** 2) / (2 * sigma**2),
        sample=lambda key, f: f + sigma * jax.random.normal(key, f.shape),
    )


@pytest.mark.parametrize("solver", [lx.CG(rtol=1e-10, atol=1e-10), lx.Cholesky()])
@pytest.mark.parametrize("kind", ["gaussian", "closure", "model_closure"])
def test_gradient_through_solve_wrt_noise(kind, solver):
    """d/dsigma of a solve: Gaussian's field, a Likelihood closing over sigma, and
    a model_fn closing over a traced scale all give the dense gradient, never 0."""

    def solve(sigma):
        if kind == "gaussian":
            ggn = fo.GGNOperator(
                model_fn, PARAMS, (INPUTS, TARGETS), fo.Gaussian(sigma)
            )
        elif kind == "closure":
            likelihood = closure_likelihood(sigma)
            ggn = fo.GGNOperator(model_fn, PARAMS, (INPUTS, TARGETS), likelihood)
        else:  # J scaled by 1/sigma through the model: the same matrix

            def scaled_model(x, params):
                return model_fn(x, params) / sigma

            ggn = fo.GGNOperator(scaled_model, PARAMS, (INPUTS, TARGETS), fo.MSE())
            ggn = fo.scale(ggn, 0.5)
        operator = ggn + fo.PriorPrecision(PARAMS, 1.0)
        solution = lx.linear_solve(operator, RHS, solver).value
        return sum(jnp.sum(leaf) for leaf in jax.tree.leaves(solution))

    expected = jax.grad(dense_solve)(0.7)
    assert abs(expected) > 0.1
    np.testing.assert_allclose(jax.grad(solve)(0.7), expected, rtol=1e-7)


def test_batched_model_closing_over_tracers_is_an_error():
    def build(sigma):
        def batched(x, params):
            return model_fn(x, params) / sigma

        return fo.GGNOperator(
            batched, PARAMS, (INPUTS, TARGETS), "mse", vmap_over_data=False
        ).mv(RHS)

    with pytest.raises(
        ValueError, match=r"model_fn closes over traced arrays.*vmap_over_data=True"
    ):
        jax.grad(lambda s: jnp.sum(build(s)["b"]))(0.7)


def test_untraced_closures_are_not_converted():
    """Conversion only where tracers are closed over: new operators around the
    same functions reuse the compilation of `mv`."""
    likelihood = closure_likelihood(0.7)
    operator = fo.GGNOperator(model_fn, PARAMS, (INPUTS, TARGETS), likelihood)
    assert operator.likelihood.loss_fn is likelihood.loss_fn
    assert operator.model_fn is model_fn


def test_gaussian_checks_sigma():
    with pytest.raises(ValueError, match=r"sigma must be positive; got -1.0"):
        fo.Gaussian(-1.0)
    assert fo.Gaussian(1).sigma.dtype == jnp.result_type(float)
