"""Argument checks: one rule per idea, shared by the whole library.

Every message names the argument, what was expected and what was given. Value
checks (finite, in range) run where the values are known, i.e. not under a
trace; shape and type checks run always.
"""

import functools as ft
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jaxtyping import Array, PyTree

from . import _core
from ._likelihoods import (
    AbstractLikelihood,
    as_likelihood,
    closure_converted,
    has_sampler,
    with_traced_closures,
)
from ._sharding import check_chunking

Data = dict[str, Any] | tuple[Any, Any]
ModelFn = Callable[[Any, PyTree], Array]


def _leaf_signature(tree: PyTree) -> list[tuple[tuple[int, ...], np.dtype]]:
    return [(tuple(jnp.shape(x)), jnp.result_type(x)) for x in jtu.tree_leaves(tree)]


def _check_like(name: str, tree: PyTree, structure: PyTree) -> None:
    if jtu.tree_structure(tree) != jtu.tree_structure(structure) or _leaf_signature(
        tree
    ) != [(s.shape, s.dtype) for s in jtu.tree_leaves(structure)]:
        expected = jtu.tree_map(lambda s: f"{s.dtype}{list(s.shape)}", structure)
        got = jtu.tree_map(lambda x: f"{jnp.result_type(x)}{list(jnp.shape(x))}", tree)
        raise ValueError(
            f"{name} must have the curvature's params structure {expected}; got {got}."
        )


def _describe(value) -> str:
    """`value` for a message: its repr, or dtype and shape for an array."""
    if isinstance(value, jax.core.Tracer):
        return f"a traced {jnp.result_type(value)}{list(jnp.shape(value))} array"
    if isinstance(value, np.ndarray | jax.Array) and np.ndim(value):
        return f"a {value.dtype}{list(value.shape)} array"
    return repr(value)


def _check_positive_int(name: str, value) -> int:
    """An int >= 1: a Python or numpy int or a 0-d integer array; never a bool."""
    dtype = jnp.result_type(value) if eqx.is_array_like(value) else None
    integer = (
        dtype is not None
        and np.ndim(value) == 0
        and jnp.issubdtype(dtype, jnp.integer)
        and not isinstance(value, bool | jax.core.Tracer)
    )
    if not integer or int(value) < 1:
        raise ValueError(f"{name} must be an int >= 1; got {_describe(value)}.")
    return int(value)


def _check_key(key) -> None:
    if key is None:
        raise ValueError(
            "key must be a jax.random.key (or PRNGKey) to draw samples with; got None."
        )
    dtype, shape = jnp.result_type(key), jnp.shape(key)
    typed = jnp.issubdtype(dtype, jax.dtypes.prng_key) and shape == ()
    raw = dtype == jnp.uint32 and shape == (2,)
    if not (typed or raw):
        raise ValueError(
            f"key must be one jax.random.key (or PRNGKey); got {dtype}{list(shape)}."
        )


def _check_method(name: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}.")
    return value


def _check_scalar(name: str, value) -> Array:
    if not (eqx.is_array_like(value) and jnp.ndim(value) == 0):
        shape = f" of shape {jnp.shape(value)}" if eqx.is_array_like(value) else ""
        raise ValueError(
            f"{name} must be a scalar (a float or a 0-d array); got "
            f"{type(value).__name__}{shape}."
        )
    return jnp.asarray(value)


