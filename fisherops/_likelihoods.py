"""Likelihoods: one object per loss, knowing its gradient, sampler and Hessian.

A likelihood `r(y | f) ∝ exp(-c(y, f))` is described by its per-datum loss `c`.
The curvature operators only ever ask a likelihood for the factor `B` of the
datum's output-space matrix `B B^T` (its gradient for the empirical Fisher, its
sampled gradients for the Monte-Carlo Fisher, the square root of its Hessian for
the GGN) or for the Hessian-vector product `H t`, so each loss lives here and
nowhere else.
"""

import abc
import math
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree, Scalar

from . import _linalg


class AbstractLikelihood(eqx.Module):
    """A per-datum likelihood `r(y | f) ∝ exp(-c(y, f))` of a network output `f`.

    Subclass it (or use [`fisherops.Likelihood`][]) to give the curvature
    operators a loss of your own: only `loss` is required, and `sample` for the
    Monte-Carlo Fisher. The other methods have defaults by autodiff of `loss`;
    override them when a closed form is cheaper. All methods act on ONE datum:
    `output` is the network's output `f` for that datum (of shape `(O,)`, or
    structured, e.g. `(T, C)` for a sequence, whose loss sums over the positions)
    and `target` the datum's target. The curvature sees the output flattened to
    `O = prod(shape)` values. Arrays the likelihood depends on (a noise
    scale, say) belong in fields, so that gradients with respect to them flow.
    """

    @abc.abstractmethod
    def loss(self, output: Float[Array, "*O"], target: PyTree) -> Scalar:
        """The loss `c(y, f)` of one datum."""

    def sample(self, key: PRNGKeyArray, output: Float[Array, "*O"]) -> PyTree:
        """One draw `y ~ r(y | f)`, in the target format `output_grad` accepts.

        Needed by the Monte-Carlo Fisher only; by default there is none (see
        [`fisherops.has_sampler`][]).
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no sampler: implement `sample(key, output)`."
        )

    def output_grad(self, output: Float[Array, "*O"], target: PyTree) -> Array:
        """The gradient `g = ∇_f c(y, f)`, shaped like `output` (default: autodiff)."""
        return jax.grad(self.loss)(output, target)

    def hessian_mv(
        self, output: Float[Array, "*O"], target: PyTree, tangent: Float[Array, "*O"]
    ) -> Float[Array, "*O"]:
        """`H t` with `H = ∇²_f c(y, f)`, shaped like `output`.

        Default: the `jvp` of `output_grad`, at the cost of about one gradient.
        """
        _, product = jax.jvp(
            lambda f: self.output_grad(f, target), (output,), (tangent,)
        )
        return product

    def hessian_sqrt(
        self, output: Float[Array, "*O"], target: PyTree
    ) -> Float[Array, "O K"]:
        """A square root `B` of shape `(O, K)` with `B B^T = ∇²_f c(y, f)`.

        `f` is flattened to `(O,)`. Default: the symmetric square root of the
        dense Hessian (`O` Hessian-vector products) by an eigendecomposition, with
        negative eigenvalues set to zero (the GGN keeps the positive part of a
        non-convex loss). Differentiable; unbatched decompositions even under `vmap`.
        """
        size = jnp.size(output)

        def column(tangent):
            tangent = tangent.reshape(jnp.shape(output))
            return self.hessian_mv(output, target, tangent).reshape(-1)

        hessian = jax.vmap(column)(jnp.eye(size, dtype=jnp.result_type(output)))
        return _psd_sqrt((hessian + hessian.T) / 2)

    def hessian_sqrt_blocks(
        self, output: Float[Array, "*O"], target: PyTree
    ) -> Float[Array, "T C K"]:
        """`hessian_sqrt` as blocks over the output's positions: `(T, C, K)` with
        `hessian_sqrt = blockdiag(blocks)`, `T C = O`.

        For a structured output `(..., C)` whose loss is a sum over its positions
        (every built-in likelihood), one `(C, K)` root per position. KFAC
        backpropagates the `K` columns of all positions at once (`K` backward
        passes, not `T K`). Default: one block, `hessian_sqrt(output, target)[None]`.
        """
        return self.hessian_sqrt(output, target)[None]

    def log_normaliser(self, output: Float[Array, "*O"]) -> Scalar:
        """`log Z(f) = log ∫ exp(-c(y, f)) dy`, so that
        `log r(y | f) = -c(y, f) - log Z(f)`.

        The evidence needs it where it depends on what is tuned (a noise scale);
        default 0, i.e. `loss` is the exact negative log-likelihood.
        """
        del output
        return jnp.zeros(())

    def prepare_targets(self, targets: PyTree, outputs: Array) -> PyTree:
        """Check a BATCH of targets against the batch of outputs `(N, *O)`.

        Returns the targets in the form `output_grad` takes (per datum after
        indexing axis 0). Raises a `ValueError` naming `data` when they do not
        fit. Default: the targets as given (the operators have already checked
        that their axis 0 indexes the same `N` data points).
        """
        del outputs
        return targets


# --------------------------------------------------------------------------- #
# The symmetric square root of a PSD matrix, differentiable, never a batched
# LAPACK call (`_linalg.eigh`).
# --------------------------------------------------------------------------- #


@jax.custom_jvp
def _psd_sqrt(matrix: Float[Array, "O O"]) -> Float[Array, "O O"]:
    values, vectors = _linalg.eigh(matrix)
    return (vectors * jnp.sqrt(jnp.maximum(values, 0))) @ vectors.T


@_psd_sqrt.defjvp
def _(primals, tangents):
    (matrix,), (tangent,) = primals, tangents
    values, vectors = _linalg.eigh(matrix)
    roots = jnp.sqrt(jnp.maximum(values, 0))
    # Daleckii-Krein: dS = V (G * V^T dH V) V^T, G the divided differences of
    # sqrt(max(., 0)) at the eigenvalues; 1 / (s_i + s_j) where they coincide, and
    # 0 where both are zero (no gradient into the clipped part).
    gaps = values[:, None] - values[None, :]
    sums = roots[:, None] + roots[None, :]
    tol = 8 * jnp.finfo(values.dtype).eps * jnp.max(jnp.abs(values))
    coincide = jnp.abs(gaps) <= tol
    divided = jnp.where(
        coincide,
        jnp.where(sums > 0, 1 / jnp.where(sums > 0, sums, 1), 0),
        (roots[:, None] - roots[None, :]) / jnp.where(coincide, 1, gaps),
    )
    rotated = vectors.T @ tangent @ vectors
    return (vectors * roots) @ vectors.T, vectors @ (divided * rotated) @ vectors.T


def _positions(values: Array) -> Array:
    """A per-datum array `(..., C)` as `(T, C)`: its positions, each `C` values."""
    return values.reshape(-1, values.shape[-1] if jnp.ndim(values) else 1)


def _diagonal_blocks(diagonals: Float[Array, "T C"]) -> Float[Array, "T C C"]:
    return jax.vmap(jnp.diag)(diagonals)


def _block_diagonal(blocks: Float[Array, "T C K"]) -> Float[Array, "TC TK"]:
    """`blockdiag(blocks[0], ..., blocks[T - 1])`."""
    count, rows, columns = blocks.shape
    if count == 1:
        return blocks[0]
    eye = jnp.eye(count, dtype=blocks.dtype)
    matrix = jnp.einsum("tck,ts->tcsk", blocks, eye)
    return matrix.reshape(count * rows, count * columns)


# --------------------------------------------------------------------------- #
# Target checks shared by the built-in likelihoods.
# --------------------------------------------------------------------------- #


def _concrete(targets) -> np.ndarray | None:
    """`targets` as numpy when their values are known here (not traced), else None."""
    if isinstance(targets, jax.core.Tracer) or (
        isinstance(targets, jax.Array) and not targets.is_fully_addressable
    ):
        return None
    return np.asarray(targets)


def _array_targets(name: str, targets) -> Array:
    if not hasattr(targets, "shape"):
        raise TypeError(
            f"loss {name!r} needs data target as an array; got "
            f"{type(targets).__name__}."
        )
    return targets


def _real_targets(name: str, targets, outputs, expected: str) -> Array:
    """Targets of the outputs' shape (`(N,)` also for outputs `(N, 1)`), as floats.

    Integer targets are refused when `expected` is floats: they are class labels
    given to a regression loss.
    """
    targets = _array_targets(name, targets)
    floats = expected == "floats"
    allowed = jnp.floating if floats else jnp.number
    if targets.dtype == bool or not jnp.issubdtype(targets.dtype, allowed):
        kind = "bool" if targets.dtype == bool else str(targets.dtype)
        hint = "integer class labels are for 'cross_entropy'; " if floats else ""
        raise ValueError(
            f"loss {name!r} needs data target of {expected} shaped like the outputs "
            f"{outputs.shape}; got {kind} targets ({hint}cast them to float)."
        )
    if targets.shape == outputs.shape:
        return targets.astype(outputs.dtype)
    if (
        outputs.ndim == 2
        and outputs.shape[1] == 1
        and targets.shape == outputs.shape[:1]
    ):
        return targets[:, None].astype(outputs.dtype)
    raise ValueError(
        f"loss {name!r} needs data target of {expected} shaped like the outputs "
        f"{outputs.shape}; got shape {targets.shape}."
    )


def _check_probabilities(name: str, values: np.ndarray | None, what: str, sums: bool):
    if values is None or values.size == 0:
        return
    values = values.astype(np.float64)
    if not np.all((values >= 0) & (values <= 1)):
        raise ValueError(
            f"loss {name!r} needs data target {what} in [0, 1]; got values in "
            f"[{values.min():.4g}, {values.max():.4g}]."
        )
    if sums:
        total = values.sum(-1)
        worst = float(np.max(np.abs(total - 1)))
        if worst > 1e-3:
            raise ValueError(
                f"loss {name!r} needs data target {what} that sum to 1 over the "
                f"classes (axis -1); got sums up to {worst:.3g} away from 1."
            )


class MSE(AbstractLikelihood):
    r"""Squared error `c = Σ_o (f_o - y_o)²` (no 1/2), `r(y | f) = N(f, I/2)`.

    `g = 2 (f - y)`, `H = 2 I`. The string `"mse"` is a shortcut for `MSE()`. For
    a Gaussian with a noise scale of your choice, use [`fisherops.Gaussian`][].
    Targets: floats shaped like the outputs (for outputs `(N, 1)` also `(N,)`).
    """

    def loss(self, output, target):
        return jnp.sum((output - target) ** 2)

    def sample(self, key, output):
        noise = jax.random.normal(key, jnp.shape(output), output.dtype)
        return output + noise * jnp.sqrt(jnp.asarray(0.5, output.dtype))

    def output_grad(self, output, target):
        return 2 * (output - target)

    def hessian_mv(self, output, target, tangent):
        return 2 * tangent

    def hessian_sqrt(self, output, target):
        eye = jnp.eye(jnp.size(output), dtype=output.dtype)
        return jnp.sqrt(jnp.asarray(2.0, output.dtype)) * eye

    def hessian_sqrt_blocks(self, output, target):
        roots = jnp.full_like(output, math.sqrt(2.0))
        return _diagonal_blocks(_positions(roots))

    def log_normaliser(self, output):
        return jnp.size(output) * jnp.log(jnp.asarray(math.pi, output.dtype)) / 2

    def prepare_targets(self, targets, outputs):
        return _real_targets("mse", targets, outputs, "floats")


class Gaussian(AbstractLikelihood):
    r"""Gaussian noise of scale `sigma`: `c = Σ_o (f_o - y_o)² / (2 σ²)`,
    `r(y | f) = N(f, σ² I)`.

    `g = (f - y) / σ²`, `H = I / σ²`.

    **Arguments:**

    - `sigma`: the noise standard deviation, a positive scalar or an array
      broadcastable to one datum's output. It is an array field, so gradients
      with respect to it (e.g. through `lineax.linear_solve`) are exact.
    """

    sigma: Float[Array, "..."]

    def __init__(self, sigma: Float[ArrayLike, "..."]):
        sigma = jnp.asarray(sigma)
        floating = jnp.issubdtype(sigma.dtype, jnp.floating)
        sigma = sigma.astype(sigma.dtype if floating else float)  # strong dtype
        values = _concrete(sigma)
        if values is not None and not np.all(values > 0):
            raise ValueError(f"sigma must be positive; got {values}.")
        self.sigma = sigma

    def _precision(self, output):
        return jnp.broadcast_to(self.sigma.astype(output.dtype) ** -2, output.shape)

    def loss(self, output, target):
        return jnp.sum((output - target) ** 2 * self._precision(output)) / 2

    def sample(self, key, output):
        noise = jax.random.normal(key, jnp.shape(output), output.dtype)
        return output + noise * self.sigma.astype(output.dtype)

    def output_grad(self, output, target):
        return (output - target) * self._precision(output)

    def hessian_mv(self, output, target, tangent):
        return tangent * self._precision(output)

    def hessian_sqrt(self, output, target):
        return jnp.diag(jnp.sqrt(self._precision(output)).reshape(-1))

    def hessian_sqrt_blocks(self, output, target):
        return _diagonal_blocks(_positions(jnp.sqrt(self._precision(output))))

    def log_normaliser(self, output):
        return jnp.sum(jnp.log(2 * math.pi / self._precision(output))) / 2

    def prepare_targets(self, targets, outputs):
        return _real_targets("Gaussian", targets, outputs, "floats")


Parametrisation = Literal["log_variance", "natural"]


class HeteroscedasticGaussian(AbstractLikelihood):
    r"""Gaussian noise whose variance the network predicts: `r(y | f) = N(μ, σ²)`.

    The network's output for one datum is `(..., 2)`: the last axis holds two
    numbers per target (the leading axes, if any, index several targets of the
    datum, e.g. outputs `(O, 2)` for `O` targets). A network with a flat `(2 O,)`
    head returns `f.reshape(O, 2)`. Targets are floats of the output's shape
    without the last axis (for outputs `(N, 2)` also `(N, 1)`).

    `parametrisation="log_variance"` (default): `f = (μ, s)`, `σ² = e^s`,

    $$c = rac{(y - μ)^2}{2 e^{s}} + rac{s}{2}, \qquad
    g = \Big((μ - y) e^{-s},\; 	frac12 - 	frac{(y - μ)^2}{2 e^{s}}\Big).$$

    The loss's Hessian in `(μ, s)` is not positive semi-definite; the curvature
    uses the Fisher of `N(μ, e^s)` instead, `diag(e^{-s}, 1/2)` (its square root
    `diag(e^{-s/2}, 1/√2)`), which is the expected Hessian: the GGN is the exact
    Fisher and the Monte-Carlo Fisher, with draws `y ~ N(μ, e^s)`, estimates it.

    `parametrisation="natural"` (Immer et al. 2023): `f = (η₁, η₂)` with
    `η₁ = μ / σ²`, `η₂ = -1 / (2σ²) < 0` (end the network with a link such as
    `η₂ = -softplus(·)` or `-exp(·) / 2`),

    $$c = -η_1 y - η_2 y^2 - rac{η_1^2}{4 η_2} - 	frac12 \log(-2 η_2),
    \qquad g = (μ - y,\; μ^2 + σ^2 - y^2).$$

    The loss is convex in `η` and its Hessian, the covariance of `(y, y²)`,
    `[[σ², 2μσ²], [2μσ², 2σ⁴ + 4μ²σ²]]`, is the Fisher: the GGN is the loss's own
    Hessian (square root `[[σ, 0], [2μσ, √2 σ²]]`).

    Both leave out the constant `log √(2π)` per target (see `log_normaliser`).
    The linearised predictive (`LaplacePosterior.predictive(...,
    approximation="none")`) gives the mean and epistemic variance of both
    outputs.

    **Arguments:**

    - `parametrisation`: `"log_variance"` or `"natural"`.
    """

    parametrisation: str = eqx.field(static=True)

    def __init__(self, parametrisation: Parametrisation = "log_variance"):
        if parametrisation not in ("log_variance", "natural"):
            raise ValueError(
                "parametrisation must be 'log_variance' or 'natural'; got "
                f"{parametrisation!r}."
            )
        self.parametrisation = parametrisation

    def mean_variance(
        self, output: Float[Array, "*M 2"]
    ) -> tuple[Float[Array, "*M"], Float[Array, "*M"]]:
        """`(μ, σ²)` of `r(y | f)`, each shaped like `output` without its last axis."""
        first, second = output[..., 0], output[..., 1]
        if self.parametrisation == "log_variance":
            return first, jnp.exp(second)
        variance = -0.5 / second
        return first * variance, variance

    def loss(self, output, target):
        first, second = output[..., 0], output[..., 1]
        if self.parametrisation == "log_variance":
            return jnp.sum((target - first) ** 2 * jnp.exp(-second) + second) / 2
        return jnp.sum(
            -first * target
            - second * target**2
            - first**2 / (4 * second)
            - jnp.log(-2 * second) / 2
        )

    def sample(self, key, output):
        mean, variance = self.mean_variance(output)
        noise = jax.random.normal(key, mean.shape, output.dtype)
        return mean + noise * jnp.sqrt(variance)

    def output_grad(self, output, target):
        mean, variance = self.mean_variance(output)
        residual = mean - target
        if self.parametrisation == "log_variance":
            return jnp.stack(
                [residual / variance, (1 - residual**2 / variance) / 2], -1
            )
        return jnp.stack([residual, mean**2 + variance - target**2], -1)

    def _fisher_sqrt(self, output) -> Float[Array, "*M 2 2"]:
        """The square root `L` (`L Lᵀ` the Fisher) of each target's `2 x 2` block."""
        mean, variance = self.mean_variance(output)
        std = jnp.sqrt(variance)
        zero = jnp.zeros_like(mean)
        if self.parametrisation == "log_variance":
            half = jnp.full_like(mean, math.sqrt(0.5))
            rows = [[1 / std, zero], [zero, half]]
        else:
            rows = [[std, zero], [2 * mean * std, math.sqrt(2) * variance]]
        return jnp.stack([jnp.stack(row, -1) for row in rows], -2)

    def hessian_mv(self, output, target, tangent):
        """`F t` with `F` the Fisher (the natural parametrisation's Hessian)."""
        root = self._fisher_sqrt(output)
        return jnp.einsum("...ij,...kj,...k->...i", root, root, tangent)

    def hessian_sqrt(self, output, target):
        """The block-diagonal `(2 M, 2 M)` square root of the Fisher, `M` targets."""
        return _block_diagonal(self.hessian_sqrt_blocks(output, target))

    def hessian_sqrt_blocks(self, output, target):
        return self._fisher_sqrt(output).reshape(-1, 2, 2)

    def log_normaliser(self, output):
        count = jnp.size(output) // 2
        return count * jnp.log(jnp.asarray(2 * math.pi, output.dtype)) / 2

    def prepare_targets(self, targets, outputs):
        name = "HeteroscedasticGaussian"
        if outputs.ndim < 2 or outputs.shape[-1] != 2:
            raise ValueError(
                f"likelihood {name} needs model_fn to return (..., 2) per datum (the "
                "two parameters of each target's Gaussian on the last axis; reshape "
                f"a flat (2 O,) head to (O, 2)); got outputs {outputs.shape}."
            )
        shape = outputs.shape[:-1]
        targets = _array_targets(name, targets)
        if len(shape) == 1 and targets.shape == (*shape, 1):
            targets = targets[:, 0]
        return _real_targets(
            name, targets, jax.ShapeDtypeStruct(shape, outputs.dtype), "floats"
        )


