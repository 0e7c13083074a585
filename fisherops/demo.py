"""`python -m fisherops.demo`: a calibrated Laplace approximation of an MLP on digits.

1. trains a small MLP (plain JAX, a hand-written Adam) on scikit-learn's
   handwritten digits (8x8 images, 10 classes; shipped with scikit-learn, no
   download) to its MAP estimate;
2. builds the empirical Fisher, the Monte-Carlo Fisher and the GGN of the
   training loss at the MAP as lineax operators;
3. for each, tunes the prior precision by maximising the Laplace evidence;
4. compares the MAP with the linearised Laplace predictive (probit
   approximation) on held-out data: accuracy, negative log-likelihood and
   expected calibration error, with the time each step took;
5. draws a reliability diagram to a PNG (when matplotlib is installed).

Needs the `demo` extra: `pip install "fisherops[demo]"` (scikit-learn, matplotlib,
tqdm). The pieces (`load_digits_split`, `train_map`, `calibration`,
`reliability_diagram`) are reused by the digits notebook.
"""

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, Float, Int, PyTree

import fisherops

INSTALL_HINT = (
    'pip install "fisherops[demo]"  (or, in a checkout: pip install ".[demo]")'
)


# --------------------------------------------------------------------------- #
# Data and model.
# --------------------------------------------------------------------------- #


def load_digits_split(
    seed: int = 0, test_fraction: float = 0.4
) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    """scikit-learn's digits as `((x_train, y_train), (x_test, y_test))`.

    Inputs are the 64 pixel intensities scaled to `[0, 1]`, float32 `(N, 64)`;
    targets are integer classes `(N,)`. The split is stratified and fixed by `seed`.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    inputs, targets = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        inputs / 16.0,
        targets,
        test_size=test_fraction,
        random_state=seed,
        stratify=targets,
    )

    def as_jax(x, y):
        return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)

    return as_jax(x_train, y_train), as_jax(x_test, y_test)


def mlp(x: Float[Array, " D"], params: PyTree) -> Float[Array, " C"]:
    """`model_fn(input, params)`: tanh hidden layers, logits out; one datum."""
    *hidden, (w, b) = params
    for w_h, b_h in hidden:
        x = jnp.tanh(x @ w_h + b_h)
    return x @ w + b


def init_mlp(key, sizes: Sequence[int]) -> list[tuple[Array, Array]]:
    """`[(w, b), ...]` for layer sizes `sizes`, LeCun-normal weights, zero biases."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.normal(k, (m, n)) / np.sqrt(m), jnp.zeros(n))
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return contextlib.nullcontext()
    return tqdm(total=total, desc=desc, leave=False)


def train_map(
    model_fn: Callable,
    params: PyTree,
    data: tuple[Array, Array],
    prior_precision: float,
    *,
    key,
    num_epochs: int = 150,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    progress: bool = False,
) -> tuple[PyTree, Float[Array, ""]]:
    """The MAP params under cross-entropy and an isotropic Gaussian prior.

    Minimises `sum_n c(y_n, f_n) + prior_precision / 2 |θ|^2` (the negative log
    joint whose Laplace approximation the demo builds) with minibatch Adam: each
    minibatch's loss is rescaled to the whole data set. One jitted `lax.scan` per
    epoch; `progress` shows a tqdm bar over epochs. Returns the params and the
    final training objective.
    """
    inputs, targets = data
    num_data = inputs.shape[0]
    num_batches = num_data // batch_size

    def objective(p, x, y):
        logits = jax.vmap(model_fn, in_axes=(0, None))(x, p)
        nll = -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
        squares = sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(p))
        return nll * num_data / x.shape[0] + 0.5 * prior_precision * squares

    @jax.jit
    def epoch(state, key):
        order = jax.random.permutation(key, num_data)[: num_batches * batch_size]

        def step(state, batch):
            p, m, v, t = state
            value, grad = jax.value_and_grad(objective)(
                p, inputs[batch], targets[batch]
            )
            t = t + 1
            m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, grad)
            v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g**2, v, grad)
            scale = learning_rate * jnp.sqrt(1 - 0.999**t) / (1 - 0.9**t)
            p = jax.tree.map(
                lambda p, m, v: p - scale * m / (jnp.sqrt(v) + 1e-8), p, m, v
            )
            return (p, m, v, t), value

        state, values = jax.lax.scan(
            step, state, order.reshape(num_batches, batch_size)
        )
        return state, jnp.mean(values)

    zeros = jax.tree.map(jnp.zeros_like, params)
    state = (params, zeros, zeros, jnp.zeros((), jnp.float32))
    with _progress(num_epochs, "training (Adam)", progress) as bar:
        for key_epoch in jax.random.split(key, num_epochs):
            state, value = epoch(state, key_epoch)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(objective=f"{float(value):.1f}")
    params = state[0]
    return params, objective(params, inputs, targets)