def _check_count(name: str, value) -> None:
    """A positive, finite number of data points (a scale's numerator or denominator)."""
    if value is None:
        return
    if isinstance(value, bool) or not (
        eqx.is_array_like(value) and jnp.ndim(value) == 0
    ):
        raise ValueError(
            f"{name} must be a positive finite number (a scalar); got "
            f"{_describe(value)}."
        )
    if isinstance(value, jax.core.Tracer):
        return
    number = float(value)
    if not (np.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a positive finite number; got {value!r}.")


@jax.jit
def _non_finite_counts(leaves: list[Array]) -> list[Array]:
    return [jnp.sum(~jnp.isfinite(leaf)) for leaf in leaves]


def _check_finite(name: str, tree: PyTree) -> None:
    """Floating leaves of `tree` hold no NaN or inf (checked where concrete), in
    one compiled call for all of them."""
    checked = [
        (path, leaf)
        for path, leaf in jtu.tree_leaves_with_path(tree)
        if not isinstance(leaf, jax.core.Tracer)
        and jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
        and not (isinstance(leaf, jax.Array) and not leaf.is_fully_addressable)
    ]
    if not checked:
        return
    with jax.ensure_compile_time_eval():  # on the device, even inside a trace
        counts = _non_finite_counts([jnp.asarray(leaf) for _, leaf in checked])
    for (path, _), count in zip(checked, jax.device_get(counts), strict=True):
        if count:
            raise ValueError(
                f"{name}{jtu.keystr(path)} must be finite; got {count} NaN or inf "
                f"value{'s' if count > 1 else ''}."
            )


def _owned(tree: PyTree) -> PyTree:
    """`tree` with numpy arrays copied into JAX arrays (on CPU, JAX may share a
    numpy array's memory, and the user may edit it in place afterwards)."""
    return jtu.tree_map(
        lambda leaf: (
            jnp.asarray(np.array(leaf)) if isinstance(leaf, np.ndarray) else leaf
        ),
        tree,
    )


def _check_params(params: PyTree) -> PyTree:
    """Params as a pytree of finite floating JAX arrays."""

    def check(path, leaf):
        if not (
            eqx.is_array_like(leaf)
            and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
        ):
            kind = getattr(leaf, "dtype", type(leaf).__name__)
            raise TypeError(
                "params must be a pytree of floating arrays; got "
                f"{kind} at params{jtu.keystr(path)}."
            )
        return jnp.asarray(leaf)

    params = jtu.tree_map_with_path(check, _owned(params))
    if not jtu.tree_leaves(params):
        raise ValueError("params must hold at least one floating array; got none.")
    _check_finite("params", params)
    return params


def _is_number_list(tree) -> bool:
    """A (nested) list or tuple of numbers, e.g. `[[0.1, 2], [3, 4]]`."""
    if isinstance(tree, list | tuple):
        return len(tree) > 0 and all(_is_number_list(item) for item in tree)
    return isinstance(tree, int | float | np.number) and not isinstance(tree, bool)


def _data_arrays(name: str, tree: PyTree) -> PyTree:
    """Data as a pytree of arrays: a (nested) list of numbers is one array, and an
    object that only defines `__array__` becomes that array."""
    if _is_number_list(tree):
        return np.asarray(tree)

    def one(path, leaf):
        if eqx.is_array_like(leaf):
            return leaf
        if hasattr(leaf, "__array__"):
            return np.asarray(leaf)
        raise TypeError(
            f"{name}{jtu.keystr(path)} must be an array (or something np.asarray "
            f"accepts: a nested list of numbers, an object with __array__); got "
            f"{type(leaf).__name__}."
        )

    return jtu.tree_map_with_path(one, tree)


def _check_output(outputs: PyTree, vmap_over_data: bool) -> None:
    """`model_fn` returns one array (per datum, or per batch), not a pytree."""
    if isinstance(outputs, jax.ShapeDtypeStruct):
        return
    what = "per datum" if vmap_over_data else "for the batch (axis 0: data points)"
    raise TypeError(
        f"model_fn must return one array {what}: the network's output that the "
        f"loss reads; got a {type(outputs).__name__} "
        f"{jtu.tree_map(lambda s: s.shape, outputs)}. Return the one output, e.g. "
        "lambda x, p: model_fn(x, p)[0] for a model returning (logits, extras)."
    )


def _split_data(data: Data, name: str = "data") -> tuple[PyTree, PyTree]:
    """`(inputs, targets)` from `{"input": X, "target": Y}` or `(X, Y)`."""
    if isinstance(data, dict) and set(data) >= {"input", "target"}:
        return data["input"], data["target"]
    if isinstance(data, tuple | list) and len(data) == 2:
        return tuple(data)
    raise TypeError(
        f"{name} must be {{'input': X, 'target': Y}} or a tuple (X, Y); got "
        f"{type(data).__name__}"
        + (f" with keys {sorted(data)}" if isinstance(data, dict) else "")
        + "."
    )


def _leading(tree: PyTree, what: str) -> int:
    """The common length of axis 0 (the data axis) of every array in `tree`."""
    sizes = {
        jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jtu.tree_leaves(tree)
    }
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"data {what} must be arrays with one leading data axis of the same "
            f"length; got leading sizes {sorted(map(str, sizes))}."
        )
    return sizes.pop()


def _check_chunk_size(chunk_size) -> int | None:
    return None if chunk_size is None else _check_positive_int("chunk_size", chunk_size)


class _UnbatchedModel(eqx.Module):
    model_fn: ModelFn

    def __call__(self, inputs, params):
        one = jtu.tree_map(lambda leaf: leaf[0], inputs)
        return self.model_fn(one, params)[None]


class _UnbatchedGrad(eqx.Module):
    loss_grad_fn: Callable

    def __call__(self, outputs, targets):
        one = jtu.tree_map(lambda leaf: leaf[0], targets)
        return self.loss_grad_fn(outputs[0], one)[None]