class CrossEntropy(AbstractLikelihood):
    r"""Softmax cross-entropy `c = -Σ_c y_c log softmax(f)_c`,
    `r(y | f) = Categorical(softmax(f))`.

    `g = p - y` with `p = softmax(f)`, `H = diag(p) - p pᵀ` (the product `H t` in
    O(C), its square root `diag(√p) - p √pᵀ` in O(C²)). The string
    `"cross_entropy"` is a shortcut for `CrossEntropy()`.

    The network gives logits `(C,)` per datum, or `(..., C)` for structured
    outputs (a sequence's `(T, C)` next-token logits, an image's `(H, W, C)`
    per-pixel logits): the classes are the last axis, and the datum's loss is the
    SUM over the other axes (its positions), with one categorical per position.
    Its Hessian is then block-diagonal over the positions and its square root the
    block-diagonal `(O, O)` matrix of the per-position roots (`O = T C`).

    Targets are integer class labels in `[0, C)` shaped like the outputs without
    their class axis (a batch `(N, ...)`; for logits `(C,)` also `(N, 1)`), or
    probability / one-hot vectors shaped like the outputs, summing to 1 over the
    classes. Labels and probabilities are checked when the operator is built
    eagerly; under `jit` they cannot be, and a label outside `[0, C)` then counts
    as a target of all zeros (`g = p`).
    """

    def loss(self, output, target):
        logp = jax.nn.log_softmax(output)
        if _is_label(target, output):
            picked = jnp.take_along_axis(logp, target[..., None], axis=-1)
            return -jnp.sum(picked)
        return -jnp.sum(target * logp)

    def sample(self, key, output):
        # Inverse CDF: one uniform per position, where `jax.random.categorical` (the
        # Gumbel trick) draws one per class. The clamp to `C - 1` covers a float
        # CDF that ends just below 1.
        cdf = jnp.cumsum(jax.nn.softmax(output), axis=-1)
        uniform = jax.random.uniform(key, output.shape[:-1], cdf.dtype)
        draw = jnp.sum(cdf <= uniform[..., None], axis=-1)
        return jnp.minimum(draw, output.shape[-1] - 1)

    def output_grad(self, output, target):
        probs = jax.nn.softmax(output)
        if _is_label(target, output):
            return probs - jax.nn.one_hot(target, output.shape[-1], dtype=output.dtype)
        return probs - target

    def hessian_mv(self, output, target, tangent):
        probs = jax.nn.softmax(output)
        return probs * tangent - probs * jnp.sum(probs * tangent, -1, keepdims=True)

    def hessian_sqrt(self, output, target):
        return _block_diagonal(self.hessian_sqrt_blocks(output, target))

    def hessian_sqrt_blocks(self, output, target):
        probs = _positions(jax.nn.softmax(output))  # (T, C)
        sqrt_probs = jnp.sqrt(probs)
        return _diagonal_blocks(sqrt_probs) - probs[:, :, None] * sqrt_probs[:, None, :]

    def prepare_targets(self, targets, outputs):
        name = "cross_entropy"
        targets = _array_targets(name, targets)
        if outputs.ndim < 2:
            raise ValueError(
                f"loss {name!r} needs model_fn to return logits of shape (C,) or "
                f"(..., C) per datum (the classes last); got outputs "
                f"{outputs.shape}, i.e. a scalar per datum; for one binary logit "
                "use 'binary_cross_entropy', or return C >= 2 logits."
            )
        num_classes = outputs.shape[-1]
        positions = outputs.shape[:-1]  # (N, ...)
        trailing_one = (*positions, 1)
        expected = (
            f"data target as integer class labels in [0, {num_classes}) of shape "
            f"{positions}"
            + (f" or {trailing_one}" if outputs.ndim == 2 else "")
            + f", or probability vectors of shape {outputs.shape}"
        )
        if targets.dtype == bool:
            raise ValueError(
                f"loss {name!r} needs {expected}; got bool targets of shape "
                f"{targets.shape} (cast class labels to int)."
            )
        integer = jnp.issubdtype(targets.dtype, jnp.integer)
        if (
            integer
            and outputs.ndim == 2
            and targets.shape == trailing_one
            and num_classes != 1
        ):
            targets = targets[:, 0]
        if integer and targets.shape == positions:
            labels = _concrete(targets)
            if (
                labels is not None
                and labels.size
                and (labels.min() < 0 or labels.max() >= num_classes)
            ):
                raise ValueError(
                    f"loss {name!r} needs {expected}; got labels in "
                    f"[{labels.min()}, {labels.max()}] (0-based labels, please)."
                )
            return targets
        if targets.shape != outputs.shape:
            raise ValueError(
                f"loss {name!r} needs {expected}; got {targets.dtype} targets of "
                f"shape {targets.shape}"
                + (
                    " (cast class labels to int)."
                    if targets.shape in (positions, trailing_one) and not integer
                    else "."
                )
            )
        _check_probabilities(name, _concrete(targets), "probabilities", sums=True)
        return targets.astype(outputs.dtype)


