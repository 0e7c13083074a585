"""Dense float64 references for the tests, built the obvious way.

Nothing here imports fisherops. Every curvature matrix is assembled from
per-datum Jacobians `J_n` (`jax.jacfwd` on the raveled parameters) and the loss
formulas of SPEC.md written out by hand:

    EF  = factor * sum_n J_n^T g_n g_n^T J_n
    GGN = factor * sum_n J_n^T H_n J_n
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jax.flatten_util import ravel_pytree

D_IN = 3
HIDDEN = 4
N_OUT = 3  # outputs; also the number of classes for cross-entropy
N_DATA = 5

# (loss name, target kind) pairs: every built-in loss with every target layout
# SPEC.md allows for it.
LOSS_TARGETS = [
    ("mse", "vector"),
    ("cross_entropy", "labels"),  # integer labels, shape (N,)
    ("cross_entropy", "labels_column"),  # integer labels, shape (N, 1)
    ("cross_entropy", "one_hot"),  # float one-hot, shape (N, C)
    ("cross_entropy", "soft"),  # float probabilities, shape (N, C)
    ("binary_cross_entropy", "binary"),  # {0, 1} floats, shape (N, O)
]
LOSS_TARGET_IDS = [f"{loss}-{kind}" for loss, kind in LOSS_TARGETS]


# --------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------


def init_params(seed=0, d_in=D_IN, hidden=HIDDEN, d_out=N_OUT):
    """A nested dict + tuple pytree: P = d_in*hidden + hidden + hidden*d_out + d_out."""
    rng = np.random.default_rng(seed)
    return {
        "layer1": {
            "w": jnp.asarray(rng.normal(size=(d_in, hidden))),
            "b": jnp.asarray(0.5 * rng.normal(size=(hidden,))),
        },
        "layer2": (
            jnp.asarray(rng.normal(size=(hidden, d_out))),
            jnp.asarray(0.5 * rng.normal(size=(d_out,))),
        ),
    }


def mlp(x, params):
    """One hidden tanh layer. Works on one datum `(D,)` or a batch `(N, D)`."""
    hidden = jnp.tanh(x @ params["layer1"]["w"] + params["layer1"]["b"])
    w2, b2 = params["layer2"]
    return hidden @ w2 + b2


def per_datum(fn):
    """Wrap `fn(x, ...)` so that it fails unless `x` is ONE datum (a vector)."""

    @functools.wraps(fn)
    def wrapped(x, *args):
        if jnp.ndim(x) != 1:
            raise AssertionError(
                f"vmap_over_data=True must pass one datum, got shape {jnp.shape(x)}"
            )
        return fn(x, *args)

    return wrapped


def batched(fn):
    """Wrap `fn(x, ...)` so that it fails unless `x` is a batch (a matrix)."""

    @functools.wraps(fn)
    def wrapped(x, *args):
        if jnp.ndim(x) != 2:
            raise AssertionError(
                f"vmap_over_data=False must pass the batch, got shape {jnp.shape(x)}"
            )
        return fn(x, *args)

    return wrapped


@functools.cache
def model_for(vmap_over_data):
    """The MLP, guarded so that it only accepts what the given mode must pass.

    One function per mode, so that operators of different tests share their
    compiled methods."""
    return per_datum(mlp) if vmap_over_data else batched(mlp)


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------


def make_targets(target_kind, n=N_DATA, n_out=N_OUT, seed=1):
    """Targets of one kind. The label kinds share the same underlying labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_out, size=n)
    if target_kind == "vector":
        return jnp.asarray(rng.normal(size=(n, n_out)))
    if target_kind == "labels":
        return jnp.asarray(labels, dtype=jnp.int32)
    if target_kind == "labels_column":
        return jnp.asarray(labels[:, None], dtype=jnp.int32)
    if target_kind == "one_hot":
        return jnp.asarray(np.eye(n_out)[labels])
    if target_kind == "soft":
        return jnp.asarray(rng.dirichlet(np.ones(n_out), size=n))
    if target_kind == "binary":
        return jnp.asarray(rng.integers(0, 2, size=(n, n_out)).astype(np.float64))
    raise ValueError(target_kind)


