"""Likelihoods: each method against the obvious autodiff reference of its loss.

References are dense float64 (`jax.hessian` of the loss, `np.linalg`); every
built-in is also checked in float32 with tolerances from its eps.
"""

import equinox as eqx
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


# ---------------------------------------------------------------------------
# Structured outputs: extra axes before the last, the loss summed over them
# ---------------------------------------------------------------------------

STRUCTURED = np.random.default_rng(4).normal(size=(2, 3, 4))  # positions (2, 3), C = 4


def structured_target(name):
    rng = np.random.default_rng(5)
    if name == "cross_entropy":
        return rng.integers(0, 4, size=(2, 3))
    if name == "cross_entropy_soft":
        return np.asarray(jax.nn.softmax(rng.normal(size=(2, 3, 4))))
    if name == "binary_cross_entropy":
        return (rng.normal(size=(2, 3, 4)) > 0).astype(float)
    return rng.normal(size=(2, 3, 4))


@eqx.filter_jit
def structured_methods(likelihood, output, target, tangent):
    positions = jax.vmap(likelihood.loss)(
        output.reshape(-1, output.shape[-1]),
        target.reshape(-1, *target.shape[2:]),
    )
    return {
        "loss": likelihood.loss(output, target),
        "per_position": jnp.sum(positions),
        "grad": likelihood.output_grad(output, target),
        "autodiff_grad": jax.grad(likelihood.loss)(output, target),
        "hessian": jax.hessian(likelihood.loss)(output, target).reshape(24, 24),
        "hessian_mv": likelihood.hessian_mv(output, target, tangent).reshape(-1),
        "root": likelihood.hessian_sqrt(output, target),
        "blocks": likelihood.hessian_sqrt_blocks(output, target),
        "draw": likelihood.sample(jax.random.key(0), output),
    }


@pytest.mark.parametrize(
    "name",
    ["gaussian_per_output", "cross_entropy", "cross_entropy_soft"]
    + ["binary_cross_entropy"],
)
def test_structured_output_sums_over_positions(name):
    """An output `(2, 3, C)`: the loss is the sum of the per-position losses, every
    method matches autodiff of it, the Hessian is block-diagonal over positions."""
    likelihood = LIKELIHOODS[name]
    output, target = jnp.asarray(STRUCTURED), jnp.asarray(structured_target(name))
    tangent = jnp.asarray(np.random.default_rng(6).normal(size=(2, 3, 4)))
    got = structured_methods(likelihood, output, target, tangent)
    hessian = got["hessian"]
    np.testing.assert_allclose(got["loss"], got["per_position"])
    np.testing.assert_allclose(got["grad"], got["autodiff_grad"])
    np.testing.assert_allclose(
        got["hessian_mv"], hessian @ tangent.reshape(-1), atol=1e-12
    )
    np.testing.assert_allclose(got["root"] @ got["root"].T, hessian, atol=1e-12)
    assert got["blocks"].shape == (6, 4, 4)  # one root per position
    np.testing.assert_array_equal(
        jax.scipy.linalg.block_diag(*got["blocks"]), got["root"]
    )
    blocks = np.kron(np.eye(6), np.ones((4, 4)))  # one (C, C) block per position
    np.testing.assert_array_equal(hessian * (1 - blocks), 0)
    labels = isinstance(likelihood, fo.CrossEntropy)
    assert got["draw"].shape == (output.shape[:-1] if labels else output.shape)


def test_cross_entropy_samples_each_position_from_its_softmax():
    logits = jnp.log(jnp.asarray([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    keys = jax.random.split(jax.random.key(1), 4000)
    draws = jax.jit(jax.vmap(lambda k: fo.CrossEntropy().sample(k, logits)))(keys)
    frequencies = jax.vmap(lambda d: jnp.bincount(d, length=3), 1)(draws) / 4000
    np.testing.assert_allclose(frequencies, jnp.exp(logits), atol=0.03)


T, D, C = 4, 3, 3  # positions, features, classes
SEQ_PARAMS = {
    "w": jnp.asarray(RNG.normal(size=(D, C))),
    "b": jnp.asarray(RNG.normal(size=C)),
}
SEQ_INPUTS = jnp.asarray(RNG.normal(size=(5, T, D)))


def position_wise(x, params):
    """`(..., T, D) -> (..., T, C)`: no interaction between positions."""
    return jnp.tanh(x) @ params["w"] + params["b"]


def sequence_targets(loss):
    rng = np.random.default_rng(7)
    if loss == "cross_entropy":
        return jnp.asarray(rng.integers(0, C, size=(5, T)))
    if loss == "binary_cross_entropy":
        return jnp.asarray(rng.normal(size=(5, T, C)) > 0).astype(float)
    return jnp.asarray(rng.normal(size=(5, T, C)))


def flattened(inputs, targets):
    """Every position its own datum."""
    return inputs.reshape(-1, D), targets.reshape(-1, *targets.shape[2:])


@pytest.mark.parametrize("vmap_over_data", [True, False], ids=["vmap", "batched"])
@pytest.mark.parametrize("loss", ["cross_entropy", "binary_cross_entropy", "mse"])
def test_sequence_ggn_is_the_ggn_of_the_flattened_positions(loss, vmap_over_data):
    data = (SEQ_INPUTS, sequence_targets(loss))
    expected = fo.GGNOperator(position_wise, SEQ_PARAMS, flattened(*data), loss)
    sequence = fo.GGNOperator(
        position_wise, SEQ_PARAMS, data, loss, vmap_over_data=vmap_over_data
    )
    reference = expected.as_matrix()
    assert sequence.sqrt_shape() == (5, T * C)
    for algorithm in ("rows", "mv"):
        np.testing.assert_allclose(
            sequence.as_matrix(algorithm), reference, rtol=1e-12, atol=1e-12
        )


def test_sequence_fishers_use_the_summed_gradient_of_a_datum():
    """EF: `J_n^T g_n` with `g_n` the `(T, C)` gradient of the summed loss (cross
    terms between positions included); MC: unbiased for the GGN (the functional
    API, many samples), deterministic for a fixed key."""
    data = (SEQ_INPUTS, sequence_targets("cross_entropy"))
    flat, unravel = jax.flatten_util.ravel_pytree(SEQ_PARAMS)

    def summed_loss(p, x, y):
        logp = jax.nn.log_softmax(position_wise(x, unravel(p)))
        return -jnp.sum(logp[jnp.arange(T), y])

    grads = jax.vmap(jax.grad(summed_loss), (None, 0, 0))(flat, *data)
    ef = fo.EmpiricalFisherOperator(position_wise, SEQ_PARAMS, data, "cross_entropy")
    np.testing.assert_allclose(ef.as_matrix(), grads.T @ grads, atol=1e-12)

    mv = fo.create_MC_fisher_mv(
        position_wise,
        SEQ_PARAMS,
        data,
        "cross_entropy",
        jax.random.key(2),
        mc_samples=4000,
    )
    basis = jnp.eye(flat.size)
    mc = jax.vmap(lambda e: jax.flatten_util.ravel_pytree(mv(unravel(e)))[0])(basis)
    again = jax.flatten_util.ravel_pytree(mv(unravel(basis[1])))[0]
    np.testing.assert_allclose(again, mc[1], rtol=1e-12)  # one fixed matrix
    ggn = fo.GGNOperator(position_wise, SEQ_PARAMS, data, "cross_entropy").as_matrix()
    np.testing.assert_allclose(mc, ggn, atol=0.1 * np.abs(ggn).max())
    assert np.abs(mc - ggn).max() > 0  # a sampled matrix
