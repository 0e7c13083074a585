"""Dense curvature: `as_matrix` (route chosen by cost) against the plain routes.

    python benchmarks/bench_dense.py            # the three problems of issue 14
    python benchmarks/bench_dense.py --quick    # small N, 1 repeat (smoke run)

For each problem, the GGN (cross-entropy) `as_matrix()` of fisherops, with the
route it chooses by cost, is timed against:

- `rows`: `as_matrix(algorithm="rows")`, the per-datum rows `R_n = B_n^T J_n`
  accumulated as `sum_chunks R_c^T R_c`;
- `mv`: `as_matrix(algorithm="mv")`, `P` linearised products;
- `jacrev`: the obvious route written here: `vmap(jacrev)` Jacobians `J (N, C, P)`
  and `sum_n J_n^T H_n J_n` with `H_n = diag(p_n) - p_n p_n^T`.

Every function is compiled before timing (the first call of `as_matrix()`, with
its compilation, is printed too); the table shows the median of `--repeats` calls
(wall seconds; one call where a call takes over 5 s). The problems (float32, 10
classes):

- `cnn-digits`: an equinox CNN on scikit-learn's digits (8x8 images, two
  stride-2 3x3 convolutions with 8 and 16 channels, a dense layer; P = 1,898),
  N = 1,347 training images (random weights: the cost does not depend on them);
- `mlp-512`: an MLP 32-64-64-10 (P = 6,922) on N = 512 random inputs;
- `mlp-64`: the same MLP on N = 64 (N K = 640 < P).
"""

import argparse
import datetime
import functools as ft
import platform
import time

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import numpy as np
from _timing import median_seconds

import fisherops


class DigitsCNN(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    dense: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(1, 8, 3, stride=2, padding=1, key=k1)
        self.conv2 = eqx.nn.Conv2d(8, 16, 3, stride=2, padding=1, key=k2)
        self.dense = eqx.nn.Linear(2 * 2 * 16, 10, key=k3)

    def __call__(self, x):
        """One image `x (8, 8)` to 10 logits."""
        h = jnp.tanh(self.conv1(x[None]))
        h = jnp.tanh(self.conv2(h))
        return self.dense(h.reshape(-1))


def digits(num_data: int | None):
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # the same shapes, random pixels
        rng = np.random.default_rng(0)
        images = rng.uniform(0, 16, (1797, 8, 8))
        labels = rng.integers(0, 10, 1797)
    else:
        images, labels = load_digits(return_X_y=True)
        images = images.reshape(-1, 8, 8)
    num_data = num_data or 1347  # the 75% training split
    return (
        jnp.asarray(images[:num_data] / 16.0, jnp.float32),
        jnp.asarray(labels[:num_data], jnp.int32),
    )


def mlp_problem(num_data: int):
    mlp = eqx.nn.MLP(32, 10, 64, 2, activation=jnp.tanh, key=jax.random.key(0))
    inputs = jax.random.normal(jax.random.key(1), (num_data, 32), jnp.float32)
    targets = jax.random.randint(jax.random.key(2), (num_data,), 0, 10)
    return mlp, inputs, targets


def problems(quick: bool):
    cnn = DigitsCNN(jax.random.key(0))
    yield "cnn-digits", (cnn, *digits(128 if quick else None))
    yield "mlp-512", mlp_problem(64 if quick else 512)
    yield "mlp-64", mlp_problem(16 if quick else 64)


def jacrev_route(model_fn, params, inputs):
    """`sum_n J_n^T H_n J_n` from `vmap(jacrev)` Jacobians, the obvious way."""
    flat, unravel = jfu.ravel_pytree(params)

    def one(x):
        return model_fn(x, unravel(flat))

    jacobians = jax.vmap(lambda x: jax.jacrev(lambda p: model_fn(x, unravel(p)))(flat))(
        inputs
    )  # (N, C, P)
    probs = jax.nn.softmax(jax.vmap(one)(inputs))  # (N, C)
    hj = (
        probs[:, :, None] * jacobians
        - probs[:, :, None] * jnp.einsum("nc,ncp->np", probs, jacobians)[:, None, :]
    )  # H_n J_n without forming H_n
    flat_j = jacobians.reshape(-1, flat.size)
    return flat_j.T @ hj.reshape(-1, flat.size)


def compiled(method, operator, **kwargs):
    """`method(operator, **kwargs)` compiled ahead of time, as a zero-argument call."""
    dynamic, static = eqx.partition(operator, eqx.is_array)
    fn = jax.jit(lambda dynamic: method(eqx.combine(dynamic, static), **kwargs))
    executable = fn.lower(dynamic).compile()
    return lambda: executable(dynamic)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small N, 1 repeat")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)

    print(f"fisherops dense benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{platform.machine()}, {jax.devices()[0].device_kind}; median of "
        f"{repeats} calls after compiling, wall seconds\n"
    )
    rows = []
    for name, (model, inputs, targets) in problems(args.quick):
        model_fn, params = fisherops.from_equinox(model)
        ggn = fisherops.GGNOperator(
            model_fn, params, (inputs, targets), "cross_entropy"
        )
        start = time.perf_counter()
        chosen = jax.block_until_ready(ggn.as_matrix())
        first_call = time.perf_counter() - start
        jacrev = jax.jit(jacrev_route, static_argnums=0)
        reference = jax.block_until_ready(jacrev(model_fn, params, inputs))
        error = float(jnp.abs(chosen - reference).max() / jnp.abs(reference).max())
        functions = {
            "as_matrix": ggn.as_matrix,
            "rows": compiled(type(ggn).as_matrix, ggn, algorithm="rows"),
            "mv": compiled(type(ggn).as_matrix, ggn, algorithm="mv"),
            "jacrev": ft.partial(jacrev, model_fn, params, inputs),
        }
        seconds = {
            label: median_seconds(fn, repeats, warmup=0, cap=5)
            for label, fn in functions.items()
        }
        route = ggn._dense_route(None)
        size, num_data = ggn.in_size(), ggn.num_data
        best = min(seconds["jacrev"], seconds["mv"])
        rows.append((name, size, num_data, route, seconds, seconds["as_matrix"] / best))
        print(
            f"{name}: P={size} N={num_data} route={route} first call "
            f"{first_call:.2f} s, max rel. diff to jacrev {error:.1e}",
            flush=True,
        )

    print()
    print(
        "| problem | P | N | N K | route | as_matrix s | rows s | mv s | jacrev s "
        "| as_matrix / min(jacrev, mv) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, size, num_data, route, seconds, ratio in rows:
        print(
            f"| {name} | {size} | {num_data} | {10 * num_data} | {route} | "
            f"{seconds['as_matrix']:.3f} | {seconds['rows']:.3f} | "
            f"{seconds['mv']:.3f} | {seconds['jacrev']:.3f} | {ratio:.2f} |"
        )


if __name__ == "__main__":
    main()