def _is_label(target, output) -> bool:
    """Whether `target` holds class labels (integers, no class axis) for `output`."""
    return (
        jnp.issubdtype(jnp.result_type(target), jnp.integer)
        and jnp.ndim(target) == jnp.ndim(output) - 1
    )


class BinaryCrossEntropy(AbstractLikelihood):
    r"""Sigmoid cross-entropy `c = Σ_o BCE(sigmoid(f_o), y_o)`,
    `r(y | f) = Bernoulli(sigmoid(f))`.

    `g = p - y` with `p = sigmoid(f)`, `H = diag(p (1 - p))`. The string
    `"binary_cross_entropy"` is a shortcut for `BinaryCrossEntropy()`. Targets are
    in `[0, 1]` (labels `{0, 1}` or probabilities), shaped like the outputs;
    checked when the operator is built eagerly.
    """

    def loss(self, output, target):
        return jnp.sum(
            -target * jax.nn.log_sigmoid(output)
            - (1 - target) * jax.nn.log_sigmoid(-output)
        )

    def sample(self, key, output):
        draw = jax.random.bernoulli(key, jax.nn.sigmoid(output))
        return draw.astype(output.dtype)

    def output_grad(self, output, target):
        return jax.nn.sigmoid(output) - target

    def hessian_mv(self, output, target, tangent):
        probs = jax.nn.sigmoid(output)
        return probs * (1 - probs) * tangent

    def hessian_sqrt(self, output, target):
        probs = jax.nn.sigmoid(output).reshape(-1)
        return jnp.diag(jnp.sqrt(probs * (1 - probs)))

    def hessian_sqrt_blocks(self, output, target):
        probs = _positions(jax.nn.sigmoid(output))
        return _diagonal_blocks(jnp.sqrt(probs * (1 - probs)))

    def prepare_targets(self, targets, outputs):
        name = "binary_cross_entropy"
        targets = _array_targets(name, targets)
        if targets.dtype == bool:
            targets = targets.astype(outputs.dtype)
        targets = _real_targets(name, targets, outputs, "labels in [0, 1]")
        _check_probabilities(name, _concrete(targets), "labels", sums=False)
        return targets


