"""Write the example notebooks from the cells below and execute them in place.

    python notebooks/build.py             # all notebooks
    python notebooks/build.py regression  # those whose name contains "regression"

The committed `.ipynb` files are this script's output, plots included; edit the
cells here, not in Jupyter. Needs `nbformat`, `nbclient`, `ipykernel` and the
`demo` extra (`pip install ".[test]"` has them all).
"""

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

SETUP = """\
import time

import jax
import jax.numpy as jnp
import lineax as lx
import matplotlib.pyplot as plt
import numpy as np

import fisherops

plt.rcParams["figure.dpi"] = 70"""

SETUP_X64 = """\
import time

import jax

jax.config.update("jax_enable_x64", True)  # float64: exact comparisons below

import equinox as eqx
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
import matplotlib.pyplot as plt
import numpy as np

import fisherops

plt.rcParams["figure.dpi"] = 70"""

MLP = """\
def mlp(x, params):
    \"\"\"model_fn(input, params): tanh hidden layers; one datum in, one out.\"\"\"
    *hidden, (w, b) = params
    for w_h, b_h in hidden:
        x = jnp.tanh(x @ w_h + b_h)
    return x @ w + b


def init_mlp(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.normal(k, (m, n)) / np.sqrt(m), jnp.zeros(n))
        for k, m, n in zip(keys, sizes[:-1], sizes[1:])
    ]"""


