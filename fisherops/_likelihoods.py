"""Likelihoods: one object per loss, knowing its gradient, sampler and Hessian.

A likelihood `r(y | f) ∝ exp(-c(y, f))` is described by its per-datum loss `c`.
The curvature operators only ever ask a likelihood for the factor `B` of the
datum's output-space matrix `B B^T` (its gradient for the empirical Fisher, its
sampled gradients for the Monte-Carlo Fisher, the square root of its Hessian for
the GGN), so each loss lives here and nowhere else.
"""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Scalar


class AbstractLikelihood(eqx.Module):
    """A per-datum likelihood `r(y | f) ∝ exp(-c(y, f))` of a network output `f`.

    Subclass it (or use [`fisherops.Likelihood`][]) to give the curvature
    operators a loss of your own. All methods act on ONE datum: `output` is the
    network's output `f` for that datum (usually of shape `(O,)`) and `target`
    the datum's target.
    """

    @abc.abstractmethod
    def loss(self, output: Float[Array, "*O"], target: PyTree) -> Scalar:
        """The loss `c(y, f)` of one datum."""

    @abc.abstractmethod
    def output_grad(self, output: Float[Array, "*O"], target: PyTree) -> Array:
        """The gradient `g = ∇_f c(y, f)`, shaped like `output`."""

    @abc.abstractmethod
    def sample(self, key: PRNGKeyArray, output: Float[Array, "*O"]) -> PyTree:
        """One draw `y ~ r(y | f)`, in the target format `output_grad` accepts."""

    @abc.abstractmethod
    def hessian_factor(self, output: Float[Array, "*O"]) -> Float[Array, "O K"]:
        """A factor `B` of shape `(O, K)` with `B B^T = ∇²_f c(y, f)` (flattened `f`).

        For the built-in likelihoods the Hessian does not depend on `y`, and it
        equals the Fisher `E_{y~r}[g g^T]`.
        """

    @abc.abstractmethod
    def prepare_targets(self, targets: PyTree, outputs: Array) -> PyTree:
        """Check a BATCH of targets against the batch of outputs `(N, *O)`.

        Returns the targets in the form `output_grad` takes (per datum after
        indexing axis 0). Raises a `ValueError` naming `data` when they do not fit.
        """


def _check_batch_target(name: str, targets, outputs) -> Array:
    """The batch of targets, if it is an array (a built-in loss needs one)."""
    del outputs
    if not hasattr(targets, "shape"):
        raise TypeError(
            f"loss {name!r} needs an array target; got a {type(targets).__name__}."
        )
    return targets


class _MSE(AbstractLikelihood):
    """`c = sum_o (f_o - y_o)^2` (no 1/2), `r = N(f, I/2)`."""

    def loss(self, output, target):
        return jnp.sum((output - target) ** 2)

    def output_grad(self, output, target):
        return 2 * (output - target)

    def sample(self, key, output):
        noise = jax.random.normal(key, output.shape, output.dtype)
        return output + noise * jnp.sqrt(jnp.asarray(0.5, output.dtype))

    def hessian_factor(self, output):
        size = output.size
        return jnp.sqrt(jnp.asarray(2.0, output.dtype)) * jnp.eye(
            size, dtype=output.dtype
        )

    def prepare_targets(self, targets, outputs):
        targets = _check_batch_target("mse", targets, outputs)
        if not jnp.issubdtype(targets.dtype, jnp.floating):
            raise ValueError(
                "loss 'mse' needs floating targets shaped like the outputs "
                f"{outputs.shape}; got data target of dtype {targets.dtype} and "
                f"shape {targets.shape} (integer class labels are for "
                "'cross_entropy')."
            )
        return _vector_targets("mse", targets, outputs)


def _vector_targets(name: str, targets, outputs):
    if targets.shape == outputs.shape:
        return targets.astype(outputs.dtype)
    if (
        outputs.ndim == 2
        and outputs.shape[1] == 1
        and targets.shape == outputs.shape[:1]
    ):
        return targets[:, None].astype(outputs.dtype)
    raise ValueError(
        f"loss {name!r} needs data target of the outputs' shape {outputs.shape}; "
        f"got shape {targets.shape}."
    )


