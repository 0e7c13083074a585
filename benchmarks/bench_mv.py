"""How much a fisherops curvature-vector product costs, in gradients.

    python benchmarks/bench_mv.py            # the full run
    python benchmarks/bench_mv.py --quick    # a fast smoke run (small N, 3 repeats)

For each problem, every timed function is jit-compiled, warmed up, then called
`--repeats` times (default 20) round-robin with the others, so that all of a
problem's numbers see the same machine load (`as_matrix` is timed on its own);
the tables show medians. The unit is
the gradient of the summed loss over the same batch. Timed, per problem:

- `grad`: `jax.grad` of `sum_n c(y_n, f(x_n))` (the unit).
- `EF mv`, `MC mv (M=1)`, `MC mv (M=16)`: building the operator from
  `(params, data)` and one `mv`, forward pass included.
- `EF lin mv`, `MC16 lin mv`: `op.linearise()` is computed once outside the timed
  region; only the `mv` of the linearised operator is timed.
- `per-datum ref`: the reference documentation's algorithm, written here: for
  each datum a `jvp` and a `vjp` of the model under `vmap`, the forward pass
  redone on every `mv`, then a sum over the data.
- `EF mv c=512` (N > 512 only): the EF `mv` with `chunk_size=512`.
- `diagonal`: `lineax.diagonal` of the EF operator (exact, per-datum gradients).
- `as_matrix`: the dense EF, only where `P x P` fits in memory.
- GGN against EF: the GGN `mv` and linearised `mv` with cross-entropy at
  C = 1000 classes (N = 256) against the EF's (`--classes-only` runs just this).
- `CG`: `lineax.linear_solve(EF + PriorPrecision(params, 1), b, CG(rtol=1e-6))`
  in float64 (in float32 CG stalls short of `rtol=1e-6` on these problems); steps
  and time, `max_steps=5000` and `throw=False` (reported if not converged).

On a CPU backend the process CPU time is reported next to the wall time: on a
shared machine it is the steadier measure of the work each product does.
"""

import argparse
import datetime
import platform
import statistics
import time

import jax

jax.config.update("jax_enable_x64", True)  # for the float64 CG solve only

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lineax as lx  # noqa: E402
from _problems import (  # noqa: E402
    Problem,
    loss_grad_per_datum,
    loss_per_datum,
    make_problem,
    mlp_fn,
    mlp_params,
)

import fisherops  # noqa: E402

DENSE_LIMIT = 20_000  # largest P for which `as_matrix` is benchmarked
CHUNK = 512  # the chunk size of the extra chunked EF `mv` on larger batches


def unit_gradient(problem: Problem):
    loss = loss_per_datum(problem.loss)
    model = jax.vmap(problem.model_fn, in_axes=(0, None))

    def grad(params, inputs, targets):
        def total(p):
            return jnp.sum(jax.vmap(loss)(model(inputs, p), targets))

        return jax.grad(total)(params)

    return grad


def per_datum_reference(problem: Problem):
    """The per-datum EF `mv`: a `jvp` and a `vjp` for each datum, under `vmap`."""
    loss_grad = loss_grad_per_datum(problem.loss)

    def mv(params, inputs, targets, vector):
        def one(x, y):
            def f(p):
                return problem.model_fn(x, p)

            output, jv = jax.jvp(f, (params,), (vector,))
            g = loss_grad(output, y)
            _, vjp_fn = jax.vjp(f, params)
            (out,) = vjp_fn(g * jnp.vdot(g, jv))
            return out

        per_datum = jax.vmap(one)(inputs, targets)
        return jax.tree_util.tree_map(lambda leaf: jnp.sum(leaf, axis=0), per_datum)

    return mv


def ef(problem: Problem, params, inputs, targets, chunk_size=None):
    return fisherops.EmpiricalFisherOperator(
        problem.model_fn, params, (inputs, targets), problem.loss, chunk_size=chunk_size
    )


def mc(problem: Problem, params, inputs, targets, key, mc_samples):
    return fisherops.MCFisherOperator(
        problem.model_fn,
        params,
        (inputs, targets),
        problem.loss,
        key,
        mc_samples=mc_samples,
    )


def jit_linearised_mv(operator):
    """A jitted `mv` of `operator.linearise()`, computed once, outside the timing."""
    linearised = eqx.filter_jit(lambda op: op.linearise())(operator)
    arrays, static = eqx.partition(linearised, eqx.is_array)
    mv = jax.jit(lambda arrays, v: eqx.combine(arrays, static).mv(v))
    return lambda v: mv(arrays, v)


def cg_solve(problem: Problem):
    solver = lx.CG(rtol=1e-6, atol=1e-6, max_steps=5_000)

    def solve(params, inputs, targets, b):
        operator = ef(problem, params, inputs, targets) + fisherops.PriorPrecision(
            params, 1.0
        )
        solution = lx.linear_solve(operator, b, solver, throw=False)
        converged = solution.result == lx.RESULTS.successful
        return solution.value, solution.stats["num_steps"], converged

    return solve