def _datum(tree: PyTree) -> PyTree[jax.ShapeDtypeStruct]:
    """The shapes and dtypes of one datum of a batch."""
    return jtu.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(jnp.shape(leaf)[1:], jnp.result_type(leaf)),
        tree,
    )


def _converted(name: str, fn: Callable, vmap_over_data: bool, *examples) -> Callable:
    """`fn`, closure-converted if it closes over traced arrays (see
    `_likelihoods.closure_converted`). Only a per-datum function can be: a
    batched one is called on chunks of other sizes."""
    converted = closure_converted(fn, *examples)
    if converted is not fn and not vmap_over_data:
        raise ValueError(
            f"{name} closes over traced arrays, which would get no gradient (and "
            "break lineax's solvers). With vmap_over_data=False it cannot be "
            "converted: pass the arrays in params, hold them as fields of an "
            f"equinox Module {name}, or use vmap_over_data=True."
        )
    return converted


class _Setup(eqx.Module):
    model_fn: ModelFn
    params: PyTree
    data: tuple[PyTree, PyTree]
    scale: Array
    num_data: int
    likelihood: AbstractLikelihood | None
    loss_grad_fn: Callable | None
    vmap_over_data: bool
    chunk_size: int | None

    def fill(self, operator) -> None:
        """Set the fields every curvature operator has (called in its `__init__`)."""
        for name in _SHARED_FIELDS:
            setattr(operator, name, getattr(self, name))


_SHARED_FIELDS = (
    "model_fn",
    "params",
    "data",
    "scale",
    "num_data",
    "likelihood",
    "vmap_over_data",
    "chunk_size",
)


def _setup(
    model_fn,
    params,
    data,
    likelihood: AbstractLikelihood | None,
    num_curv_samples,
    num_total_samples,
    vmap_over_data: bool,
    chunk_size,
    loss_grad_fn=None,
    key=None,
) -> _Setup:
    """Check the arguments every curvature operator shares and put them in form.

    Params and data become JAX arrays (numpy arrays are copied); a single
    unbatched datum (`vmap_over_data=False`) becomes a batch of one; callables
    that close over traced arrays are closure-converted; the targets are checked
    by the likelihood (values too, where concrete). `num_curv_samples` and
    `num_total_samples` only set `scale = num_total_samples / num_curv_samples`
    (as in laplax): neither is compared with the number of data points given.
    """
    if not callable(model_fn):
        raise TypeError(
            "model_fn must be a callable model_fn(input, params); got "
            f"{type(model_fn).__name__}."
        )
    if not isinstance(vmap_over_data, bool):
        raise TypeError(f"vmap_over_data must be a bool; got {vmap_over_data!r}.")
    params = _check_params(params)
    inputs, targets = _split_data(data)
    inputs = _owned(_data_arrays("data input", inputs))
    targets = _owned(_data_arrays("data target", targets))
    if not vmap_over_data:
        outputs = jax.eval_shape(model_fn, inputs, params)
        _check_output(outputs, False)
        if not _core.is_batch(inputs, targets, outputs):  # one unbatched datum
            add_axis = ft.partial(jtu.tree_map, lambda leaf: jnp.asarray(leaf)[None])
            inputs, targets = add_axis(inputs), add_axis(targets)
            model_fn = _UnbatchedModel(model_fn)
            if loss_grad_fn is not None:
                loss_grad_fn = _UnbatchedGrad(loss_grad_fn)
    num_data = _leading(inputs, "input")
    num_targets = _leading(targets, "target")
    if num_targets != num_data:
        raise ValueError(
            f"data input has {num_data} data points but data target has "
            f"{num_targets}; axis 0 must index the same data points."
        )
    if num_data == 0:
        raise ValueError("data must hold at least one data point; got 0.")
    _check_finite("data input", inputs)
    _check_finite("data target", targets)
    chunk_size = _check_chunk_size(chunk_size)
    check_chunking((inputs, targets), num_data, chunk_size)
    if vmap_over_data:
        model_fn = _converted("model_fn", model_fn, True, _datum(inputs), params)
    else:
        model_fn = _converted("model_fn", model_fn, False, inputs, params)
    if vmap_over_data:
        _check_output(jax.eval_shape(model_fn, _datum(inputs), params), True)
    outputs = jax.eval_shape(
        _core.batched_model(model_fn, vmap_over_data), inputs, params
    )
    if loss_grad_fn is not None:
        examples = (
            (_datum(outputs), _datum(targets))
            if vmap_over_data
            else (
                outputs,
                targets,
            )
        )
        loss_grad_fn = _converted(
            "loss_grad_fn", loss_grad_fn, vmap_over_data, *examples
        )
    if likelihood is not None:
        prepared = likelihood.prepare_targets(targets, outputs)
        likelihood = with_traced_closures(
            likelihood, _datum(outputs), _datum(prepared), key
        )
    _check_count("num_curv_samples", num_curv_samples)
    _check_count("num_total_samples", num_total_samples)
    num_curv = num_data if num_curv_samples is None else num_curv_samples
    num_total = num_curv if num_total_samples is None else num_total_samples
    dtype = _core.scale_dtype(params)
    if isinstance(num_total, jax.core.Tracer) or isinstance(num_curv, jax.core.Tracer):
        scale = jnp.asarray(num_total, dtype) / jnp.asarray(num_curv, dtype)
    else:
        with np.errstate(over="ignore", under="ignore"):
            ratio = np.asarray(float(num_total) / float(num_curv), dtype)
        scale = jnp.asarray(ratio)
        if not (np.isfinite(ratio) and ratio > 0):
            raise ValueError(
                f"num_total_samples / num_curv_samples = {num_total!r} / "
                f"{num_curv!r} is {float(ratio)!r} in {jnp.dtype(dtype).name} (the "
                "params' dtype, at least float32): the scale of the curvature must "
                "be positive and finite in that dtype. Use counts whose ratio it "
                "can represent (or float64 params)."
            )
    return _Setup(
        model_fn,
        params,
        (inputs, targets),
        scale,
        num_data,
        likelihood,
        loss_grad_fn,
        vmap_over_data,
        chunk_size,
    )