class Likelihood(AbstractLikelihood):
    """A likelihood built from plain per-datum functions.

    ```python
    def loss(output, target):          # c(y, f), one datum
        return jnp.sum(jnp.abs(output - target))

    def sample(key, output):           # y ~ r(y | f) ∝ exp(-c(y, f))
        return output + jax.random.laplace(key, output.shape)

    likelihood = fisherops.Likelihood(loss, sample=sample)
    fisher = fisherops.MCFisherOperator(model_fn, params, data, likelihood, key)
    ```

    The functions may close over traced arrays (e.g. a noise scale you
    differentiate with respect to): the operators closure-convert them when they
    do, so gradients flow. Subclassing [`fisherops.AbstractLikelihood`][] with
    the array as a field (see [`fisherops.Gaussian`][]) avoids that conversion.

    **Arguments:**

    - `loss`: `loss(output, target) -> scalar` for one datum.
    - `sample`: `sample(key, output) -> target`, a draw from `r(y | f)`; needed by
      the Monte-Carlo Fisher.
    - `output_grad`: `output_grad(output, target) -> ∇_f c`; autodiff of `loss`
      when not given.
    - `hessian_sqrt`: `hessian_sqrt(output, target) -> B` of shape `(O, K)` with
      `B B^T = ∇²_f c`; from the dense Hessian of `loss` when not given (see
      [`fisherops.AbstractLikelihood.hessian_sqrt`][]).
    """

    loss_fn: Callable[[Array, Any], Scalar]
    sample_fn: Callable[[PRNGKeyArray, Array], Any] | None
    output_grad_fn: Callable[[Array, Any], Array] | None
    hessian_sqrt_fn: Callable[[Array, Any], Array] | None

    def __init__(
        self,
        loss: Callable[[Array, Any], Scalar],
        sample: Callable[[PRNGKeyArray, Array], Any] | None = None,
        *,
        output_grad: Callable[[Array, Any], Array] | None = None,
        hessian_sqrt: Callable[[Array, Any], Array] | None = None,
    ):
        for name, fn in (
            ("loss", loss),
            ("sample", sample),
            ("output_grad", output_grad),
            ("hessian_sqrt", hessian_sqrt),
        ):
            if not (callable(fn) or (fn is None and name != "loss")):
                raise TypeError(f"{name} must be a callable; got {type(fn).__name__}.")
        self.loss_fn = loss
        self.sample_fn = sample
        self.output_grad_fn = output_grad
        self.hessian_sqrt_fn = hessian_sqrt

    def loss(self, output, target):
        return self.loss_fn(output, target)

    def sample(self, key, output):
        if self.sample_fn is None:
            raise ValueError(
                "this likelihood has no sampler: pass `sample=` to "
                "`fisherops.Likelihood`."
            )
        return self.sample_fn(key, output)

    def output_grad(self, output, target):
        if self.output_grad_fn is None:
            return super().output_grad(output, target)
        return self.output_grad_fn(output, target)

    def hessian_sqrt(self, output, target):
        if self.hessian_sqrt_fn is None:
            return super().hessian_sqrt(output, target)
        return self.hessian_sqrt_fn(output, target)


