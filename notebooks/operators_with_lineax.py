# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The operators with lineax: solves, `linearise`, chunking, sums with priors
#
# fisherops' curvature matrices are `lineax.AbstractLinearOperator`s on params
# pytrees. This notebook checks each verb against the dense matrix built the obvious
# way, in float64.

# %%
import time

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
import matplotlib.pyplot as plt
import numpy as np

import fisherops

jax.config.update("jax_enable_x64", True)  # float64: exact comparisons below
plt.rcParams["figure.dpi"] = 70


# %%
def mlp(x, params):
    """model_fn(input, params): tanh hidden layers; one datum in, one out."""
    *hidden, (w, b) = params
    for w_h, b_h in hidden:
        x = jnp.tanh(x @ w_h + b_h)
    return x @ w + b


def init_mlp(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.normal(k, (m, n)) / np.sqrt(m), jnp.zeros(n))
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


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
print("in_structure:", jax.tree.map(lambda s: s.shape, ggn.in_structure()))

# %% [markdown]
# ## The matrix, the obvious way
#
# `F = Σ_n J_n^T g_n g_n^T J_n` with `J_n` from `jax.jacfwd` on the raveled params and
# `g_n = softmax(f_n) - onehot(y_n)`; `as_matrix()` is in `ravel_pytree` order.

# %%
flat, unravel = jax.flatten_util.ravel_pytree(params)


def dense_ef():
    total = 0
    for x, y in zip(inputs, labels, strict=True):
        jac = jax.jacfwd(lambda f, x=x: mlp(x, unravel(f)))(flat)  # (O, P)
        g = jax.nn.softmax(mlp(x, params)) - jax.nn.one_hot(y, 3)
        total = total + jac.T @ jnp.outer(g, g) @ jac
    return total


print("|EF - dense| =", float(jnp.max(jnp.abs(ef.as_matrix() - dense_ef()))))
v = jax.tree.map(jnp.ones_like, params)  # a params-shaped vector
print("mv returns a params pytree:", jax.tree.map(jnp.shape, ef.mv(v)))

# %% [markdown]
# ## Sums with priors, and solves
#
# `curvature + PriorPrecision(params, λ)` is symmetric positive definite for lineax,
# so `CG`, `Cholesky` and `AutoLinearSolver(well_posed=True)` take it as is, under
# `jit` too (operators are equinox Modules: pass them through `eqx.filter_jit`).

# %%
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
    print(f"{type(solver).__name__:<18} error {error:.1e}")

# %% [markdown]
# A layerwise prior (one precision per params leaf) and a tempered curvature work the
# same way. Multiplying an operator by a non-negative scalar (or
# `fisherops.scale(op, s)`) gives the same kind of operator with its `scale`
# multiplied, so it stays positive semidefinite for lineax and keeps its methods.

# %%
layerwise = fisherops.PriorPrecision(params, [(1.0, 0.1), (2.0, 0.1)])
tempered = 0.5 * ggn
print(type(tempered).__name__, "scale", float(tempered.scale))
x = lx.linear_solve(tempered + layerwise, b, lx.CG(rtol=1e-10, atol=1e-10)).value
dense = 0.5 * ggn.as_matrix() + jnp.diag(lx.diagonal(layerwise))
error = jax.flatten_util.ravel_pytree(x)[0] - jnp.linalg.solve(dense, flat_b)
print("tempered, layerwise:", float(jnp.max(jnp.abs(error))))


# %% [markdown]
# ## `linearise`: the primal work once per solve
#
# `lx.linearise(op)` (which `lx.CG` calls once per solve) does the forward pass and
# the output factors once; its `mv`s are then a linear `jvp` and a `vjp`.


# %%
def best_of(fn, *args, repeats=3):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


big_inputs = jax.random.normal(key_x, (2048, 5))
big_labels = jax.random.randint(key_y, (2048,), 0, 3)
big = fisherops.GGNOperator(mlp, params, (big_inputs, big_labels), "cross_entropy")
plain_mv = eqx.filter_jit(lambda op, v: op.mv(v))
linearised = lx.linearise(big)
print(f"mv:            {1e3 * best_of(plain_mv, big, v):.2f} ms")
print(f"linearised mv: {1e3 * best_of(plain_mv, linearised, v):.2f} ms")
same = jnp.allclose(
    jax.flatten_util.ravel_pytree(big.mv(v))[0],
    jax.flatten_util.ravel_pytree(linearised.mv(v))[0],
)
print("same numbers:", same)


# %% [markdown]
# ## Chunking
#
# `chunk_size=n` evaluates the data `n` points at a time inside a `lax.scan`: memory
# is bounded by the chunk, the matrix is the same (the last chunk is shifted back,
# not padded).


# %%
def max_gap(a, b):
    return float(jnp.max(jnp.abs(a.as_matrix() - b.as_matrix())))


for size in (None, 10):
    chunked = fisherops.GGNOperator(mlp, params, data, "cross_entropy", chunk_size=size)
    print(f"chunk_size={size!s:<5}", max_gap(chunked, ggn))
chunked_mc = fisherops.MCFisherOperator(
    mlp, params, data, "cross_entropy", jax.random.key(1), mc_samples=4, chunk_size=10
)
print("MC, chunked: same samples, same matrix:", max_gap(chunked_mc, mc))

# %% [markdown]
# ## Diagonals and spectra
#
# `lx.diagonal` (and `op.diagonal()`, the same flat `(P,)` vector) is exact (from
# per-datum gradients), not a probe estimate. The
# spectra show how the three curvatures differ: the MC Fisher estimates the GGN, the
# empirical Fisher is a different matrix.

# %%
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
figure.tight_layout()

# %% [markdown]
# ## The laplax functional API
#
# `create_empirical_fisher_mv` and friends return the operator's `mv`, with the same
# signatures as `laplax.curv.fisher`.

# %%
ef_mv = fisherops.create_empirical_fisher_mv(mlp, params, data, "cross_entropy")
mc_mv = fisherops.create_MC_fisher_mv(
    mlp, params, data, "cross_entropy", jax.random.key(1), mc_samples=4
)
same = jax.tree.map(jnp.allclose, (ef_mv(v), mc_mv(v)), (ef.mv(v), mc.mv(v)))
print("functional == operator:", all(jax.tree.leaves(same)))
