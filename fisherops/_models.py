"""Adapters from model libraries to `model_fn(input, params)`."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree


class _EquinoxModel(eqx.Module):
    static: Any

    def __call__(self, x, params):
        return eqx.combine(params, self.static)(x)


def from_equinox(module: Callable) -> tuple[Callable[[Any, PyTree], Array], PyTree]:
    """Split an equinox model into `(model_fn, params)`.

    `params` are the model's inexact-array leaves (the same pytree as the model,
    with `None` elsewhere); `model_fn(x, params)` calls the model rebuilt from them
    on one input `x` (or a batch, if the model takes batches).

    ```python
    mlp = eqx.nn.MLP(4, 3, 16, 2, key=jax.random.key(0))
    model_fn, params = fisherops.from_equinox(mlp)
    fisher = fisherops.EmpiricalFisherOperator(model_fn, params, data, "cross_entropy")
    ```
    """
    params, static = eqx.partition(module, eqx.is_inexact_array)
    return _EquinoxModel(static), params


class _FlaxNNXModel(eqx.Module):
    graphdef: Any = eqx.field(static=True)
    params_treedef: Any = eqx.field(static=True)
    rest: Any

    def __call__(self, x, params):
        from flax import nnx

        state = jtu.tree_unflatten(self.params_treedef, jtu.tree_leaves(params))
        return nnx.merge(self.graphdef, state, self.rest)(x)


def _is_floating_param(path, variable) -> bool:
    from flax import nnx

    del path
    return isinstance(variable, nnx.Param) and jnp.issubdtype(
        jnp.result_type(variable.get_value()), jnp.floating
    )


def from_flax_nnx(module) -> tuple[Callable[[Any, PyTree], Array], PyTree]:
    """Split a Flax NNX model into `(model_fn, params)`.

    `params` are the module's floating `nnx.Param` variables as a plain nested
    dict of arrays (the `nnx.to_pure_dict` layout, e.g.
    `params["layers"][0]["kernel"]`). Everything else (integer params, batch
    statistics, RNG state, ...) is kept fixed inside `model_fn`, which merges the
    graph definition with `params` and calls the module on one input `x` (or a
    batch, if the module takes batches). `model_fn` holds no traced arrays, so it
    is safe inside `jit`, `lineax.CG` and `lineax.Cholesky`.

    Call `module.eval()` first if it has dropout or batch norm: `model_fn` runs
    the module in the mode it is in.

    ```python
    from flax import nnx

    rngs = nnx.Rngs(0)
    mlp = nnx.Sequential(
        nnx.Linear(4, 16, rngs=rngs), nnx.tanh, nnx.Linear(16, 3, rngs=rngs)
    )
    model_fn, params = fisherops.from_flax_nnx(mlp)
    fisher = fisherops.GGNOperator(model_fn, params, data, "cross_entropy")
    ```

    Needs `flax` (`pip install "fisherops[flax]"`).
    """
    try:
        from flax import nnx
    except ImportError as error:
        raise ImportError(
            "from_flax_nnx needs flax: pip install 'fisherops[flax]'."
        ) from error
    if not isinstance(module, nnx.Module):
        raise TypeError(
            f"from_flax_nnx needs a flax.nnx.Module; got {type(module).__name__}."
        )
    graphdef, params_state, rest = nnx.split(module, _is_floating_param, ...)
    params = nnx.to_pure_dict(params_state)
    return (
        _FlaxNNXModel(graphdef, jtu.tree_structure(params_state), rest),
        params,
    )