_BUILT_IN = {
    "mse": MSE,
    "cross_entropy": CrossEntropy,
    "binary_cross_entropy": BinaryCrossEntropy,
}


def as_likelihood(
    loss_fn: "str | AbstractLikelihood | Callable | None",
) -> AbstractLikelihood | None:
    """Turn the `loss_fn` argument of the public API into a likelihood."""
    if loss_fn is None or isinstance(loss_fn, AbstractLikelihood):
        return loss_fn
    if isinstance(loss_fn, str):
        try:
            return _BUILT_IN[loss_fn]()
        except KeyError:
            raise ValueError(
                f"unknown loss_fn {loss_fn!r}; expected one of "
                f"{sorted(_BUILT_IN)}, a callable `loss(output, target)` or a "
                "`fisherops.AbstractLikelihood`."
            ) from None
    if callable(loss_fn):
        return Likelihood(loss_fn)
    raise TypeError(
        "loss_fn must be a loss name, a callable `loss(output, target)` or a "
        f"`fisherops.AbstractLikelihood`; got {type(loss_fn).__name__}."
    )


def has_sampler(likelihood: AbstractLikelihood) -> bool:
    """Whether `likelihood.sample` draws targets (the Monte-Carlo Fisher needs it)."""
    if isinstance(likelihood, Likelihood):
        return likelihood.sample_fn is not None
    return type(likelihood).sample is not AbstractLikelihood.sample