def timed_functions(problem: Problem):
    """`{label: zero-argument callable}`, each jitted, for one problem.

    Two dicts: the products timed round-robin, and `as_matrix`, timed on its own
    (its `P x P` result would evict the others' data from the caches).
    """
    params, inputs, targets = problem.params, problem.inputs, problem.targets
    vector = jax.tree_util.tree_map(
        lambda leaf: jax.random.normal(jax.random.key(1), leaf.shape, leaf.dtype),
        params,
    )
    key = jax.random.key(2)
    data = (params, inputs, targets)

    grad = jax.jit(unit_gradient(problem))
    ef_mv = jax.jit(lambda p, x, y, v: ef(problem, p, x, y).mv(v))
    mc_mv = jax.jit(
        lambda p, x, y, k, v, m: mc(problem, p, x, y, k, m).mv(v),
        static_argnums=5,
    )
    reference = jax.jit(per_datum_reference(problem))
    diagonal = jax.jit(lambda p, x, y: lx.diagonal(ef(problem, p, x, y)))
    ef_lin = jit_linearised_mv(ef(problem, *data))
    mc_lin = jit_linearised_mv(mc(problem, *data, key, 16))

    functions = {
        "grad": lambda: grad(*data),
        "EF mv": lambda: ef_mv(*data, vector),
        "MC mv (M=1)": lambda: mc_mv(*data, key, vector, 1),
        "MC mv (M=16)": lambda: mc_mv(*data, key, vector, 16),
        "EF lin mv": lambda: ef_lin(vector),
        "MC16 lin mv": lambda: mc_lin(vector),
        "per-datum ref": lambda: reference(*data, vector),
        "diagonal": lambda: diagonal(*data),
    }
    if problem.num_data > CHUNK:
        chunked_mv = jax.jit(lambda p, x, y, v: ef(problem, p, x, y, CHUNK).mv(v))
        functions[f"EF mv c={CHUNK}"] = lambda: chunked_mv(*data, vector)
    alone = {}
    if problem.num_params <= DENSE_LIMIT:
        as_matrix = jax.jit(lambda p, x, y: ef(problem, p, x, y).as_matrix())
        alone["as_matrix"] = lambda: as_matrix(*data)
    return functions, alone


def ggn_against_ef(num_data: int, num_classes: int, repeats: int) -> None:
    """The GGN `mv` against the EF `mv` with many classes (cross-entropy).

    The GGN multiplies by the output Hessian `diag(p) - p p^T` in O(C) per datum
    (the likelihood's `hessian_mv`), so its `mv` costs about the EF's.
    """
    sizes = (32, 64, 64, num_classes)
    params = mlp_params(jax.random.key(0), sizes)
    inputs = jax.random.normal(jax.random.key(1), (num_data, sizes[0]))
    targets = jax.random.randint(jax.random.key(2), (num_data,), 0, num_classes)
    vector = jax.tree_util.tree_map(jnp.ones_like, params)
    data = (params, inputs, targets)

    def operator(kind, p, x, y):
        cls = (
            fisherops.GGNOperator
            if kind == "GGN"
            else fisherops.EmpiricalFisherOperator
        )
        return cls(mlp_fn, p, (x, y), "cross_entropy")

    functions = {}
    for kind in ("EF", "GGN"):
        mv = jax.jit(lambda p, x, y, v, kind=kind: operator(kind, p, x, y).mv(v))
        functions[f"{kind} mv"] = lambda mv=mv: mv(*data, vector)
        linearised = jit_linearised_mv(operator(kind, *data))
        functions[f"{kind} lin mv"] = lambda linearised=linearised: linearised(vector)
    medians = median_times(functions, repeats)
    print(f"GGN against EF, MLP {sizes}, N={num_data}, C={num_classes}")
    print("| product | ms | / EF |")
    print("|---|---|---|")
    for label, (wall, _) in medians.items():
        unit = medians["EF lin mv" if "lin" in label else "EF mv"][0]
        print(f"| {label} | {wall * 1e3:.2f} | {wall / unit:.2f} |")
    print(flush=True)


def median_times(functions, repeats: int) -> dict[str, tuple[float, float]]:
    """Compile and warm up each function, then time them round-robin.

    Returns `{label: (median wall seconds, median process CPU seconds)}`. On a
    shared CPU the CPU time (all threads of this process) is the steadier measure
    of the work done; on an accelerator only the wall time means anything.
    """
    for fn in functions.values():
        jax.block_until_ready(fn())
        jax.block_until_ready(fn())
    wall = {label: [] for label in functions}
    cpu = {label: [] for label in functions}
    for _ in range(repeats):
        for label, fn in functions.items():
            start_cpu, start = time.process_time(), time.perf_counter()
            jax.block_until_ready(fn())
            wall[label].append(time.perf_counter() - start)
            cpu[label].append(time.process_time() - start_cpu)
    return {
        label: (statistics.median(wall[label]), statistics.median(cpu[label]))
        for label in functions
    }


