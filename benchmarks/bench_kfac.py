"""What KFAC costs, in gradients, and how much it speeds up CG.

    python benchmarks/bench_kfac.py            # the full run
    python benchmarks/bench_kfac.py --quick    # a fast smoke run (3 repeats)

Problems from `_problems.py`: the MLP 32-256-256-10 (cross-entropy, N = 512) and
the small CNN (two stride-2 3x3 convolutions and a dense layer on 28x28 images).
Every timed function is jit-compiled, warmed up, then called `--repeats` times
(default 20) round-robin with the others; the tables show medians, in units of
the gradient of the summed loss over the same batch (`grad`). Timed:

- `KFAC GGN build`, `KFAC MC build (M=1)`, `KFAC EF build`: the operator built
  from `(params, data)`: the layer factors `A`, `G` (and the other params'
  diagonal), forward pass included.
- `inverse()`: the eigendecompositions of every `A` and `G` (once per prior).
- `inverse mv`: one `(K + λI)^{-1} v` of the decomposed inverse.
- `GGN mv`: one exact GGN `mv` (forward pass included), for scale.

Then, in float64, `lineax.CG` on the exact `GGN + λ I` (`rtol = atol = 1e-6`,
at most 5000 steps) with and without `preconditioner=kfac.inverse(λ)`: steps and
wall time, KFAC build and inverse included in the preconditioned time.

On a CPU backend the process CPU time is reported next to the wall time.
"""

import argparse
import datetime
import platform
import statistics
import time

import jax

jax.config.update("jax_enable_x64", True)  # for the float64 CG solves only

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lineax as lx  # noqa: E402
from _problems import Problem, loss_per_datum, make_problem  # noqa: E402

import fisherops  # noqa: E402

PRIOR = 1.0  # the prior precision λ of the CG problems


def unit_gradient(problem: Problem):
    loss = loss_per_datum(problem.loss)
    model = jax.vmap(problem.model_fn, in_axes=(0, None))

    def grad(params, inputs, targets):
        def total(p):
            return jnp.sum(jax.vmap(loss)(model(inputs, p), targets))

        return jax.grad(total)(params)

    return grad


def kfac(problem: Problem, params, inputs, targets, kind="ggn"):
    extra = {"key": jax.random.key(3)} if kind == "mc" else {}
    return fisherops.KFACOperator(
        problem.model_fn, params, (inputs, targets), problem.loss, kind=kind, **extra
    )


def block(tree):
    return jax.block_until_ready(eqx.filter(tree, eqx.is_array))


def measure(functions: dict, repeats: int) -> dict:
    """Median wall and CPU seconds per call, round-robin over the functions."""
    for fn in functions.values():
        block(fn())
    walls = {name: [] for name in functions}
    cpus = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            wall, cpu = time.perf_counter(), time.process_time()
            block(fn())
            walls[name].append(time.perf_counter() - wall)
            cpus[name].append(time.process_time() - cpu)
    return {
        name: (statistics.median(walls[name]), statistics.median(cpus[name]))
        for name in functions
    }


def cost_table(problem: Problem, repeats: int) -> None:
    params, inputs, targets = problem.params, problem.inputs, problem.targets
    data = (params, inputs, targets)
    vector = jax.tree_util.tree_map(
        lambda leaf: jax.random.normal(jax.random.key(1), leaf.shape, leaf.dtype),
        params,
    )
    grad = jax.jit(unit_gradient(problem))
    builds = {
        kind: eqx.filter_jit(lambda p, x, y, kind=kind: kfac(problem, p, x, y, kind))
        for kind in ("ggn", "mc", "ef")
    }
    operator = builds["ggn"](*data)
    inverse = eqx.filter_jit(lambda op: op.inverse(PRIOR))
    inverse_operator = inverse(operator)
    inverse_mv = eqx.filter_jit(lambda inv, v: inv.mv(v))
    ggn_mv = jax.jit(
        lambda p, x, y, v: fisherops.GGNOperator(
            problem.model_fn, p, (x, y), problem.loss
        ).mv(v)
    )
    functions = {
        "grad": lambda: grad(*data),
        "KFAC GGN build": lambda: builds["ggn"](*data),
        "KFAC MC build (M=1)": lambda: builds["mc"](*data),
        "KFAC EF build": lambda: builds["ef"](*data),
        "inverse()": lambda: inverse(operator),
        "inverse mv": lambda: inverse_mv(inverse_operator, vector),
        "GGN mv": lambda: ggn_mv(*data, vector),
    }
    times = measure(functions, repeats)
    unit_wall, unit_cpu = times["grad"]
    print(f"\n### {problem.name}, P = {problem.num_params}, float32\n")
    print("| | wall ms | wall / grad | CPU / grad |")
    print("|---|---|---|---|")
    for name, (wall, cpu) in times.items():
        ratios = f"{wall / unit_wall:.2f} | {cpu / unit_cpu:.2f}"
        print(f"| {name} | {wall * 1e3:.2f} | {ratios} |")


def cg_table(problems: list[Problem]) -> None:
    solver = lx.CG(rtol=1e-6, atol=1e-6, max_steps=5_000)
    print(f"\n### CG on the exact GGN + {PRIOR} I, float64, rtol = atol = 1e-6\n")
    print(
        "| problem | P | CG steps | KFAC-PCG steps | step ratio | CG s | KFAC-PCG s |"
    )
    print("|---|---|---|---|---|---|---|")
    for problem in problems:
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), problem.params)
        inputs = problem.inputs.astype(jnp.float64)
        data = (params, inputs, problem.targets)
        rhs = jax.tree_util.tree_map(jnp.ones_like, params)

        def solve(p, x, y, b, preconditioned, problem=problem):
            exact = fisherops.GGNOperator(problem.model_fn, p, (x, y), problem.loss)
            prior = fisherops.PriorPrecision(p, PRIOR)
            options = {}
            if preconditioned:
                options["preconditioner"] = kfac(problem, p, x, y).inverse(prior)
            solution = lx.linear_solve(
                exact + prior, b, solver, options=options, throw=False
            )
            converged = solution.result == lx.RESULTS.successful
            return solution.stats["num_steps"], converged

        row = []
        for preconditioned in (False, True):
            run = jax.jit(lambda *a, pc=preconditioned: solve(*a, pc))
            block(run(*data, rhs))
            start = time.perf_counter()
            steps, converged = block(run(*data, rhs))
            row.append((int(steps), bool(converged), time.perf_counter() - start))
        (plain, ok_plain, t_plain), (pcg, ok_pcg, t_pcg) = row
        mark = {True: "", False: " (not converged)"}
        print(
            f"| {problem.name} | {problem.num_params} | {plain}{mark[ok_plain]} | "
            f"{pcg}{mark[ok_pcg]} | {plain / max(pcg, 1):.1f}x | {t_plain:.2f} | "
            f"{t_pcg:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    print(
        f"# bench_kfac {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"jax {jax.__version__}, {jax.default_backend()} "
        f"({jax.devices()[0].device_kind}), {platform.machine()}, repeats {repeats}"
    )
    cost_table(make_problem("mlp", 512), repeats)
    cost_table(make_problem("cnn", 256), repeats)
    cg_table(
        [
            make_problem("mlp", 128 if args.quick else 512),
            make_problem("cnn", 64 if args.quick else 256),
        ]
    )


if __name__ == "__main__":
    main()
