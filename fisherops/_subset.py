"""Subset-of-weights Laplace: a curvature and a posterior on some of the params.

`subset(model_fn, params, filter_spec)` splits the params in two with
`equinox.partition`: the selected ones stay free, the others are held fixed (at
the MAP) inside a new `model_fn`. Every operator, the Laplace posterior and its
predictive then work on the selected params only, since to them the new
`model_fn` is just another network.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.tree_util as jtu
from jaxtyping import Array, PyTree


class _SubsetModel(eqx.Module):
    """`model_fn(x, params_sub)`: the full network with the other params fixed."""

    model_fn: Callable
    rest: PyTree

    def __call__(self, x: Any, params_sub: PyTree) -> Array:
        return self.model_fn(x, eqx.combine(params_sub, self.rest))


class _Combine(eqx.Module):
    """`combine(params_sub)`: the full params, the fixed ones filled back in."""

    rest: PyTree

    def __call__(self, params_sub: PyTree) -> PyTree:
        return eqx.combine(params_sub, self.rest)


def subset(
    model_fn: Callable,
    params: PyTree,
    filter_spec: PyTree[bool | Callable[[Any], bool]] | Callable[[Any], bool],
) -> tuple[Callable[[Any, PyTree], Array], PyTree, Callable[[PyTree], PyTree]]:
    """Put the curvature and the posterior on a subset of the params.

    `params` is split by `eqx.partition(params, filter_spec)` into the selected
    params `params_sub` and the rest, which `model_fn_sub` holds fixed:
    `model_fn_sub(x, params_sub) == model_fn(x, combine(params_sub))`. The
    curvature of `model_fn_sub` at `params_sub` is the full network's curvature
    restricted to the selected rows and columns, and a Laplace posterior built on
    it is the subset-of-weights (e.g. last-layer) Laplace approximation, with the
    rest at the MAP.

    ```python
    model_fn_sub, params_sub, combine = fisherops.subset(
        model_fn, params, fisherops.last_layer(params)
    )
    ggn = fisherops.GGNOperator(model_fn_sub, params_sub, data, "cross_entropy")
    posterior = fisherops.LaplacePosterior(ggn, 1.0)
    mean, variance = posterior.predictive(x_test)
    full_samples = jax.vmap(combine)(posterior.sample(key, 10))
    ```

    Works for plain pytrees of params and for the `(model_fn, params)` pairs of
    [`fisherops.from_equinox`][] and [`fisherops.from_flax_nnx`][].

    **Arguments:**

    - `model_fn`: `model_fn(input, params) -> output`.
    - `params`: the full params (at the MAP).
    - `filter_spec`: as in `equinox.partition`: a pytree of bools (or of callables
      `leaf -> bool`) with the structure of `params` or a prefix of it, or one
      callable applied to every leaf; `True` selects. See
      [`fisherops.last_layer`][].

    **Returns:** `(model_fn_sub, params_sub, combine)`: the model as a function of
    the selected params, the selected params (`None` in place of the others), and
    `combine(params_sub) -> params` (for one set of params; `jax.vmap` it over
    samples).
    """
    if not callable(model_fn):
        raise TypeError(
            "model_fn must be a callable model_fn(input, params); got "
            f"{type(model_fn).__name__}."
        )
    params_sub, rest = eqx.partition(params, filter_spec)
    if not jtu.tree_leaves(params_sub):
        raise ValueError(
            "filter_spec selects no params: it must mark at least one leaf of "
            "params True."
        )
    return _SubsetModel(model_fn, rest), params_sub, _Combine(rest)


def last_layer(params: PyTree) -> PyTree[bool]:
    """A `filter_spec` for [`fisherops.subset`][] selecting the last layer.

    The last layer is the innermost sub-pytree that holds the last leaf of
    `params` (in `jax.tree_util` order) with its siblings: `(w, b)` in a list of
    layers `[(w1, b1), (w2, b2)]`, `mlp.layers[-1]` of an `eqx.nn.MLP` (through
    [`fisherops.from_equinox`][]), the last `nnx.Linear` of an `nnx.Sequential`
    (through [`fisherops.from_flax_nnx`][]). Dicts flatten in sorted key order,
    so name layers so that the output layer sorts last.

    **Arguments:**

    - `params`: the full params.

    **Returns:** a pytree of bools with the structure of `params`.

    Raises `ValueError` when the last leaf sits at the top level of `params` (a
    flat dict such as `{"w1", "b1", "w2", "b2"}`), where no layer can be told
    apart: pass a `filter_spec` to `subset` instead.
    """
    paths = [path for path, _ in jtu.tree_flatten_with_path(params)[0]]
    if not paths:
        raise ValueError("params has no leaves.")
    layer = paths[-1][:-1]
    if not layer:
        raise ValueError(
            "last_layer cannot tell the last layer of params whose last leaf "
            f"{jtu.keystr(paths[-1])} is at the top level (e.g. a flat dict of "
            "weights); pass subset a filter_spec, e.g. a pytree of bools."
        )
    return jtu.tree_map_with_path(lambda path, _: path[: len(layer)] == layer, params)
