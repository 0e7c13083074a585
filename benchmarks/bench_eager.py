"""Public calls made eagerly, as in a notebook, against the same call compiled.

    python benchmarks/bench_eager.py               # 20 repeats
    python benchmarks/bench_eager.py --repeats 5

Issue 9's first target: a repeated eager call of any public method (new arrays
of the same shapes, after its first call) costs at most 2x the same call under
`eqx.filter_jit`. Each row times one call both ways on the same inputs, after
one untimed call of each (compilation), and prints the median wall times, their
ratio (eager / jitted) and the compilations a further eager call causes (0 is
the contract). Building an operator is a row of its own: it checks its
arguments on the host (shapes by tracing the model, finite values, label
ranges), a fixed cost of a few milliseconds that a compiled call does not pay.
`StreamedOperator` reads its batches on the host and cannot be
built under `jit`; its per-batch work is compiled once (`tests/test_streaming.py`
counts it).

The problem: a tanh MLP 32-32-10 (P = 1,386), N = 512 random inputs with
random labels, cross-entropy, float32; the GGN, unchunked and in chunks of 128;
the Laplace posterior at `λ = 1` from the materialised GGN (`factorise()`d).
"""

import argparse
import datetime
import functools as ft
import os
import platform

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from _problems import mlp_fn, mlp_params
from _timing import median_seconds

import fisherops

NUM_DATA, CHUNK, NUM_TEST = 512, 128, 100


def problem():
    keys = jax.random.split(jax.random.key(0), 4)
    params = mlp_params(keys[0], (32, 32, 10))
    inputs = jax.random.normal(keys[1], (NUM_DATA, 32))
    targets = jax.random.randint(keys[2], (NUM_DATA,), 0, 10)
    test = jax.random.normal(keys[3], (NUM_TEST, 32))
    return params, (inputs, targets), test


def calls(params, data, test):
    """`name -> (function, arguments)`: each public call as a function of arrays,
    so that the same function can be called eagerly and under `filter_jit`."""
    vector = jax.tree.map(jnp.ones_like, params)
    key = jax.random.key(1)

    def ggn(params, data, chunk_size=None):
        return fisherops.GGNOperator(
            mlp_fn, params, data, "cross_entropy", chunk_size=chunk_size
        )

    def posterior(params, data):
        dense = lx.materialise(ggn(params, data))
        return fisherops.LaplacePosterior(dense, 1.0).factorise()

    laplace = posterior(params, data)
    functional = fisherops.create_empirical_fisher_mv(
        mlp_fn, params, data, "cross_entropy"
    )
    dense = laplace.curvature
    mean, variance = laplace.predictive(test, approximation="none")
    return {
        "GGNOperator(...) (construction and checks)": (
            lambda p, d: ggn(p, d),
            (params, data),
        ),
        "mv": (lambda op, v: op.mv(v), (ggn(params, data), vector)),
        "mv, chunk_size=128": (
            lambda op, v: op.mv(v),
            (ggn(params, data, CHUNK), vector),
        ),
        "linearise().mv": (
            lambda op, v: op.mv(v),
            (ggn(params, data).linearise(), vector),
        ),
        "lineax.diagonal": (lambda op: lx.diagonal(op), (ggn(params, data, CHUNK),)),
        "as_matrix": (lambda op: op.as_matrix(), (ggn(params, data),)),
        "lineax.materialise": (lambda op: lx.materialise(op), (ggn(params, data),)),
        "LaplacePosterior.factorise": (
            lambda op: fisherops.LaplacePosterior(op, 1.0).factorise(),
            (dense,),
        ),
        "LaplacePosterior.solve": (lambda post, v: post.solve(v), (laplace, vector)),
        "LaplacePosterior.sample(20)": (
            lambda post, k: post.sample(k, 20),
            (laplace, key),
        ),
        "LaplacePosterior.predictive": (
            lambda post, x: post.predictive(x),
            (laplace, test),
        ),
        "LaplacePosterior.logdet": (lambda post: post.logdet(), (laplace,)),
        "LaplacePosterior.logdet('slq')": (
            lambda post: fisherops.LaplacePosterior(post.curvature, 1.0).logdet(
                "slq", num_probes=8, num_lanczos_steps=32
            ),
            (laplace,),
        ),
        "log_marginal_likelihood": (
            lambda post: post.log_marginal_likelihood(-100.0),
            (laplace,),
        ),
        "optimize_prior_precision": (
            lambda op: fisherops.optimize_prior_precision(op).prior_precision,
            (dense,),
        ),
        "probit": (fisherops.probit, (mean, variance)),
        "create_empirical_fisher_mv(...) closure": (
            lambda v: functional(v),
            (vector,),
        ),
    }


def count_compilations(fn):
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.block_until_ready(fn())
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return len(events)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    options = parser.parse_args()
    print(f"fisherops eager vs filter_jit, {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(
        f"jax {jax.__version__} ({jax.default_backend()}), {platform.processor()}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    params, data, test = problem()
    size = sum(leaf.size for leaf in jax.tree.leaves(params))
    print(f"MLP 32-32-10, P = {size}, N = {NUM_DATA}, {options.repeats} repeats\n")
    print("| call | eager | filter_jit | eager / jit | eager compiles |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for name, (fn, args) in calls(params, data, test).items():
        construction = name.startswith("GGNOperator(")
        eager = ft.partial(fn, *args)
        jitted = ft.partial(eqx.filter_jit(fn), *args)
        jax.block_until_ready(eager())
        jax.block_until_ready(jitted())
        compiles = count_compilations(eager)
        eager_s = median_seconds(eager, options.repeats, warmup=0)
        jit_s = median_seconds(jitted, options.repeats, warmup=0)
        if not construction:
            worst = max(worst, eager_s / jit_s)
        print(
            f"| `{name}` | {eager_s * 1e3:.2f} ms | {jit_s * 1e3:.2f} ms "
            f"| {eager_s / jit_s:.2f} | {compiles} |"
        )
    print(f"\nworst eager / jit of a method: {worst:.2f} (target <= 2)")


if __name__ == "__main__":
    main()
