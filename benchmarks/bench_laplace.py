"""What the Laplace workflow costs, in gradients: posterior samples and log-dets.

    python benchmarks/bench_laplace.py            # the full run
    python benchmarks/bench_laplace.py --quick    # a smoke run (1 repeat)

Problems (`_problems.py`, float32, random init, cross-entropy, N = 512):
`mlp` 32-256-256-10 (P = 76810) and `mlp-small` 32-64-64-10 (P = 6922). The
curvature is the GGN, the prior isotropic with precision `--prior` (default 1).
All matmuls run at full float32 precision (with TF32, the GPU default, CG
stalls: 3000+ steps instead of 70 on `mlp-small`), `grad` included.
Every timed function starts from `(params, data)` (forward pass included), is
jit-compiled and warmed up, then called `--repeats` times; the table shows
medians, and ratios to `grad`, the gradient of the summed loss over the batch.

- `sample x1`: `LaplacePosterior.sample(key, 1)`: one factor `vjp` and one CG
  solve (default tolerance, `rtol = atol = sqrt(eps) = 3.5e-4` in float32).
- `sample x16 / 16`: sixteen vmapped samples, per sample.
- `CG steps`: the steps of one such solve (same right-hand side distribution).
- `logdet slq SxM`: stochastic Lanczos quadrature, `S` probes, `M` steps
  (`32x64` is the default); its error against the float64 dense log-det.
- `logdet dense`: `as_matrix` and Cholesky. Only for `mlp-small`: the dense
  `P x P` of the big MLP is 23.6 GB in float32.
"""

import argparse
import datetime
import functools as ft
import os
import platform

import jax

# Full float32 matmuls: with TF32, the GPU default, CG stalls short of its
# tolerance (3000+ steps instead of 70 on `mlp-small`). No effect on CPUs.
jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import lineax as lx  # noqa: E402
import numpy as np  # noqa: E402
from _problems import Problem, loss_per_datum, make_problem  # noqa: E402
from _timing import median_seconds  # noqa: E402

import fisherops  # noqa: E402

SLQ_CONFIGS = ((32, 64), (8, 32))
DENSE_LIMIT = 10_000  # largest P whose dense log-det is timed


def posterior(problem: Problem, params, inputs, targets, prior):
    curvature = fisherops.GGNOperator(
        problem.model_fn, params, (inputs, targets), problem.loss
    )
    return fisherops.LaplacePosterior(curvature, prior, params)


def functions(problem: Problem, prior: float):
    model = jax.vmap(problem.model_fn, in_axes=(0, None))
    loss = jax.vmap(loss_per_datum(problem.loss))

    def grad(params, inputs, targets, key):
        return jax.grad(lambda p: jnp.sum(loss(model(inputs, p), targets)))(params)

    def sample(num_samples):
        def fn(params, inputs, targets, key):
            laplace = posterior(problem, params, inputs, targets, prior)
            return laplace.sample(key, num_samples)

        return fn

    def slq(num_probes, num_steps):
        def fn(params, inputs, targets, key):
            laplace = posterior(problem, params, inputs, targets, prior)
            return laplace.logdet(
                "slq", key=key, num_probes=num_probes, num_lanczos_steps=num_steps
            )

        return fn

    def dense(params, inputs, targets, key):
        return posterior(problem, params, inputs, targets, prior).logdet("dense")

    timed = {"grad": grad, "sample x1": sample(1), "sample x16": sample(16)}
    for num_probes, num_steps in SLQ_CONFIGS:
        timed[f"logdet slq {num_probes}x{num_steps}"] = slq(num_probes, num_steps)
    if problem.num_params <= DENSE_LIMIT:
        timed["logdet dense"] = dense
    return {name: jax.jit(fn) for name, fn in timed.items()}


def _cg(dtype, size: int) -> lx.CG:
    """The posterior's default CG: `rtol = atol = sqrt(eps)`, the residual by the
    recurrence only, at most `min(10 P, 5000)` steps."""
    tolerance = float(np.sqrt(np.finfo(dtype).eps))
    return lx.CG(
        rtol=tolerance,
        atol=tolerance,
        stabilise_every=None,
        max_steps=min(10 * size, 5000),
    )