class _CrossEntropy(AbstractLikelihood):
    """`c = -sum_c y_c log softmax(f)_c`, `r = Categorical(softmax(f))`.

    Targets are integer class labels (per datum `()` or `(1,)`) or probability /
    one-hot vectors `(C,)`.
    """

    def loss(self, output, target):
        logp = jax.nn.log_softmax(output)
        if (
            jnp.issubdtype(jnp.asarray(target).dtype, jnp.integer)
            and jnp.ndim(target) == 0
        ):
            return -logp[target]
        return -jnp.sum(target * logp)

    def output_grad(self, output, target):
        probs = jax.nn.softmax(output)
        if (
            jnp.issubdtype(jnp.asarray(target).dtype, jnp.integer)
            and jnp.ndim(target) == 0
        ):
            return probs - jax.nn.one_hot(target, output.shape[-1], dtype=output.dtype)
        return probs - target

    def sample(self, key, output):
        # Inverse CDF: one uniform per draw, where `jax.random.categorical` (the
        # Gumbel trick) draws one per class. The clamp to `C - 1` covers a float
        # CDF that ends just below 1.
        cdf = jnp.cumsum(jax.nn.softmax(output))
        uniform = jax.random.uniform(key, (), cdf.dtype)
        return jnp.minimum(jnp.sum(cdf <= uniform), output.shape[-1] - 1)

    def hessian_factor(self, output):
        probs = jax.nn.softmax(output)
        sqrt_probs = jnp.sqrt(probs)
        return jnp.diag(sqrt_probs) - jnp.outer(probs, sqrt_probs)

    def prepare_targets(self, targets, outputs):
        targets = _check_batch_target("cross_entropy", targets, outputs)
        num_classes = outputs.shape[-1]
        integer = jnp.issubdtype(targets.dtype, jnp.integer)
        if integer and targets.ndim == 1 and outputs.ndim == 2:
            return targets
        if integer and targets.shape == outputs.shape[:1] + (1,) and num_classes != 1:
            return targets[:, 0]
        if targets.shape == outputs.shape:
            return targets.astype(outputs.dtype)
        if not integer and targets.shape[: outputs.ndim - 1] == outputs.shape[:-1]:
            raise ValueError(
                "loss 'cross_entropy' needs data target as integer class labels of "
                f"shape {outputs.shape[:1]} or {outputs.shape[:1] + (1,)}, or "
                f"probability vectors of shape {outputs.shape}; got floating "
                f"labels of shape {targets.shape} (cast class labels to int)."
            )
        raise ValueError(
            "loss 'cross_entropy' needs data target as integer class labels of "
            f"shape {outputs.shape[:1]} or {outputs.shape[:1] + (1,)}, or "
            f"probability vectors of shape {outputs.shape}; got dtype "
            f"{targets.dtype} and shape {targets.shape}."
        )


class _BinaryCrossEntropy(AbstractLikelihood):
    """`c = sum_o BCE(sigmoid(f_o), y_o)`, `r = Bernoulli(sigmoid(f))`."""

    def loss(self, output, target):
        return jnp.sum(
            -target * jax.nn.log_sigmoid(output)
            - (1 - target) * jax.nn.log_sigmoid(-output)
        )

    def output_grad(self, output, target):
        return jax.nn.sigmoid(output) - target

    def sample(self, key, output):
        draw = jax.random.bernoulli(key, jax.nn.sigmoid(output))
        return draw.astype(output.dtype)

    def hessian_factor(self, output):
        probs = jax.nn.sigmoid(output).reshape(-1)
        return jnp.diag(jnp.sqrt(probs * (1 - probs)))

    def prepare_targets(self, targets, outputs):
        targets = _check_batch_target("binary_cross_entropy", targets, outputs)
        return _vector_targets("binary_cross_entropy", targets, outputs)


def _not_given(what: str, argument: str):
    def missing(*args):
        raise ValueError(
            f"this likelihood has no {what}: pass `{argument}=` to "
            "`fisherops.Likelihood`."
        )

    return missing


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

    **Arguments:**

    - `loss`: `loss(output, target) -> scalar` for one datum.
    - `sample`: `sample(key, output) -> target`, a draw from `r(y | f)`; needed by
      the Monte-Carlo Fisher.
    - `output_grad`: `output_grad(output, target) -> ∇_f c`; autodiff of `loss`
      when not given.
    - `hessian_factor`: `hessian_factor(output) -> B` of shape `(O, K)` with
      `B B^T = ∇²_f c`; needed by the GGN.
    """

    loss_fn: Callable[[Array, Any], Scalar]
    sample_fn: Callable[[PRNGKeyArray, Array], Any] | None = None
    output_grad_fn: Callable[[Array, Any], Array] | None = None
    hessian_factor_fn: Callable[[Array], Array] | None = None

    def __init__(
        self,
        loss: Callable[[Array, Any], Scalar],
        sample: Callable[[PRNGKeyArray, Array], Any] | None = None,
        output_grad: Callable[[Array, Any], Array] | None = None,
        hessian_factor: Callable[[Array], Array] | None = None,
    ):
        if not callable(loss):
            raise TypeError(f"`loss` must be callable; got {type(loss).__name__}.")
        self.loss_fn = loss
        self.sample_fn = sample
        self.output_grad_fn = output_grad
        self.hessian_factor_fn = hessian_factor

    def loss(self, output, target):
        return self.loss_fn(output, target)

    def output_grad(self, output, target):
        if self.output_grad_fn is None:
            return jax.grad(self.loss_fn)(output, target)
        return self.output_grad_fn(output, target)

    def sample(self, key, output):
        if self.sample_fn is None:
            _not_given("sampler", "sample")()
        return self.sample_fn(key, output)

    def hessian_factor(self, output):
        if self.hessian_factor_fn is None:
            _not_given("Hessian factor", "hessian_factor")()
        return self.hessian_factor_fn(output)

    def prepare_targets(self, targets, outputs):
        return targets


_BUILT_IN = {
    "mse": _MSE,
    "cross_entropy": _CrossEntropy,
    "binary_cross_entropy": _BinaryCrossEntropy,
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
                "`fisherops.Likelihood`."
            ) from None
    if callable(loss_fn):
        return Likelihood(loss_fn)
    raise TypeError(
        "loss_fn must be a loss name, a callable `loss(output, target)` or a "
        f"`fisherops.AbstractLikelihood`; got {type(loss_fn).__name__}."
    )


def has_sampler(likelihood: AbstractLikelihood) -> bool:
    return not (isinstance(likelihood, Likelihood) and likelihood.sample_fn is None)


def has_hessian_factor(likelihood: AbstractLikelihood) -> bool:
    return not (
        isinstance(likelihood, Likelihood) and likelihood.hessian_factor_fn is None
    )