REGRESSION = [
    new_markdown_cell("""\
# 1-D regression with a gap: Laplace predictive bands from EF, MC and GGN

A small MLP fits noisy samples of `sin(2x)` observed on `[-3, -1] ∪ [1, 3]`; there
is no data in between. The MAP fit alone says nothing about where it is unsure.
The Laplace approximation `N(θ*, (C + λI)^{-1})` with `C` the curvature of the
training loss gives a predictive band through the linearised network, and the band
should open up in the gap and outside the data. We compare three curvatures:

- the **empirical Fisher** (EF), from the gradients at the observed targets;
- the **Monte-Carlo Fisher** (MC), from gradients at targets sampled from the model;
- the **generalised Gauss-Newton** (GGN), the exact Fisher the MC estimates."""),
    new_code_cell(SETUP_X64),
    new_markdown_cell("""\
## Data and MAP fit

Observation noise `σ = 0.1`. The negative log joint is
`Σ_n (f_n - y_n)^2 / (2σ^2) + λ/2 |θ|^2`; plain JAX, a hand-written Adam."""),
    new_code_cell(
        """\
rng = np.random.default_rng(0)
x = np.concatenate([rng.uniform(-3, -1, 40), rng.uniform(1, 3, 40)])
noise = 0.1
y = np.sin(2 * x) + noise * rng.normal(size=x.shape)
inputs, targets = jnp.asarray(x[:, None]), jnp.asarray(y[:, None])

"""
        + MLP
        + """


prior_precision = 1.0


def neg_log_joint(params):
    f = jax.vmap(mlp, in_axes=(0, None))(inputs, params)
    squares = sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(params))
    data_term = jnp.sum((f - targets) ** 2) / (2 * noise**2)
    return data_term + 0.5 * prior_precision * squares


@jax.jit
def train(params, num_steps=5000, learning_rate=1e-2):
    def step(state, t):
        p, m, v = state
        g = jax.grad(neg_log_joint)(p)
        m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, g)
        v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g**2, v, g)
        rate = learning_rate * jnp.sqrt(1 - 0.999 ** (t + 1)) / (1 - 0.9 ** (t + 1))
        p = jax.tree.map(lambda p, m, v: p - rate * m / (jnp.sqrt(v) + 1e-8), p, m, v)
        return (p, m, v), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    state = (params, zeros, zeros)
    (params, _, _), _ = jax.lax.scan(step, state, jnp.arange(num_steps))
    return params


params = train(init_mlp(jax.random.key(0), (1, 16, 16, 1)))
num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
print(f"{num_params} params, negative log joint {float(neg_log_joint(params)):.2f}")"""
    ),
    new_markdown_cell("""\
## The likelihood, and the MSE convention

Our likelihood is `y ~ N(f, σ^2)`, whose negative log is `Σ_o (f_o - y_o)^2 / (2σ^2)`
plus a constant. A `fisherops.Likelihood` says so, with a sampler (for the MC
Fisher) and its output Hessian factor `I / σ` (for the GGN)."""),
    new_code_cell("""\
gaussian = fisherops.Likelihood(
    lambda f, y: jnp.sum((f - y) ** 2) / (2 * noise**2),
    sample=lambda key, f: f + noise * jax.random.normal(key, f.shape, f.dtype),
    hessian_factor=lambda f: jnp.eye(f.shape[0], dtype=f.dtype) / noise,
)
data = (inputs, targets)
curvatures = {
    "empirical Fisher": fisherops.EmpiricalFisherOperator(mlp, params, data, gaussian),
    "MC Fisher (10 samples)": fisherops.MCFisherOperator(
        mlp, params, data, gaussian, jax.random.key(1), mc_samples=10
    ),
    "GGN": fisherops.GGNOperator(mlp, params, data, gaussian),
}"""),
    new_markdown_cell("""\
fisherops' built-in `"mse"` is `c = Σ_o (f_o - y_o)^2` with **no** 1/2: Hessian
`2I`, likelihood `N(f, I/2)`. Our loss is `c / (2σ^2)`, so the same matrices come
from `"mse"` through `fisherops.scale`, with a factor that depends on the matrix:
the GGN is linear in the loss (`1 / (2σ^2)`), the empirical Fisher, a product of
two gradients, is quadratic (`1 / (4σ^4)`)."""),
    new_code_cell("""\
def gap(a, b):
    a, b = a.as_matrix(), b.as_matrix()
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


mse_ggn = fisherops.GGNOperator(mlp, params, data, "mse")
mse_ef = fisherops.EmpiricalFisherOperator(mlp, params, data, "mse")
print(
    "GGN: scale(mse, 1/(2σ²)) vs gaussian, relative gap",
    gap(fisherops.scale(mse_ggn, 1 / (2 * noise**2)), curvatures["GGN"]),
)
print(
    "EF:  scale(mse, 1/(4σ⁴)) vs gaussian, relative gap",
    gap(fisherops.scale(mse_ef, 1 / (4 * noise**4)), curvatures["empirical Fisher"]),
)"""),
    new_markdown_cell("""\
## Evidence-tuned prior and the linearised predictive

The prior precision is chosen by maximising the Laplace evidence
`log p(D | θ*) + log N(θ*; 0, λ^{-1} I) - ½ log det((C + λI) / 2π)`; the
predictive is the network linearised at `θ*` under `N(θ*, (C + λI)^{-1})`."""),
    new_code_cell("""\
f_train = jax.vmap(mlp, in_axes=(0, None))(inputs, params)
log_likelihood = jnp.sum(
    -0.5 * ((f_train - targets) / noise) ** 2 - 0.5 * jnp.log(2 * jnp.pi * noise**2)
)

grid = jnp.linspace(-4.5, 4.5, 181)[:, None]
bands = {}
for name, curvature in curvatures.items():
    start = time.perf_counter()
    prior = fisherops.optimize_prior_precision(
        curvature,
        params,
        log_likelihood,
        init=prior_precision,
        num_steps=30,
        learning_rate=0.3,
    )
    posterior = fisherops.LaplacePosterior(curvature, prior, params)
    mean, variance = posterior.predictive(mlp, grid)
    bands[name] = (mean[:, 0], jnp.sqrt(variance[:, 0] + noise**2))
    evidence = posterior.log_marginal_likelihood(log_likelihood)
    print(
        f"{name:<24} λ = {float(jax.tree.leaves(prior.precision)[0]):6.3f}, "
        f"log evidence {float(evidence):8.2f}, {time.perf_counter() - start:.1f} s"
    )"""),
    new_markdown_cell("""\
## Predictive bands

Mean ± 2 standard deviations of `f(x) + noise`, with `f` the linearised network
under the Laplace posterior."""),
    new_code_cell("""\
figure, axes = plt.subplots(1, 3, figsize=(12, 3.4), sharey=True)
for ax, (name, (mean, std)) in zip(axes, bands.items()):
    lower, upper = mean - 2 * std, mean + 2 * std
    ax.fill_between(grid[:, 0], lower, upper, alpha=0.3, label="± 2 std")
    ax.plot(grid[:, 0], mean, label="MAP")
    ax.plot(x, y, "k.", ms=3, label="data")
    ax.set(title=name, xlabel="x", ylim=(-3, 3))
axes[0].legend(loc="lower left", fontsize=8)
figure.tight_layout()"""),
    new_markdown_cell("""\
All three open up in the gap and away from the data. The GGN is the exact Fisher
of this likelihood, and the Monte-Carlo Fisher estimates it; the empirical Fisher
replaces the model's noise by the observed residuals `f_n - y_n`, a different
matrix, and its band differs accordingly."""),
]


