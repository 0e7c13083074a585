"""The benchmark problems: models, data and losses shared by the benchmark scripts.

Every model is a plain `model_fn(input, params)` on ONE datum with a params dict,
as a fisherops user would write it.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class Problem:
    name: str
    model_fn: Callable
    params: dict
    inputs: jax.Array
    targets: jax.Array
    loss: str

    @property
    def num_params(self) -> int:
        return sum(leaf.size for leaf in jax.tree_util.tree_leaves(self.params))

    @property
    def num_data(self) -> int:
        return self.inputs.shape[0]


def _dense(key, fan_in, fan_out, dtype):
    weight = jax.random.normal(key, (fan_in, fan_out), dtype) / jnp.sqrt(fan_in)
    return weight.astype(dtype), jnp.zeros(fan_out, dtype)


def mlp_params(key, sizes, dtype=jnp.float32) -> dict:
    keys = jax.random.split(key, len(sizes) - 1)
    params = {}
    for i, (k, fan_in, fan_out) in enumerate(
        zip(keys, sizes[:-1], sizes[1:], strict=True)
    ):
        params[f"w{i}"], params[f"b{i}"] = _dense(k, fan_in, fan_out, dtype)
    return params


def mlp_fn(x, params):
    """`tanh` MLP on one datum `x (D,)`; the layer count comes from `params`."""
    layers = len(params) // 2
    for i in range(layers):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        if i < layers - 1:
            x = jnp.tanh(x)
    return x


def cnn_params(key, dtype=jnp.float32) -> dict:
    k1, k2, k3 = jax.random.split(key, 3)
    w3, b3 = _dense(k3, 7 * 7 * 16, 10, dtype)
    return {
        "c1": (jax.random.normal(k1, (3, 3, 1, 8), dtype) / 3.0).astype(dtype),
        "cb1": jnp.zeros(8, dtype),
        "c2": (jax.random.normal(k2, (3, 3, 8, 16), dtype) / jnp.sqrt(72.0)).astype(
            dtype
        ),
        "cb2": jnp.zeros(16, dtype),
        "w3": w3,
        "b3": b3,
    }


def _conv(x, kernel, bias):
    out = lax.conv_general_dilated(
        x, kernel, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.tanh(out + bias)


def cnn_fn(x, params):
    """Two stride-2 3x3 convolutions and a dense layer on one image `x (28, 28, 1)`."""
    h = _conv(x[None], params["c1"], params["cb1"])
    h = _conv(h, params["c2"], params["cb2"])
    return h.reshape(-1) @ params["w3"] + params["b3"]


def make_problem(name: str, num_data: int, dtype=jnp.float32) -> Problem:
    key_params, key_x, key_y = jax.random.split(jax.random.key(0), 3)
    if name.startswith("mlp"):
        sizes = (32, 64, 64, 10) if name.startswith("mlp-small") else (32, 256, 256, 10)
        params = mlp_params(key_params, sizes, dtype)
        inputs = jax.random.normal(key_x, (num_data, sizes[0]), dtype)
        model_fn = mlp_fn
    elif name.startswith("cnn"):
        params = cnn_params(key_params, dtype)
        inputs = jax.random.normal(key_x, (num_data, 28, 28, 1), dtype)
        model_fn = cnn_fn
    else:
        raise ValueError(f"unknown problem {name!r}")
    if name.endswith("mse"):
        targets = jax.random.normal(key_y, (num_data, 10), dtype)
        loss = "mse"
    else:
        targets = jax.random.randint(key_y, (num_data,), 0, 10)
        loss = "cross_entropy"
    return Problem(f"{name} N={num_data}", model_fn, params, inputs, targets, loss)


def loss_per_datum(loss: str) -> Callable:
    """`c(output, target)` of one datum, as the unit gradient uses it."""
    if loss == "mse":
        return lambda f, y: jnp.sum((f - y) ** 2)
    return lambda f, y: -jax.nn.log_softmax(f)[y]


def loss_grad_per_datum(loss: str) -> Callable:
    """`∇_f c(output, target)` of one datum, for the per-datum reference."""
    return jax.grad(loss_per_datum(loss))