def make_inputs(n=N_DATA, d_in=D_IN, seed=2):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, d_in)))


def make_data(target_kind, n=N_DATA, seed=1):
    """`(X, Y)` with `X` of shape `(n, D_IN)`."""
    return make_inputs(n, seed=seed + 1), make_targets(target_kind, n, seed=seed)


def random_vector(params, seed=3):
    """A random pytree with the structure, shapes and dtypes of `params`."""
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        treedef,
        [jnp.asarray(rng.normal(size=leaf.shape), dtype=leaf.dtype) for leaf in leaves],
    )


def flat(tree):
    """`ravel_pytree(tree)` as a numpy array."""
    return np.asarray(ravel_pytree(tree)[0])


# --------------------------------------------------------------------------
# hand-written loss formulas, for ONE datum
# --------------------------------------------------------------------------


def _softmax(f):
    e = jnp.exp(f - jnp.max(f))
    return e / jnp.sum(e)


def _sigmoid(f):
    return 1.0 / (1.0 + jnp.exp(-f))


def target_probabilities(y, n_classes):
    """A cross-entropy target for one datum as a probability vector."""
    y = jnp.asarray(y)
    if jnp.issubdtype(y.dtype, jnp.integer):
        return jnp.eye(n_classes)[jnp.reshape(y, ())]
    return y


def quartic_loss(f, y):
    """A non-built-in per-datum loss: c = 1/2 sum (f - y)^4."""
    return 0.5 * jnp.sum((f - y) ** 4)


def quartic_grad(f, y):
    """Its gradient in the output, written out: 2 (f - y)^3."""
    return 2.0 * (f - y) ** 3


def output_grad(loss, f, y):
    """g = grad_f c(y, f) for one datum."""
    if loss == "mse":
        return 2.0 * (f - y)
    if loss == "cross_entropy":
        return _softmax(f) - target_probabilities(y, f.shape[0])
    if loss == "binary_cross_entropy":
        return _sigmoid(f) - y
    if loss == "quartic":
        return quartic_grad(f, y)
    raise ValueError(loss)


def output_hessian(loss, f):
    """H = d^2 c / df^2 for one datum (independent of the target)."""
    if loss == "mse":
        return 2.0 * jnp.eye(f.shape[0])
    if loss == "cross_entropy":
        p = _softmax(f)
        return jnp.diag(p) - jnp.outer(p, p)
    if loss == "binary_cross_entropy":
        p = _sigmoid(f)
        return jnp.diag(p * (1.0 - p))
    raise ValueError(loss)


# --------------------------------------------------------------------------
# dense matrices
# --------------------------------------------------------------------------


def jacobian(model_fn, params, x):
    """J = d model_fn(x, params) / d ravel(params), shape (O, P), for one datum."""
    flat_params, unravel = ravel_pytree(params)
    return jax.jacfwd(lambda p: model_fn(x, unravel(p)))(flat_params)


def _jit_when_hashable(reference):
    """jit `reference`, static in model_fn and loss, unless model_fn is unhashable."""
    jitted = jax.jit(reference, static_argnames=("model_fn", "loss"))

    @functools.wraps(reference)
    def wrapped(model_fn, params, data, loss, factor=1.0):
        try:
            hash(model_fn)
        except TypeError:
            return reference(model_fn, params, data, loss, factor)
        return jitted(model_fn, params, data, loss, factor)

    return wrapped


@_jit_when_hashable
def dense_ef(model_fn, params, data, loss, factor=1.0):
    """factor * sum_n J_n^T g_n g_n^T J_n (differentiable in params)."""
    inputs, targets = data
    jacobians = jax.vmap(jacobian, (None, None, 0))(model_fn, params, inputs)
    outputs = jax.vmap(model_fn, (0, None))(inputs, params)
    grads = jax.vmap(functools.partial(output_grad, loss))(outputs, targets)
    jg = jnp.einsum("nop,no->np", jacobians, grads)  # row n: J_n^T g_n
    return factor * jg.T @ jg