CLASSIFICATION = [
    new_markdown_cell("""\
# Digits: calibration before and after the Laplace approximation

An MLP trained on scikit-learn's handwritten digits, then a Laplace approximation
with the GGN and an evidence-tuned prior precision; the predictive is the
linearised network with the probit approximation. The pieces come from
`fisherops.demo` (`python -m fisherops.demo` runs the same with all three
curvatures)."""),
    new_code_cell(
        SETUP
        + """
from fisherops.demo import (
    calibration,
    init_mlp,
    load_digits_split,
    mlp,
    reliability_diagram,
    train_map,
)"""
    ),
    new_code_cell("""\
(x_train, y_train), (x_test, y_test) = load_digits_split(seed=0)
params = init_mlp(jax.random.key(0), (64, 16, 10))
train_prior = 1.0
start = time.perf_counter()
params, objective = train_map(
    mlp, params, (x_train, y_train), train_prior, key=jax.random.key(1), num_epochs=150
)
seconds = time.perf_counter() - start
print(f"{x_train.shape[0]} training images, trained in {seconds:.1f} s")

logits = jax.vmap(mlp, in_axes=(0, None))(x_train, params)
log_probs = jax.nn.log_softmax(logits)
log_likelihood = jnp.sum(jnp.take_along_axis(log_probs, y_train[:, None], 1))"""),
    new_markdown_cell("""\
## GGN Laplace with an evidence-tuned prior

The GGN of the summed cross-entropy is materialised once (`lx.materialise`, from
matrix-free products) and reused by the evidence and the predictive."""),
    new_code_cell("""\
ggn = fisherops.GGNOperator(mlp, params, (x_train, y_train), "cross_entropy")
dense = lx.materialise(ggn)
prior = fisherops.optimize_prior_precision(
    dense, params, log_likelihood, init=train_prior, num_steps=20, learning_rate=0.3
)
posterior = fisherops.LaplacePosterior(dense, prior, params)
λ = float(jax.tree.leaves(prior.precision)[0])
print(f"evidence-optimal prior precision λ = {λ:.3f}")


def predict(inputs):
    mean, variance = posterior.predictive(mlp, inputs)
    map_probs = jax.nn.softmax(jax.vmap(mlp, in_axes=(0, None))(inputs, params))
    laplace_probs = fisherops.probit(mean, variance)
    return {"MAP": map_probs, "Laplace (GGN, probit)": laplace_probs}


predictions = predict(x_test)
for name, probs in predictions.items():
    metrics = calibration(probs, y_test)
    print(f"{name:<24}" + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))"""),
    new_code_cell("""\
reliability_diagram(predictions, y_test);"""),
    new_markdown_cell("""\
On held-out digits this small MLP is already well calibrated (its ECE is a few
percent), and the Laplace predictive keeps the accuracy but lowers the confidence
too much: with the prior precision the evidence prefers, the posterior keeps much
of the prior's spread in the directions the data do not pin down, and the
predictive is underconfident (its curve lies above the diagonal).

## Under a distribution shift

Add Gaussian pixel noise to the test images: the MAP's accuracy drops, and it
stays confident."""),
    new_code_cell("""\
shifted = x_test + 0.5 * jax.random.normal(jax.random.key(2), x_test.shape)
shifted_predictions = predict(shifted)
for name, probs in shifted_predictions.items():
    metrics = calibration(probs, y_test)
    confidence = float(jnp.mean(jnp.max(probs, axis=1)))
    print(
        f"{name:<24}"
        + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        + f"  mean confidence {confidence:.3f}"
    )
reliability_diagram(shifted_predictions, y_test);"""),
    new_markdown_cell("""\
Under the shift the MAP is overconfident (below the diagonal) and the Laplace
predictive with the evidence's prior is underconfident (above it): its mean
confidence is well below its accuracy.

## The prior precision: evidence versus prediction

The evidence picks the prior that best explains the *training* data; nothing
makes it the best prior for the predictive. Sweeping `λ` shows the trade-off: a
larger `λ` shrinks the posterior towards the MAP. Around `λ ≈ 10` the Laplace
predictive is close to the MAP on clean digits and much better calibrated than
the MAP under the shift. In practice choose `λ` on held-out data when predictive
calibration is the goal (here we look at the test sets directly, for
illustration)."""),
    new_code_cell("""\
precisions = [λ, 3.0, 10.0, 30.0, 100.0]
sets = {"clean": (x_test, y_test), "shifted": (shifted, y_test)}
curves = {name: [] for name in sets}
for precision in precisions:
    sweep = fisherops.LaplacePosterior(dense, precision, params)
    for name, (inputs, labels) in sets.items():
        mean, variance = sweep.predictive(mlp, inputs)
        curves[name].append(calibration(fisherops.probit(mean, variance), labels))

figure, axes = plt.subplots(1, 2, figsize=(9, 3.4))
for ax, metric in zip(axes, ("nll", "ece")):
    for (name, (inputs, labels)), color in zip(sets.items(), ("C0", "C1")):
        values = [metrics[metric] for metrics in curves[name]]
        ax.semilogx(precisions, values, "o-", color=color, label=f"Laplace, {name}")
        map_probs = jax.nn.softmax(jax.vmap(mlp, in_axes=(0, None))(inputs, params))
        map_value = calibration(map_probs, labels)[metric]
        ax.axhline(map_value, color=color, linestyle=":", label=f"MAP, {name}")
    ax.axvline(λ, color="gray", linewidth=0.8)
    ax.set(xlabel="prior precision λ (gray: the evidence's)", title=metric.upper())
axes[0].legend(fontsize=8)
figure.tight_layout()"""),
]