# --------------------------------------------------------------------------- #
# Metrics and the reliability diagram.
# --------------------------------------------------------------------------- #


def _reliability(
    probs: Float[Array, "N C"], labels: Int[Array, " N"], num_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin of top-class probability: the count, the correct and the confidence
    sums, over `num_bins` equal-width bins of `[0, 1]`."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    bins = np.minimum((confidence * num_bins).astype(int), num_bins - 1)
    return tuple(
        np.bincount(bins, weights, minlength=num_bins)
        for weights in (None, correct, confidence)
    )


def calibration(
    probs: Float[Array, "N C"], labels: Int[Array, " N"], num_bins: int = 15
) -> dict[str, float]:
    """Accuracy, mean negative log-likelihood and expected calibration error.

    `ECE = sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)|` over `num_bins`
    equal-width bins of the top-class probability.
    """
    counts, correct, confidence = _reliability(probs, labels, num_bins)
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
    label_probs = probs[np.arange(labels.size), labels]
    return {
        "accuracy": float(correct.sum() / counts.sum()),
        "nll": float(-np.mean(np.log(np.maximum(label_probs, 1e-12)))),
        "ece": float(np.abs(correct - confidence).sum() / counts.sum()),
    }


def reliability_diagram(
    predictions: dict[str, Float[Array, "N C"]],
    labels: Int[Array, " N"],
    path=None,
    num_bins: int = 15,
):
    """Accuracy against confidence, one line per method, and confidence histograms.

    `predictions` maps a method's name to its class probabilities. Returns the
    matplotlib figure; saves it to `path` (a PNG) when given.
    """
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    left.plot([0, 1], [0, 1], "k:", label="perfectly calibrated")
    for name, probs in predictions.items():
        counts, correct, confidence = _reliability(probs, labels, num_bins)
        filled = counts > 0
        ece = calibration(probs, labels, num_bins)["ece"]
        left.plot(
            confidence[filled] / counts[filled],
            correct[filled] / counts[filled],
            "o-",
            label=f"{name} (ECE {ece:.3f})",
        )
        right.hist(
            np.asarray(probs).max(axis=1),
            bins=np.linspace(0, 1, num_bins + 1),
            histtype="step",
            linewidth=1.5,
            label=name,
        )
    left.set(
        xlabel="confidence (top-class probability)",
        ylabel="accuracy",
        xlim=(0, 1.02),
        ylim=(0, 1.02),
        title="reliability",
    )
    left.legend(fontsize=8, loc="lower right")
    right.set(
        xlabel="confidence", ylabel="test points", yscale="log", title="confidence"
    )
    right.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=80)
    return figure


# --------------------------------------------------------------------------- #
# The demo.
# --------------------------------------------------------------------------- #