def time_cg(problem: Problem, dtype, repeats: int) -> tuple[float, int, bool]:
    cast = jax.tree_util.tree_map(
        lambda leaf: (
            leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf
        ),
        (problem.params, problem.inputs, problem.targets),
    )
    b = jax.tree_util.tree_map(jnp.ones_like, cast[0])
    solve = jax.jit(cg_solve(problem)).lower(*cast, b).compile()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _, steps, converged = jax.block_until_ready(solve(*cast, b))
        times.append(time.perf_counter() - start)
    return statistics.median(times), int(steps), bool(converged)


def print_table(rows, column: int, title: str) -> None:
    labels = list(dict.fromkeys(label for _, medians, _ in rows for label in medians))
    print(title)
    cells = ["problem", "P", "grad ms"] + labels[1:] + ["ref/EF", "ref/EF lin"]
    print("| " + " | ".join(cells) + " |")
    print("|" + "|".join("---" for _ in cells) + "|")
    for problem, medians, _ in rows:
        unit = medians["grad"][column]
        ratios = [
            f"{medians[label][column] / unit:.2f}" if label in medians else "-"
            for label in labels[1:]
        ]
        reference = medians["per-datum ref"][column]
        print(
            f"| {problem.name} | {problem.num_params} | {unit * 1e3:.2f} | "
            + " | ".join(ratios)
            + f" | {reference / medians['EF mv'][column]:.2f}"
            + f" | {reference / medians['EF lin mv'][column]:.2f} |"
        )
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small N, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--cg-repeats", type=int, default=None)
    parser.add_argument(
        "--classes-only", action="store_true", help="only GGN against EF at C=1000"
    )
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 20)
    if args.classes_only:
        ggn_against_ef(64 if args.quick else 256, 1000, repeats)
        return
    cg_repeats = args.cg_repeats or 1
    if args.quick:
        problems = [("mlp-ce", 64), ("mlp-mse", 64), ("cnn-ce", 32)]
    else:
        problems = [
            ("mlp-ce", 512),
            ("mlp-ce", 4096),
            ("mlp-mse", 512),
            ("cnn-ce", 256),
            ("mlp-small-ce", 512),
        ]
    on_cpu = jax.default_backend() == "cpu"

    print(f"fisherops mv benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(
        f"jax {jax.__version__}, fisherops {fisherops.__version__}, backend "
        f"{jax.default_backend()}, device {jax.devices()[0].device_kind}, "
        f"{platform.machine()}"
    )
    print(
        f"median of {repeats} calls, round-robin (CG: {cg_repeats} after "
        "compiling); x = time / grad time\n"
    )

    rows = []
    for name, num_data in problems:
        problem = make_problem(name, num_data)
        together, alone = timed_functions(problem)
        medians = median_times(together, repeats)
        for label, fn in alone.items():
            medians |= median_times({label: fn}, repeats)
        solves = {"float64": time_cg(problem, jnp.float64, cg_repeats)}
        rows.append((problem, medians, solves))
        print(f"== {problem.name} ({problem.loss}), P={problem.num_params}")
        unit_wall, unit_cpu = medians["grad"]
        for label, (wall, cpu) in medians.items():
            line = f"  {label:<14} {wall * 1e3:10.3f} ms {wall / unit_wall:7.2f}x"
            if on_cpu:
                line += f"   cpu {cpu * 1e3:10.3f} ms {cpu / unit_cpu:7.2f}x"
            print(line)
        for dtype, (seconds, steps, converged) in solves.items():
            status = "converged" if converged else "NOT converged (max_steps)"
            print(
                f"  CG {dtype:<11} {seconds * 1e3:10.3f} ms  {steps} steps, {status}, "
                f"{seconds / max(steps, 1) * 1e3:.3f} ms/step"
            )
        print(flush=True)

    ggn_against_ef(64 if args.quick else 256, 1000, repeats)
    print_table(rows, 0, "Wall time / grad wall time (medians)")
    if on_cpu:
        print_table(rows, 1, "Process CPU time / grad CPU time (medians)")
    print("CG on EF + PriorPrecision(params, 1), b = ones, rtol = atol = 1e-6")
    print("| problem | dtype | steps | converged | ms | ms/step |")
    print("|---|---|---|---|---|---|")
    for problem, _, solves in rows:
        for dtype, (seconds, steps, converged) in solves.items():
            print(
                f"| {problem.name} | {dtype} | {steps} | {converged} | "
                f"{seconds * 1e3:.1f} | {seconds / max(steps, 1) * 1e3:.3f} |"
            )


if __name__ == "__main__":
    main()