def _solver(model_fn, loss: str, prior: float, jacobi: bool):
    """`(params, inputs, targets, key) -> (steps, relative residual)` of one
    sample's solve `(C + λI) z = sqrt(λ) e_1 + A e_2` (GGN `C`), plain CG or
    CG preconditioned by `diag(C + λI)^{-1}` (the exact diagonal, its cost
    included)."""

    @jax.jit
    def solve(params, inputs, targets, key):
        ggn = fisherops.GGNOperator(model_fn, params, (inputs, targets), loss)
        curvature = lx.linearise(ggn)
        precision = curvature + fisherops.PriorPrecision(params, prior)
        key_prior, key_curvature = jax.random.split(key)
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        noise = jax.random.normal(key_prior, flat.shape, flat.dtype)
        coefficients = jax.random.normal(
            key_curvature, curvature.sqrt_shape(), flat.dtype
        )
        rhs = jax.tree_util.tree_map(
            lambda a, b: jnp.sqrt(prior) * a + b,
            unravel(noise),
            curvature.sqrt_mv(coefficients),
        )
        options = {}
        if jacobi:
            diagonal = ggn.diagonal() + prior
            options["preconditioner"] = fisherops.PriorPrecision(
                params, unravel(1 / diagonal)
            )
        solution = lx.linear_solve(
            precision,
            rhs,
            _cg(flat.dtype, flat.size),
            options=options,
            throw=False,
        )
        flat_rhs = jax.flatten_util.ravel_pytree(rhs)[0]
        residual = (
            flat_rhs - jax.flatten_util.ravel_pytree(precision.mv(solution.value))[0]
        )
        return (
            solution.stats["num_steps"],
            jnp.linalg.norm(residual) / jnp.linalg.norm(flat_rhs),
        )

    return solve


def cg_steps(problem: Problem, prior: float, params, inputs, targets, key):
    """The CG steps of one sample's solve: `(C + λI) z = sqrt(λ) e_1 + A e_2`."""
    solve = _solver(problem.model_fn, problem.loss, prior, jacobi=False)
    return int(solve(params, inputs, targets, key)[0])


def pcg_rows(name, model_fn, params, inputs, targets, loss, prior, repeats):
    """Plain CG against Jacobi-preconditioned CG on one problem: steps, time,
    and how much the diagonal of `C + λI` varies."""
    key = jax.random.key(1)
    args = (params, inputs, targets, key)
    ggn = fisherops.GGNOperator(model_fn, params, (inputs, targets), loss)
    diagonal = np.asarray(ggn.diagonal()) + prior
    spread = float(diagonal.max() / diagonal.min())
    result = {}
    for label, jacobi in (("CG", False), ("Jacobi PCG", True)):
        solve = _solver(model_fn, loss, prior, jacobi)
        steps, residual = solve(*args)
        seconds = median_seconds(ft.partial(solve, *args), repeats)
        result[label] = (int(steps), float(residual), seconds)
    (cg, cg_res, cg_s), (pcg, pcg_res, pcg_s) = result["CG"], result["Jacobi PCG"]
    size = sum(leaf.size for leaf in jax.tree.leaves(params))
    print(
        f"  {name:<34} P={size:<6} λ={prior:<5g} diag spread {spread:9.3g}  "
        f"CG {cg:5d} steps {cg_s:7.2f} s (res {cg_res:.1e})  "
        f"PCG {pcg:5d} steps {pcg_s:7.2f} s (res {pcg_res:.1e})  [load {load()}]"
    )
    return (
        f"| {name} | {size} | {prior:g} | {spread:.3g} | {cg} | {pcg} "
        f"| {cg_s:.2f} | {pcg_s:.2f} | {cg_res:.1e} / {pcg_res:.1e} |"
    )


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def pcg_table(repeats: int, priors, big: bool) -> list[str]:
    """Issue 9.5: CG steps with and without the Jacobi preconditioner on the
    benchmark problems (random init) and the workflow's trained digits models."""
    import bench_workflow

    print("\n== CG vs Jacobi-preconditioned CG (GGN + λI, float32, one sample's solve)")
    problems = []
    names = ["mlp-small-ce"] + (["cnn-ce", "mlp-ce"] if big else [])
    for name in names:
        problem = make_problem(name, 256 if name.startswith("cnn") else 512)
        problems.append(
            (
                f"{problem.name}, random init",
                problem.model_fn,
                problem.params,
                problem.inputs,
                problem.targets,
                problem.loss,
            )
        )
    (x_train, y_train), _ = bench_workflow.digits()
    for model in bench_workflow.MODELS:
        model_fn, params, _ = bench_workflow.train(model, x_train, y_train, 60)
        inputs = jnp.asarray(bench_workflow.jax_inputs(model, x_train))
        problems.append(
            (
                f"digits {model} N={len(y_train)}, trained",
                model_fn,
                params,
                inputs,
                jnp.asarray(y_train),
                "cross_entropy",
            )
        )
    rows = []
    for problem in problems:
        for prior in priors:
            rows.append(pcg_rows(*problem, prior, repeats))
    return rows