@contextlib.contextmanager
def _timer(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


def _materialise(operator):
    """`lineax.materialise` under `jit`: the dense operator, computed once."""
    return jax.block_until_ready(eqx.filter_jit(lx.materialise)(operator))


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fisherops.demo",
        description="Laplace-calibrate an MLP on scikit-learn's digits.",
    )
    parser.add_argument(
        "--out",
        default="fisherops_demo_reliability.png",
        help="where to write the reliability diagram (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="data split and init")
    parser.add_argument("--epochs", type=int, default=150, help="training epochs")
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bars"
    )
    args = parser.parse_args(argv)
    progress = not args.no_progress and _has("tqdm")

    if not _has("sklearn"):
        print(
            "The demo needs scikit-learn for its data set (and matplotlib for its "
            f"plot, tqdm for progress bars). Install them with:\n    {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 1

    timings: dict[str, float] = {}
    (x_train, y_train), (x_test, y_test) = load_digits_split(args.seed)
    key_init, key_train, key_mc = jax.random.split(jax.random.key(args.seed), 3)
    sizes = (x_train.shape[1], 16, 10)
    params = init_mlp(key_init, sizes)
    num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    print(
        f"digits: {x_train.shape[0]} train / {x_test.shape[0]} test images, "
        f"MLP {sizes} with {num_params} params, jax on {jax.devices()[0].platform}"
    )

    train_prior = 1.0
    with _timer(timings, "train MAP"):
        params, objective = train_map(
            mlp,
            params,
            (x_train, y_train),
            train_prior,
            key=key_train,
            num_epochs=args.epochs,
            progress=progress,
        )
        jax.block_until_ready(params)
    logits_train = jax.vmap(mlp, in_axes=(0, None))(x_train, params)
    log_likelihood = jnp.sum(
        jnp.take_along_axis(jax.nn.log_softmax(logits_train), y_train[:, None], 1)
    )
    print(
        f"MAP: trained in {timings['train MAP']:.1f} s with prior precision "
        f"{train_prior}, train NLL {-float(log_likelihood) / x_train.shape[0]:.4f}"
    )

    data = (x_train, y_train)
    curvatures = {
        "GGN": fisherops.GGNOperator(mlp, params, data, "cross_entropy"),
        "MC Fisher": fisherops.MCFisherOperator(
            mlp, params, data, "cross_entropy", key_mc, mc_samples=1
        ),
        "empirical Fisher": fisherops.EmpiricalFisherOperator(
            mlp, params, data, "cross_entropy"
        ),
    }

    map_logits = jax.vmap(mlp, in_axes=(0, None))(x_test, params)
    predictions = {"MAP": jax.nn.softmax(map_logits)}
    priors = {"MAP": train_prior}
    for name, curvature in curvatures.items():
        # The curvature summed over the training data, as a dense P x P operator
        # (computed once, from matrix-free mvs; tagged symmetric PSD by lineax):
        # the evidence and the predictive both reuse it.
        with _timer(timings, f"{name}: dense curvature"):
            dense = _materialise(curvature)
        with _timer(timings, f"{name}: tune prior (evidence)"):
            prior = fisherops.optimize_prior_precision(
                dense,
                params,
                log_likelihood,
                init=train_prior,
                num_steps=20,
                learning_rate=0.3,
                progress=progress,
            )
            jax.block_until_ready(prior)
        with _timer(timings, f"{name}: Laplace predictive"):
            posterior = fisherops.LaplacePosterior(dense, prior, params)
            mean, variance = posterior.predictive(mlp, x_test)
            probs = jax.block_until_ready(fisherops.probit(mean, variance))
        predictions[f"Laplace {name}"] = probs
        priors[f"Laplace {name}"] = float(jax.tree.leaves(prior.precision)[0])

    print()
    print(f"{'test set':<28}{'accuracy':>10}{'NLL':>10}{'ECE':>10}{'prior λ':>10}")
    for name, probs in predictions.items():
        metrics = calibration(probs, y_test)
        print(
            f"{name:<28}{metrics['accuracy']:>10.4f}{metrics['nll']:>10.4f}"
            f"{metrics['ece']:>10.4f}{priors[name]:>10.3g}"
        )
    print()
    print("timings (s, including compilation):")
    for name, seconds in timings.items():
        print(f"  {name:<40}{seconds:6.1f}")

    if _has("matplotlib"):
        import matplotlib

        matplotlib.use("Agg")
        reliability_diagram(predictions, y_test, args.out)
        print(f"\nreliability diagram written to {args.out}")
    else:
        print(f"\nno reliability diagram: matplotlib is not installed ({INSTALL_HINT})")
    print(f"total {sum(timings.values()):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