def empirical_likelihood(loss_fn, loss_grad_fn) -> AbstractLikelihood | None:
    """Check the empirical Fisher's loss arguments; the likelihood of `loss_fn`."""
    if (loss_fn is None) == (loss_grad_fn is None):
        raise ValueError(
            "the empirical Fisher needs exactly one of loss_fn and loss_grad_fn; "
            f"got {'both' if loss_fn is not None else 'neither'}."
        )
    if loss_grad_fn is not None and not callable(loss_grad_fn):
        raise TypeError(
            f"loss_grad_fn must be callable; got {type(loss_grad_fn).__name__}."
        )
    return as_likelihood(loss_fn)


def mc_arguments(loss_fn, key, mc_samples) -> tuple[AbstractLikelihood, int]:
    """Check the Monte-Carlo Fisher's arguments; its likelihood and `mc_samples`.

    `mc_samples=None` means 1 (as in laplax).
    """
    if loss_fn is None:
        raise ValueError("the Monte-Carlo Fisher needs loss_fn; got None.")
    likelihood = as_likelihood(loss_fn)
    if not has_sampler(likelihood):
        raise ValueError(
            "the Monte-Carlo Fisher needs a loss_fn it can sample targets from: a "
            "built-in loss name, a fisherops.Likelihood(loss, sample=...) or an "
            "AbstractLikelihood with a `sample` method; got "
            f"{type(likelihood).__name__} without a sampler."
        )
    _check_key(key)
    mc_samples = 1 if mc_samples is None else mc_samples
    return likelihood, _check_positive_int("mc_samples", mc_samples)


def _check_vector(operator: lx.AbstractLinearOperator, vector: PyTree) -> PyTree:
    """`vector` in the operator's dtypes; its structure and shapes must match.

    A leaf may come in a wider floating dtype that the params also use (lineax's
    CG promotes mixed-dtype params, bf16 + f32 say, to one dtype): it is cast
    back. Any other dtype, shape or structure is an error.
    """
    expected = operator.in_structure()
    if jtu.tree_structure(vector) != jtu.tree_structure(expected):
        raise ValueError(
            "vector must have the structure of params "
            f"{jtu.tree_structure(expected)}; got {jtu.tree_structure(vector)}."
        )
    wanted = jtu.tree_leaves(expected)
    dtypes = {want.dtype for want in wanted}
    leaves = []
    for path, leaf, want in zip(
        (p for p, _ in jtu.tree_leaves_with_path(expected)),
        jtu.tree_leaves(vector),
        wanted,
        strict=True,
    ):
        shape, dtype = jnp.shape(leaf), jnp.result_type(leaf)
        widened = dtype in dtypes and jnp.promote_types(want.dtype, dtype) == dtype
        if shape != want.shape or not (dtype == want.dtype or widened):
            raise ValueError(
                f"vector{jtu.keystr(path)} must be {want.dtype}{list(want.shape)} "
                f"like params; got {dtype}{list(shape)}."
            )
        leaves.append(jnp.asarray(leaf, want.dtype))
    return jtu.tree_unflatten(jtu.tree_structure(expected), leaves)
