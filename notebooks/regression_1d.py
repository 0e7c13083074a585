# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 1-D regression with a gap: Laplace predictive bands from EF, MC and GGN
#
# A small MLP fits noisy samples of `sin(2x)` observed on `[-3, -1] ∪ [1, 3]`; there
# is no data in between. The MAP fit alone says nothing about where it is unsure.
# The Laplace approximation `N(θ*, (C + λI)^{-1})` with `C` the curvature of the
# training loss gives a predictive band through the linearised network, and the band
# should open up in the gap and outside the data. We compare three curvatures:
#
# - the **empirical Fisher** (EF), from the gradients at the observed targets;
# - the **Monte-Carlo Fisher** (MC), from gradients at targets sampled from the model;
# - the **generalised Gauss-Newton** (GGN), the exact Fisher the MC estimates.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import fisherops

jax.config.update("jax_enable_x64", True)  # float64: exact comparisons below
plt.rcParams["figure.dpi"] = 70

# %% [markdown]
# ## Data and MAP fit
#
# Observation noise `σ = 0.1`. The negative log joint is
# `Σ_n (f_n - y_n)^2 / (2σ^2) + λ/2 |θ|^2`, minimised with `optax.adam`.

# %%
rng = np.random.default_rng(0)
x = np.concatenate([rng.uniform(-3, -1, 40), rng.uniform(1, 3, 40)])
noise = 0.1
y = np.sin(2 * x) + noise * rng.normal(size=x.shape)
inputs, targets = jnp.asarray(x[:, None]), jnp.asarray(y[:, None])


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


prior_precision = 1.0


def neg_log_joint(params):
    f = jax.vmap(mlp, in_axes=(0, None))(inputs, params)
    squares = sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(params))
    data_term = jnp.sum((f - targets) ** 2) / (2 * noise**2)
    return data_term + 0.5 * prior_precision * squares


@jax.jit
def train(params, num_steps=3000):
    optimizer = optax.adam(1e-2)

    def step(state, _):
        params, opt_state = state
        updates, opt_state = optimizer.update(
            jax.grad(neg_log_joint)(params), opt_state
        )
        return (optax.apply_updates(params, updates), opt_state), None

    state = (params, optimizer.init(params))
    (params, _), _ = jax.lax.scan(step, state, length=num_steps)
    return params


params = train(init_mlp(jax.random.key(0), (1, 16, 16, 1)))
num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
print(f"{num_params} params, negative log joint {float(neg_log_joint(params)):.2f}")

# %% [markdown]
# ## The likelihood, and the MSE convention
#
# Our likelihood is `y ~ N(f, σ^2)`, whose negative log is
# `Σ_o (f_o - y_o)^2 / (2σ^2)` plus a constant: `fisherops.Gaussian(σ)`, which
# knows its sampler (for the MC Fisher) and its output Hessian `I / σ^2` (for the
# GGN).

# %%
gaussian = fisherops.Gaussian(noise)
data = (inputs, targets)
curvatures = {
    "empirical Fisher": fisherops.EmpiricalFisherOperator(mlp, params, data, gaussian),
    "MC Fisher (10 samples)": fisherops.MCFisherOperator(
        mlp, params, data, gaussian, jax.random.key(1), mc_samples=10
    ),
    "GGN": fisherops.GGNOperator(mlp, params, data, gaussian),
}

# %% [markdown]
# fisherops' built-in `"mse"` is `c = Σ_o (f_o - y_o)^2` with **no** 1/2: Hessian
# `2I`, likelihood `N(f, I/2)`. Our loss is `c / (2σ^2)`, so the same matrices come
# from `"mse"` through `fisherops.scale`, with a factor that depends on the matrix:
# the GGN is linear in the loss (`1 / (2σ^2)`), the empirical Fisher, a product of
# two gradients, is quadratic (`1 / (4σ^4)`).


# %%
def gap(a, b):
    a, b = a.as_matrix(), b.as_matrix()
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


mse_ggn = fisherops.GGNOperator(mlp, params, data, "mse")
mse_ef = fisherops.EmpiricalFisherOperator(mlp, params, data, "mse")
print(
    "GGN: scale(mse, 1/(2σ²)) vs Gaussian(σ), relative gap",
    gap(fisherops.scale(mse_ggn, 1 / (2 * noise**2)), curvatures["GGN"]),
)
print(
    "EF:  scale(mse, 1/(4σ⁴)) vs Gaussian(σ), relative gap",
    gap(fisherops.scale(mse_ef, 1 / (4 * noise**4)), curvatures["empirical Fisher"]),
)

# %% [markdown]
# ## Evidence-tuned prior and the linearised predictive
#
# The prior precision is chosen by maximising the Laplace evidence
# `log p(D | θ*) + log N(θ*; 0, λ^{-1} I) - ½ log det((C + λI) / 2π)`, from one
# eigendecomposition of `C`; the predictive is the network linearised at `θ*`
# under `N(θ*, (C + λI)^{-1})`: its mean and variance
# (`approximation="none"`).

# %%
f_train = jax.vmap(mlp, in_axes=(0, None))(inputs, params)
log_likelihood = jnp.sum(
    -0.5 * ((f_train - targets) / noise) ** 2 - 0.5 * jnp.log(2 * jnp.pi * noise**2)
)

grid = jnp.linspace(-4.5, 4.5, 181)[:, None]
bands = {}
for name, curvature in curvatures.items():
    result = fisherops.optimize_prior_precision(
        curvature, log_likelihood=log_likelihood
    )
    posterior = fisherops.LaplacePosterior(curvature, result.prior_precision)
    mean, variance = posterior.predictive(grid, approximation="none")
    bands[name] = (mean[:, 0], jnp.sqrt(variance[:, 0] + noise**2))
    print(
        f"{name:<24} λ = {float(result.prior_precision.diagonal()[0]):6.3f}, "
        f"log evidence {float(result.objective):8.2f}"
    )

# %% [markdown]
# ## Predictive bands
#
# Mean ± 2 standard deviations of `f(x) + noise`, with `f` the linearised network
# under the Laplace posterior.

# %%
figure, axes = plt.subplots(1, 3, figsize=(12, 3.4), sharey=True)
for ax, (name, (mean, std)) in zip(axes, bands.items(), strict=True):
    lower, upper = mean - 2 * std, mean + 2 * std
    ax.fill_between(grid[:, 0], lower, upper, alpha=0.3, label="± 2 std")
    ax.plot(grid[:, 0], mean, label="MAP")
    ax.plot(x, y, "k.", ms=3, label="data")
    ax.set(title=name, xlabel="x", ylim=(-3, 3))
axes[0].legend(loc="lower left", fontsize=8)
figure.tight_layout()

# %% [markdown]
# All three open up in the gap and away from the data. The GGN is the exact Fisher
# of this likelihood, and the Monte-Carlo Fisher estimates it; the empirical Fisher
# replaces the model's noise by the observed residuals `f_n - y_n`, a different
# matrix, and its band differs accordingly.