def closure_converted(fn: Callable, *example_args) -> Callable:
    """`fn`, closure-converted if it closes over traced arrays (else `fn` itself).

    A callable field that closes over a tracer hides it from `jit`, `grad` and
    lineax's solvers (a silent zero gradient). Converted, the tracers become
    pytree leaves of the returned function. Untraced functions are returned as
    they are, so a new operator around them reuses earlier compilations.
    """
    converted = eqx.filter_closure_convert(fn, *example_args)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jtu.tree_leaves(converted)):
        return converted
    return fn


def with_traced_closures(
    likelihood: AbstractLikelihood, output, target, key=None
) -> AbstractLikelihood:
    """`likelihood`, its functions closure-converted where they close over tracers.

    `output`, `target` (and `key`, for the sampler) are one datum's, as arrays or
    `jax.ShapeDtypeStruct`s.
    """
    if not isinstance(likelihood, Likelihood):
        return likelihood
    if key is not None and likelihood.sample_fn is not None:
        # The Monte-Carlo Fisher calls the loss on its draws, not on the data.
        target = jax.eval_shape(likelihood.sample_fn, key, output)
    examples = {
        "loss_fn": (output, target),
        "output_grad_fn": (output, target),
        "hessian_sqrt_fn": (output, target),
        "sample_fn": None if key is None else (key, output),
    }
    for name, args in examples.items():
        fn = getattr(likelihood, name)
        if fn is None or args is None:
            continue
        converted = closure_converted(fn, *args)
        if converted is not fn:
            likelihood = eqx.tree_at(
                lambda lik, name=name: getattr(lik, name), likelihood, converted
            )
    return likelihood


def log_likelihood(
    likelihood: AbstractLikelihood, outputs: Float[Array, "N ..."], targets: PyTree
) -> Scalar:
    """`Σ_n log r(y_n | f_n) = -Σ_n (c(y_n, f_n) + log Z(f_n))` over a batch."""
    targets = likelihood.prepare_targets(targets, outputs)

    def one(output, target):
        return likelihood.loss(output, target) + likelihood.log_normaliser(output)

    return -jnp.sum(jax.vmap(one)(outputs, targets))