@_jit_when_hashable
def dense_ggn(model_fn, params, data, loss, factor=1.0):
    """factor * sum_n J_n^T H_n J_n (differentiable in params)."""
    inputs, _ = data
    jacobians = jax.vmap(jacobian, (None, None, 0))(model_fn, params, inputs)
    outputs = jax.vmap(model_fn, (0, None))(inputs, params)
    hessians = jax.vmap(functools.partial(output_hessian, loss))(outputs)
    return factor * jnp.einsum("nop,nok,nkq->pq", jacobians, hessians, jacobians)


def dense_prior(params, precision):
    """The diagonal matrix of a zero-mean Gaussian prior precision.

    `precision` is a scalar, a pytree of scalars (one per params leaf), or a
    params-shaped pytree of arrays.
    """
    if not isinstance(precision, dict | list | tuple) and jnp.ndim(precision) == 0:
        return float(precision) * np.eye(flat(params).size)
    full = jax.tree.map(
        lambda leaf, prec: jnp.broadcast_to(jnp.asarray(prec, leaf.dtype), leaf.shape),
        params,
        precision,
    )
    return np.diag(flat(full))


def assert_close(actual, expected, rtol=1e-9, atol=1e-10, err_msg=""):
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol, err_msg=err_msg
    )


def assert_like_params(tree, params):
    """`tree` has the pytree structure, leaf shapes and leaf dtypes of `params`."""
    assert jax.tree.structure(tree) == jax.tree.structure(params)
    for leaf, ref in zip(jax.tree.leaves(tree), jax.tree.leaves(params), strict=True):
        assert leaf.shape == ref.shape, (leaf.shape, ref.shape)
        assert leaf.dtype == ref.dtype, (leaf.dtype, ref.dtype)


def check_operator(operator, expected, params, seed=3, *, full=True):
    """Numbers read off `operator` agree with the dense matrix `expected`.

    Always `as_matrix()` and `mv` (whose result must look like `params`); with
    `full` (every curvature operator, chunked or not), also `linearise().mv`,
    `lineax.diagonal` of the operator and of its linearisation, and the square
    root: `A A^T = expected` with `A`'s columns `sqrt_mv(e_i)` over the basis of
    `sqrt_shape()`. (`full=False` is for operators without those methods.)
    """
    expected = np.asarray(expected)
    vector = random_vector(params, seed)
    assert_close(operator.as_matrix(), expected, err_msg="as_matrix")
    product = operator.mv(vector)
    assert_like_params(product, params)
    assert_close(flat(product), expected @ flat(vector), err_msg="mv")
    if not full:
        return
    linearised = operator.linearise()
    assert_close(
        flat(linearised.mv(vector)), expected @ flat(vector), err_msg="linearise().mv"
    )
    assert_close(lx.diagonal(operator), np.diag(expected), err_msg="lineax.diagonal")
    assert_close(
        lx.diagonal(linearised), np.diag(expected), err_msg="linearised diagonal"
    )
    shape = operator.sqrt_shape()
    basis = jnp.eye(shape[0] * shape[1]).reshape(-1, *shape)
    columns = jax.vmap(lambda e: ravel_pytree(operator.sqrt_mv(e))[0])(basis)
    assert_close(columns.T @ columns, expected, err_msg="sqrt_mv")
    assert_close(
        flat(linearised.sqrt_mv(basis.sum(0))),
        columns.sum(0),
        err_msg="linearise().sqrt_mv",
    )


@contextlib.contextmanager
def counted_compilations():
    """The XLA compilations that run inside the block, as a growing list: each
    backend compilation, and each program read from the persistent compilation
    cache (`tests/conftest.py`), which stands for one."""
    events = []

    def on_duration(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    def on_event(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            events.append(0.0)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
        jax.monitoring.unregister_event_listener(on_event)
