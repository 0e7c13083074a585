"""Adapters from model libraries to `model_fn(input, params)`."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
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