OPERATORS = [
    new_markdown_cell("""\
# The operators with lineax: solves, `linearise`, chunking, sums with priors

fisherops' curvature matrices are `lineax.AbstractLinearOperator`s on params
pytrees. This notebook checks each verb against the dense matrix built the obvious
way, in float64."""),
    new_code_cell(SETUP_X64),
    new_code_cell(
        MLP
        + """


key_params, key_x, key_y = jax.random.split(jax.random.key(0), 3)
params = init_mlp(key_params, (5, 8, 3))
inputs = jax.random.normal(key_x, (64, 5))
labels = jax.random.randint(key_y, (64,), 0, 3)  # integer classes, shape (N,)
data = (inputs, labels)

ef = fisherops.EmpiricalFisherOperator(mlp, params, data, "cross_entropy")
mc = fisherops.MCFisherOperator(
    mlp, params, data, "cross_entropy", jax.random.key(1), mc_samples=4
)
ggn = fisherops.GGNOperator(mlp, params, data, "cross_entropy")
print(type(ggn).__mro__[1:3])
print("in_structure:", jax.tree.map(lambda s: s.shape, ggn.in_structure()))"""
    ),
    new_markdown_cell("""\
## The matrix, the obvious way

`F = Σ_n J_n^T g_n g_n^T J_n` with `J_n` from `jax.jacfwd` on the raveled params and
`g_n = softmax(f_n) - onehot(y_n)`; `as_matrix()` is in `ravel_pytree` order."""),
    new_code_cell("""\
flat, unravel = jax.flatten_util.ravel_pytree(params)


def dense_ef():
    total = 0
    for x, y in zip(inputs, labels):
        jac = jax.jacfwd(lambda f: mlp(x, unravel(f)))(flat)  # (O, P)
        g = jax.nn.softmax(mlp(x, params)) - jax.nn.one_hot(y, 3)
        total = total + jac.T @ jnp.outer(g, g) @ jac
    return total


print("|EF - dense| =", float(jnp.max(jnp.abs(ef.as_matrix() - dense_ef()))))
v = jax.tree.map(jnp.ones_like, params)  # a params-shaped vector
print("mv returns a params pytree:", jax.tree.map(jnp.shape, ef.mv(v)))"""),
    new_markdown_cell("""\
## Sums with priors, and solves

`curvature + PriorPrecision(params, λ)` is symmetric positive definite for lineax,
so `CG`, `Cholesky` and `AutoLinearSolver(well_posed=True)` take it as is, under
`jit` too (operators are equinox Modules: pass them through `eqx.filter_jit`)."""),
    new_code_cell("""\
precision = ggn + fisherops.PriorPrecision(params, 1.0)
b = jax.tree.map(lambda leaf: jnp.sin(jnp.arange(leaf.size).reshape(leaf.shape)), v)
flat_b = jax.flatten_util.ravel_pytree(b)[0]
exact = jnp.linalg.solve(ggn.as_matrix() + jnp.eye(flat.size), flat_b)
for solver in (
    lx.CG(rtol=1e-10, atol=1e-10),
    lx.Cholesky(),
    lx.AutoLinearSolver(well_posed=True),
):
    solve = eqx.filter_jit(lambda op, b, s=solver: lx.linear_solve(op, b, s).value)
    x = jax.flatten_util.ravel_pytree(solve(precision, b))[0]
    error = float(jnp.max(jnp.abs(x - exact)))
    print(f"{type(solver).__name__:<18} error {error:.1e}")"""),
    new_markdown_cell("""\
A layerwise prior (one precision per params leaf) and a tempered curvature work the
same way. Scaling by a JAX scalar makes lineax forget positive definiteness
(`0.5 * ggn + prior` is refused by CG); `fisherops.scale` keeps it."""),
    new_code_cell("""\
layerwise = fisherops.PriorPrecision(params, [(1.0, 0.1), (2.0, 0.1)])
tempered = fisherops.scale(ggn, jnp.asarray(0.5)) + layerwise
x = lx.linear_solve(tempered, b, lx.CG(rtol=1e-10, atol=1e-10)).value
dense = 0.5 * ggn.as_matrix() + jnp.diag(lx.diagonal(layerwise))
error = jax.flatten_util.ravel_pytree(x)[0] - jnp.linalg.solve(dense, flat_b)
print("tempered, layerwise:", float(jnp.max(jnp.abs(error))))
try:
    lx.linear_solve(jnp.asarray(0.5) * ggn + layerwise, b, lx.CG(rtol=1e-6, atol=1e-6))
except ValueError as error:
    print("plain product refused by CG:", str(error).splitlines()[0][:90], "...")"""),
    new_markdown_cell("""\
## `linearise`: the primal work once per solve

`lx.linearise(op)` (which `lx.CG` calls once per solve) does the forward pass and
the output factors once; its `mv`s are then a linear `jvp` and a `vjp`."""),
    new_code_cell("""\
def best_of(fn, *args, repeats=20):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


big_inputs = jax.random.normal(key_x, (4096, 5))
big_labels = jax.random.randint(key_y, (4096,), 0, 3)
big = fisherops.GGNOperator(mlp, params, (big_inputs, big_labels), "cross_entropy")
plain_mv = eqx.filter_jit(lambda op, v: op.mv(v))
linearised = lx.linearise(big)
print(f"mv:            {1e3 * best_of(plain_mv, big, v):.2f} ms")
print(f"linearised mv: {1e3 * best_of(plain_mv, linearised, v):.2f} ms")
print("same numbers:", jnp.allclose(
    jax.flatten_util.ravel_pytree(big.mv(v))[0],
    jax.flatten_util.ravel_pytree(linearised.mv(v))[0],
))"""),
    new_markdown_cell("""\
## Chunking

`chunk_size=n` evaluates the data `n` points at a time inside a `lax.scan`: memory
is bounded by the chunk, the matrix is the same (the last chunk is shifted back,
not padded)."""),
    new_code_cell("""\
def max_gap(a, b):
    return float(jnp.max(jnp.abs(a.as_matrix() - b.as_matrix())))


for size in (None, 16, 10):
    chunked = fisherops.GGNOperator(mlp, params, data, "cross_entropy", chunk_size=size)
    print(f"chunk_size={size!s:<5}", max_gap(chunked, ggn))
chunked_mc = fisherops.MCFisherOperator(
    mlp, params, data, "cross_entropy", jax.random.key(1), mc_samples=4, chunk_size=10
)
print("MC, chunked: same samples, same matrix:", max_gap(chunked_mc, mc))"""),
    new_markdown_cell("""\
## Diagonals and spectra

`lx.diagonal` is exact (from per-datum gradients), not a probe estimate. The
spectra show how the three curvatures differ: the MC Fisher estimates the GGN, the
empirical Fisher is a different matrix."""),
    new_code_cell("""\
exact = jnp.allclose(lx.diagonal(ggn), jnp.diag(ggn.as_matrix()))
print("diagonal exact:", bool(exact))
mc_many = fisherops.MCFisherOperator(
    mlp, params, data, "cross_entropy", jax.random.key(2), mc_samples=64
)
figure, ax = plt.subplots(figsize=(6, 3.4))
operators = {"GGN": ggn, "MC, 4 samples": mc, "MC, 64 samples": mc_many, "EF": ef}
for name, op in operators.items():
    eigenvalues = jnp.linalg.eigvalsh(op.as_matrix())[::-1]
    ax.semilogy(jnp.maximum(eigenvalues, 1e-12), label=name)
ax.set(xlabel="index", ylabel="eigenvalue", ylim=(1e-6, None), title="spectra")
ax.legend(fontsize=8)
figure.tight_layout()"""),
    new_markdown_cell("""\
## The laplax functional API

`create_empirical_fisher_mv` and friends return the operator's `mv`, with the same
signatures as `laplax.curv.fisher`."""),
    new_code_cell("""\
ef_mv = fisherops.create_empirical_fisher_mv(mlp, params, data, "cross_entropy")
mc_mv = fisherops.create_MC_fisher_mv(
    mlp, params, data, "cross_entropy", jax.random.key(1), mc_samples=4
)
same = jax.tree.map(jnp.allclose, (ef_mv(v), mc_mv(v)), (ef.mv(v), mc.mv(v)))
print("functional == operator:", all(jax.tree.leaves(same)))"""),
]


NOTEBOOKS = {
    "regression_1d.ipynb": REGRESSION,
    "digits_calibration.ipynb": CLASSIFICATION,
    "operators_with_lineax.ipynb": OPERATORS,
}


def build(name: str, cells) -> None:
    notebook = new_notebook(
        cells=cells,
        metadata={
            "kernelspec": {
                "display_name": "Python 3",
                "language": "python",
                "name": "python3",
            },
            "language_info": {"name": "python"},
        },
    )
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(HERE)}},
    ).execute()
    nbformat.write(notebook, HERE / name)
    print("wrote", HERE / name)


if __name__ == "__main__":
    wanted = sys.argv[1:]
    for name, cells in NOTEBOOKS.items():
        if not wanted or any(word in name for word in wanted):
            build(name, cells)