def exact_logdet(problem: Problem, prior: float, params, inputs, targets) -> float:
    """float64 `log det(C + λI)` from the (float32) dense curvature."""
    matrix = jax.jit(
        lambda p, x, y: posterior(problem, p, x, y, prior).curvature.as_matrix()
    )(params, inputs, targets)
    matrix = np.asarray(matrix, np.float64) + prior * np.eye(matrix.shape[0])
    return float(np.linalg.slogdet(matrix)[1])


def run(name: str, num_data: int, prior: float, repeats: int) -> list[str]:
    problem = make_problem(name, num_data)
    args = (problem.params, problem.inputs, problem.targets, jax.random.key(1))
    print(
        f"== {problem.name} ({problem.loss}), P={problem.num_params}, GGN + {prior} I"
    )
    timed = functions(problem, prior)
    seconds = {}
    for label, fn in timed.items():
        seconds[label] = median_seconds(ft.partial(fn, *args), repeats)
    seconds["sample x16 / 16"] = seconds.pop("sample x16") / 16
    exact = exact_logdet(problem, prior, *args[:3]) if "logdet dense" in timed else None
    steps = cg_steps(problem, prior, *args)
    unit = seconds["grad"]
    rows = []
    for label, value in seconds.items():
        note = ""
        if label.startswith("logdet") and exact is not None:
            estimate = float(timed[label](*args))
            note = f"rel. error {abs(estimate - exact) / abs(exact):.1e}"
        if label.startswith("sample"):
            note = f"CG steps {steps}"
        print(f"  {label:<18} {value * 1e3:10.2f} ms {value / unit:9.1f}x grad  {note}")
        rows.append(
            f"| {problem.name} | {label} | {value * 1e3:.2f} | {value / unit:.1f} "
            f"| {note} |"
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--prior", type=float, default=1.0)
    parser.add_argument("--num-data", type=int, default=512)
    parser.add_argument(
        "--pcg",
        action="store_true",
        help="only the CG vs Jacobi-preconditioned CG table (issue 9.5)",
    )
    parser.add_argument(
        "--pcg-priors", default="1,0.01", help="prior precisions of the PCG table"
    )
    parser.add_argument(
        "--pcg-big",
        action="store_true",
        help="add the 28x28 CNN (P = 9098) and the P = 76810 MLP to it",
    )
    options = parser.parse_args()
    repeats = options.repeats or (1 if options.quick else 5)
    print(f"fisherops Laplace benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, ", end="")
    print(f"device {jax.devices()[0].device_kind}, {platform.processor() or ''}")
    print(f"median of {repeats} calls; ratios to `grad`; load average {load()}\n")
    if options.pcg:
        priors = [float(p) for p in options.pcg_priors.split(",")]
        rows = pcg_table(repeats, priors, options.pcg_big)
        print(
            "\n| problem | P | λ | max/min diag(C + λI) | CG steps | PCG steps "
            "| CG s | PCG s | relative residual CG / PCG |"
        )
        print("|---" * 9 + "|")
        print("\n".join(rows))
        return
    rows = []
    for name in ("mlp-small-ce", "mlp-ce"):
        rows += run(name, options.num_data, options.prior, repeats)
    print("\n| problem | what | ms | x grad | note |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
