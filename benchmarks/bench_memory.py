"""Peak temporary memory of fisherops' products, from XLA's compiled statistics.

    python benchmarks/bench_memory.py

Nothing is run: each function is lowered and compiled for abstract inputs, and
`compiled.memory_analysis()` reports the buffers XLA plans for it. `temp` is the
scratch memory of one call (the number chunking bounds); `args` and `out` are its
inputs and outputs. The MLP 32-256-256-10 with cross-entropy, N = 512 unchunked
against N = 65536 with `chunk_size=512` (target: temp within 2x).
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from _problems import make_problem

import fisherops

MiB = 2**20


def abstract(tree):
    return jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), tree
    )


def memory(fn, *args):
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    return (
        stats.temp_size_in_bytes,
        stats.argument_size_in_bytes,
        stats.output_size_in_bytes,
    )


def operators(problem, chunk_size):
    def ef(params, inputs, targets):
        return fisherops.EmpiricalFisherOperator(
            problem.model_fn,
            params,
            (inputs, targets),
            problem.loss,
            chunk_size=chunk_size,
        )

    def mc(params, inputs, targets):
        return fisherops.MCFisherOperator(
            problem.model_fn,
            params,
            (inputs, targets),
            problem.loss,
            jax.random.key(0),
            mc_samples=16,
            chunk_size=chunk_size,
        )

    return {"EF": ef, "MC16": mc}


def linearised_mv_memory(make, params, inputs, targets, vector):
    """Memory of `mv` of an already linearised operator (its args: the factors)."""
    linearised = eqx.filter_eval_shape(
        lambda p, x, y: make(p, x, y).linearise(), params, inputs, targets
    )
    arrays, static = eqx.partition(
        linearised, lambda leaf: isinstance(leaf, jax.ShapeDtypeStruct)
    )
    return memory(lambda a, v: eqx.combine(a, static).mv(v), arrays, vector)


def measure(num_data: int, chunk_size: int | None, with_diagonal: bool):
    problem = make_problem("mlp-ce", 1)
    params = abstract(problem.params)
    inputs = jax.ShapeDtypeStruct((num_data, 32), jnp.float32)
    targets = jax.ShapeDtypeStruct((num_data,), jnp.int32)
    vector = params
    rows = {}
    grad_fn = _sum_loss_grad(problem)
    rows["grad (never chunked)"] = memory(grad_fn, params, inputs, targets)
    for name, make in operators(problem, chunk_size).items():
        rows[f"{name} mv"] = memory(
            lambda p, x, y, v, make=make: make(p, x, y).mv(v),
            params,
            inputs,
            targets,
            vector,
        )
        rows[f"{name} linearise()"] = memory(
            lambda p, x, y, make=make: eqx.filter(
                make(p, x, y).linearise(), eqx.is_array
            ),
            params,
            inputs,
            targets,
        )
        rows[f"{name} linearised mv"] = linearised_mv_memory(
            make, params, inputs, targets, vector
        )
        if with_diagonal:
            rows[f"{name} diagonal"] = memory(
                lambda p, x, y, make=make: lx.diagonal(make(p, x, y)),
                params,
                inputs,
                targets,
            )
    return rows


def _sum_loss_grad(problem):
    model = jax.vmap(problem.model_fn, in_axes=(0, None))

    def grad(params, inputs, targets):
        def total(p):
            logp = jax.nn.log_softmax(model(inputs, p))
            return -jnp.sum(jnp.take_along_axis(logp, targets[:, None], axis=1))

        return jax.grad(total)(params)

    return grad


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-data", type=int, default=65536)
    parser.add_argument("--chunk-size", type=int, default=512)
    args = parser.parse_args()
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}; MLP 32-256-256-10 "
        "cross-entropy (P=76810), float32; MiB from compiled.memory_analysis()\n"
    )
    settings = [
        (512, None, "N=512, unchunked"),
        (args.num_data, args.chunk_size, f"N={args.num_data}, chunk={args.chunk_size}"),
        (args.num_data, None, f"N={args.num_data}, unchunked"),
    ]
    results = {
        label: measure(n, chunk, with_diagonal=chunk is not None or n == 512)
        for n, chunk, label in settings
    }
    base_label, chunked_label, _ = (label for _, _, label in settings)
    print(
        f"| {'product':<20} | "
        + " | ".join(f"{label:>24}" for label in results)
        + f" | {'chunked / N=512':>15} |"
    )
    print("|" + "---|" * (len(results) + 2))
    for product in results[base_label]:
        cells = []
        for rows in results.values():
            if product in rows:
                temp, arg, out = rows[product]
                cells.append(f"{temp / MiB:8.2f} (args {arg / MiB:6.1f})".rjust(24))
            else:
                cells.append(f"{'-':>24}")
        ratio = results[chunked_label][product][0] / max(
            results[base_label][product][0], 1
        )
        ratio = "-" if product.startswith("grad") else f"{ratio:.2f}"
        print(f"| {product:<20} | " + " | ".join(cells) + f" | {ratio:>15} |")
    print("\ncells: temp MiB (args MiB); the ratio compares temp.")


if __name__ == "__main__":
    main()
