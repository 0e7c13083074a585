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
        from flax import errors, nnx

        state = jtu.tree_unflatten(self.params_treedef, jtu.tree_leaves(params))
        try:
            return nnx.merge(self.graphdef, state, self.rest)(x)
        except errors.TraceContextError as error:
            raise ValueError(
                f"the Flax module updates its state when called ({error}); a "
                "curvature needs a deterministic network: call module.eval() before "
                "fisherops.from_flax_nnx(module)."
            ) from error


_TRAINING_FLAGS = ("deterministic", "use_running_average")


def _training_parts(module) -> list[str]:
    """The submodules in training mode (dropout on, batch statistics updated)."""
    from flax import nnx

    modules = nnx.iter_modules(module) if hasattr(nnx, "iter_modules") else None
    if modules is None:
        modules = module.iter_modules()
    return [
        f"{'/'.join(map(str, path)) or 'the module'} ({type(sub).__name__}, "
        f"{flag}=False)"
        for path, sub in modules
        for flag in _TRAINING_FLAGS
        if getattr(sub, flag, None) is False
    ]


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

    Call `module.eval()` first if it has dropout or batch norm: a module in
    training mode (dropout on, batch statistics updated) is refused.

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
    training = _training_parts(module)
    if training:
        raise ValueError(
            "module must be in evaluation mode: the curvature is that of the "
            "deterministic network, and a module in training mode updates its state "
            f"on every call; got {', '.join(training)}. Call module.eval() first."
        )
    graphdef, params_state, rest = nnx.split(module, _is_floating_param, ...)
    params = nnx.to_pure_dict(params_state)
    return (
        _FlaxNNXModel(graphdef, jtu.tree_structure(params_state), rest),
        params,
    )
