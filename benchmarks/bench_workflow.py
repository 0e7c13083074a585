"""The Laplace workflow as a user runs it, step by step, against laplace-torch.

    python benchmarks/bench_workflow.py                  # the full run
    python benchmarks/bench_workflow.py --quick          # 2 repeats, GGN only
    python benchmarks/bench_workflow.py --models cnn --curvatures ggn,ef

Models (scikit-learn's digits, 8x8 images, 10 classes; 1,347 train / 450 test
images, the split of `fisherops.demo.load_digits_split`), float32:

- `cnn`: an equinox CNN, two stride-2 3x3 convolutions (1 -> 8 -> 16 channels,
  padding 1, tanh) and a dense layer, P = 1,898;
- `mlp`: the demo's MLP 64-16-10 (tanh), P = 1,210.

Each is trained briefly with optax (Adam, fixed seed) on the cross-entropy plus
an isotropic prior of precision 1 (the MAP), once, in this process. Then for each
curvature (GGN, MC Fisher with one sample, empirical Fisher, and KFAC when
`fisherops.KFACOperator` is implemented) a fresh Python process runs the
workflow `--repeats` times, so the first repeat's times are what a user sees on
a first call (tracing and XLA compilation included) and the median of the other
repeats is the time after compilation:

1. `build`: the curvature of the training loss at the MAP, and what the rest
   reuses: its dense matrix (`lineax.materialise`) or KFAC's decomposition;
2. `tune prior`: the scalar prior precision that maximises the Laplace evidence;
3. `predictive`: the linearised (GLM) predictive with the probit approximation
   on the 450 test images;
4. `20 samples`: 20 posterior draws of the params;
5. `log evidence`: the Laplace log marginal likelihood at the tuned prior.

laplace-torch (`pip install laplace-torch`, a benchmark-only dependency) runs the
same model with the same weights (ported into an equivalent `torch.nn.Sequential`;
the script checks the logits agree) through
`Laplace(model, "classification", subset_of_weights="all", hessian_structure="full")`
(`"kron"` for KFAC; the `CurvlinopsEF` backend for the empirical Fisher and
`CurvlinopsGGN(stochastic=True)` for the MC Fisher), `fit`,
`optimize_prior_precision(method="marglik")` (its defaults: 100 Adam steps),
`la(x, pred_type="glm", link_approx="probit")`, `la.sample(20)` and
`la.log_marginal_likelihood()`, timed the same way (in this process; torch has
no compilation to speak of). Without torch/laplace-torch the script says so and
skips that part.

Printed: per step, the first-call and compiled (wall) times of both, fisherops'
first-call process CPU time (all threads; on a shared machine the steadier
measure, and about the wall time the call takes on an idle one), the ratios
fisherops / laplace-torch of the compiled wall and CPU times and of the first
calls' wall times (below 1: fisherops is faster), the machine's load average, and
the agreement of the two at a fixed prior precision (log evidence, predictive
probabilities; the MC Fisher draws different samples in the two libraries, so
only roughly) and of the tuned prior precisions.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).parent
MODELS = ("cnn", "mlp")
CURVATURES = ("ggn", "mc", "ef", "kfac")
STEPS = ("build", "tune prior", "predictive", "20 samples", "log evidence")
NUM_SAMPLES = 20
FIXED_PRIOR = 1.0  # the prior precision at which the two libraries are compared
TRAIN_PRIOR = 1.0
SEED = 0


def clocked(fn, *args, block=lambda out: out, **kwargs):
    """`(fn(*args, **kwargs), (wall seconds, process CPU seconds))`: CPU time,
    all threads, is the steadier measure on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = block(fn(*args, **kwargs))
    return out, (time.perf_counter() - wall, time.process_time() - cpu)


def load() -> str:
    return "{:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())


# --------------------------------------------------------------------------- #
# The models and their training (JAX).
# --------------------------------------------------------------------------- #


def digits():
    """`((x_train, y_train), (x_test, y_test))` as numpy: scikit-learn's digits,
    x `(N, 64)` float32 in [0, 1], 1,347 train and 450 test images (stratified,
    seeded)."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    inputs, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        (inputs / 16.0).astype(np.float32),
        labels.astype(np.int32),
        test_size=450,
        random_state=SEED,
        stratify=labels,
    )
    return (x_train, y_train), (x_test, y_test)


def jax_inputs(model: str, x):
    """The model's input layout: images `(N, 1, 8, 8)` for the CNN (channels
    first, as equinox and torch), flat `(N, 64)` for the MLP."""
    return x.reshape(-1, 1, 8, 8) if model == "cnn" else x


def jax_model(model: str, key):
    """`(model_fn, params)`: `model_fn(x, params)` on one datum."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import fisherops
    from fisherops.demo import init_mlp, mlp

    if model == "mlp":
        return mlp, init_mlp(key, (64, 16, 10))

    class CNN(eqx.Module):
        conv1: eqx.nn.Conv2d
        conv2: eqx.nn.Conv2d
        dense: eqx.nn.Linear

        def __init__(self, key):
            k1, k2, k3 = jax.random.split(key, 3)
            self.conv1 = eqx.nn.Conv2d(1, 8, 3, stride=2, padding=1, key=k1)
            self.conv2 = eqx.nn.Conv2d(8, 16, 3, stride=2, padding=1, key=k2)
            self.dense = eqx.nn.Linear(16 * 2 * 2, 10, key=k3)

        def __call__(self, x):  # x: (1, 8, 8)
            h = jnp.tanh(self.conv1(x))
            h = jnp.tanh(self.conv2(h))
            return self.dense(h.reshape(-1))

    return fisherops.from_equinox(CNN(key))


def num_params(params) -> int:
    import jax

    return sum(leaf.size for leaf in jax.tree.leaves(params))


def train(model: str, x_train, y_train, num_epochs: int):
    """The MAP: Adam (optax) on `sum_n CE + TRAIN_PRIOR / 2 |θ|^2`, minibatches of
    64 rescaled to the whole set, one jitted `lax.scan` over all steps."""
    import jax
    import jax.numpy as jnp
    import optax

    key_init, key_order = jax.random.split(jax.random.key(SEED))
    model_fn, params = jax_model(model, key_init)
    inputs = jnp.asarray(jax_inputs(model, x_train))
    targets = jnp.asarray(y_train)
    num_data, batch = inputs.shape[0], 64
    num_batches = num_data // batch

    def objective(p, x, y):
        logits = jax.vmap(model_fn, in_axes=(0, None))(x, p)
        nll = -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
        squares = sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(p))
        return nll * num_data / x.shape[0] + 0.5 * TRAIN_PRIOR * squares

    optimiser = optax.adam(optax.cosine_decay_schedule(1e-2, num_epochs * num_batches))
    orders = jax.vmap(lambda k: jax.random.permutation(k, num_data))(
        jax.random.split(key_order, num_epochs)
    )[:, : num_batches * batch].reshape(-1, batch)

    @jax.jit
    def run(params):
        def step(state, order):
            p, opt = state
            value, grad = jax.value_and_grad(objective)(
                p, inputs[order], targets[order]
            )
            updates, opt = optimiser.update(grad, opt, p)
            return (optax.apply_updates(p, updates), opt), value

        (params, _), _ = jax.lax.scan(step, (params, optimiser.init(params)), orders)
        return params

    params = run(params)
    logits = jax.vmap(model_fn, in_axes=(0, None))(inputs, params)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == targets))
    return model_fn, params, accuracy


# --------------------------------------------------------------------------- #
# The fisherops side (one process per model and curvature).
# --------------------------------------------------------------------------- #


def fisherops_steps(model: str, curvature: str, model_fn, params, train_data):
    """The workflow's steps as functions, the operator built from `(params, data)`.

    The flow of the docs and the demo: `build` computes the dense curvature
    once (`lineax.materialise` of the operator, like laplace-torch's `fit`);
    `optimize_prior_precision` takes that matrix's spectrum (`eigvalsh`); the
    posterior at the tuned prior is `factorise()`d (a Cholesky of the held
    matrix plus the prior), and predictive, samples and evidence reuse that
    factor. KFAC (`decompose()`d in `build`) uses its Kronecker factors'
    eigendecompositions throughout (no dense matrix).
    Everything version-specific about the fisherops API is in this function.
    """
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import lineax as lx

    import fisherops

    inputs, targets = train_data
    key_mc, key_sample = jax.random.split(jax.random.key(SEED + 1))

    @eqx.filter_jit
    def log_likelihood(params, inputs, targets):
        logits = jax.vmap(model_fn, in_axes=(0, None))(inputs, params)
        return jnp.sum(
            jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], 1)
        )

    def build():
        data = (inputs, targets)
        if curvature == "ggn":
            op = fisherops.GGNOperator(model_fn, params, data, "cross_entropy")
        elif curvature == "mc":
            op = fisherops.MCFisherOperator(
                model_fn, params, data, "cross_entropy", key_mc, mc_samples=1
            )
        elif curvature == "ef":
            op = fisherops.EmpiricalFisherOperator(
                model_fn, params, data, "cross_entropy"
            )
        else:
            # The factors and their eigendecompositions, once for every prior.
            op = fisherops.KFACOperator(
                model_fn, params, data, "cross_entropy"
            ).decompose()
        if curvature != "kfac":
            op = lx.materialise(op)  # the dense P x P matrix, once
        return op, log_likelihood(params, inputs, targets)

    def tune(state):
        op, loglik = state
        result = fisherops.optimize_prior_precision(
            op, log_likelihood=loglik, init=TRAIN_PRIOR
        )
        return result.prior_precision

    def posterior(state, prior):
        laplace = fisherops.LaplacePosterior(state[0], prior)
        return laplace if curvature == "kfac" else laplace.factorise()

    def predictive(laplace, test_inputs):
        return laplace.predictive(test_inputs, approximation="probit")

    def samples(laplace):
        return laplace.sample(key_sample, NUM_SAMPLES)

    def evidence(laplace, state):
        return laplace.log_marginal_likelihood(state[1])

    def prior_value(prior) -> float:
        return float(jax.tree.leaves(prior.precision)[0])

    return build, tune, posterior, predictive, samples, evidence, prior_value


def run_fisherops(model: str, curvature: str, weights: str, repeats: int) -> dict:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    start_load = load()
    (x_train, y_train), (x_test, _) = digits()
    model_fn, skeleton = jax_model(model, jax.random.key(SEED))
    params = eqx.tree_deserialise_leaves(weights, skeleton)
    train_data = (jnp.asarray(jax_inputs(model, x_train)), jnp.asarray(y_train))
    test_inputs = jnp.asarray(jax_inputs(model, x_test))
    build, tune, posterior, predictive, samples, evidence, prior_value = (
        fisherops_steps(model, curvature, model_fn, params, train_data)
    )

    def timed(fn, *args):
        return clocked(fn, *args, block=jax.block_until_ready)

    def predict(state, prior):  # the posterior's factorisation is counted here
        laplace = posterior(state, prior)
        return laplace, predictive(laplace, test_inputs)

    times = {step: [] for step in STEPS}
    for _ in range(repeats):
        state, seconds = timed(build)
        times["build"].append(seconds)
        prior, seconds = timed(tune, state)
        times["tune prior"].append(seconds)
        (laplace, probs), seconds = timed(predict, state, prior)
        times["predictive"].append(seconds)
        _, seconds = timed(samples, laplace)
        times["20 samples"].append(seconds)
        value, seconds = timed(evidence, laplace, state)
        times["log evidence"].append(seconds)
    # At the fixed prior precision, for the comparison with laplace-torch.
    fixed, fixed_probs = predict(state, FIXED_PRIOR)
    fixed_evidence = float(evidence(fixed, state))
    fixed_probs = np.asarray(fixed_probs)
    return {
        "times": times,
        "prior": prior_value(prior),
        "evidence": float(value),
        "fixed_evidence": fixed_evidence,
        "fixed_probs": fixed_probs.tolist(),
        "probs": np.asarray(probs).tolist(),
        "load": f"{start_load} -> {load()}",
    }


def fisherops_in_subprocess(model, curvature, weights, repeats) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        f"{model}:{curvature}",
        "--weights",
        weights,
        "--repeats",
        str(repeats),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"exit code {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def kfac_available() -> bool:
    import jax
    import jax.numpy as jnp

    import fisherops

    if not hasattr(fisherops, "KFACOperator"):
        return False
    x = jnp.ones((2, 3))
    try:
        fisherops.KFACOperator(
            lambda x, p: x @ p,
            jnp.ones((3, 2)),
            (x, jnp.zeros(2, int)),
            "cross_entropy",
        )
    except NotImplementedError:
        return False
    except Exception:  # noqa: BLE001 - any other failure is reported by the run
        return True
    del jax
    return True


# --------------------------------------------------------------------------- #
# The laplace-torch side.
# --------------------------------------------------------------------------- #


def torch_model(model: str, params):
    """The same network as a `torch.nn.Sequential`, with the JAX weights."""
    import numpy as np
    import torch
    from torch import nn

    def tensor(a):
        return torch.as_tensor(np.asarray(a, np.float32))

    if model == "mlp":
        (w1, b1), (w2, b2) = params
        net = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
        with torch.no_grad():
            for layer, (w, b) in zip((net[0], net[2]), params, strict=True):
                layer.weight.copy_(tensor(w).T)
                layer.bias.copy_(tensor(b))
        return net
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    with torch.no_grad():
        for layer, source in zip(
            (net[0], net[2], net[5]),
            (params.conv1, params.conv2, params.dense),
            strict=True,
        ):
            layer.weight.copy_(tensor(source.weight))
            layer.bias.copy_(tensor(source.bias).reshape(-1))
    return net


def run_laplace_torch(model, net, curvature, train_data, test_inputs, repeats):
    import numpy as np
    import torch
    from laplace import Laplace
    from laplace.curvature import CurvlinopsEF, CurvlinopsGGN
    from torch.utils.data import DataLoader, TensorDataset

    start_load = load()
    x_train, y_train = (torch.as_tensor(a) for a in train_data)
    x_test = torch.as_tensor(test_inputs)
    loader = DataLoader(TensorDataset(x_train, y_train.long()), batch_size=len(x_train))
    options = {
        "ggn": {"hessian_structure": "full"},
        "mc": {
            "hessian_structure": "full",
            "backend": CurvlinopsGGN,
            "backend_kwargs": {"stochastic": True},
        },
        "ef": {"hessian_structure": "full", "backend": CurvlinopsEF},
        "kfac": {"hessian_structure": "kron"},
    }[curvature]
    torch.manual_seed(SEED)

    timed = clocked

    def build():
        la = Laplace(net, "classification", subset_of_weights="all", **options)
        la.fit(loader)
        return la

    def predictive(la):
        with torch.no_grad():
            return la(x_test, pred_type="glm", link_approx="probit")

    times = {step: [] for step in STEPS}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(repeats):
            la, seconds = timed(build)
            times["build"].append(seconds)
            _, seconds = timed(
                la.optimize_prior_precision,
                method="marglik",
                pred_type="glm",
                link_approx="probit",
            )
            times["tune prior"].append(seconds)
            probs, seconds = timed(predictive, la)
            times["predictive"].append(seconds)
            _, seconds = timed(la.sample, NUM_SAMPLES)
            times["20 samples"].append(seconds)
            with torch.no_grad():
                value, seconds = timed(la.log_marginal_likelihood)
            times["log evidence"].append(seconds)
        prior = float(la.prior_precision.reshape(-1)[0])
        evidence = float(value)
        with torch.no_grad():
            fixed_evidence = float(
                la.log_marginal_likelihood(prior_precision=torch.tensor(FIXED_PRIOR))
            )
            la.prior_precision = FIXED_PRIOR
            fixed_probs = predictive(la).numpy()
    return {
        "times": times,
        "prior": prior,
        "evidence": evidence,
        "fixed_evidence": fixed_evidence,
        "fixed_probs": fixed_probs.tolist(),
        "probs": np.asarray(probs).tolist(),
        "load": f"{start_load} -> {load()}",
    }


# --------------------------------------------------------------------------- #
# The report.
# --------------------------------------------------------------------------- #


def first_and_compiled(times: list, clock: int = 0) -> tuple[float, float]:
    """The first call's and the median later call's seconds (`clock` 0: wall,
    1: CPU)."""
    times = [t[clock] for t in times]
    first = times[0]
    compiled = statistics.median(times[1:]) if len(times) > 1 else float("nan")
    return first, compiled


def fmt(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "-"
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def report(model, num, accuracy, curvature, ours, theirs) -> list[str]:
    """Prints one model and curvature; returns its markdown rows."""
    import numpy as np

    nan = float("nan")
    print(f"\n== {model} (P = {num}, train accuracy {accuracy:.3f}), {curvature}")
    if ours is not None and "error" in ours:
        print(f"  fisherops failed: {ours['error']}")
        ours = None
    loads = [
        f"{name} {r['load']}"
        for name, r in (("fisherops", ours), ("laplace-torch", theirs))
        if r is not None
    ]
    print("  load average " + ", ".join(loads))
    print(
        f"  {'step':<14}{'first':>10}{'first CPU':>10}{'compiled':>10}"
        f"{'lt first':>10}{'lt':>10}{'ratio':>10}{'CPU ratio':>10}{'ratio 1st':>10}"
    )
    rows = []
    for result in (ours, theirs):
        if result is not None:  # the whole workflow, repeat by repeat
            result["times"]["total"] = [
                [sum(t[clock] for t in times) for clock in (0, 1)]
                for times in zip(*(result["times"][s] for s in STEPS), strict=True)
            ]
    for step in (*STEPS, "total"):
        first, compiled = (
            first_and_compiled(ours["times"][step]) if ours else (nan, nan)
        )
        lt_first, lt = (
            first_and_compiled(theirs["times"][step]) if theirs else (nan, nan)
        )
        first_cpu, cpu = (
            first_and_compiled(ours["times"][step], 1) if ours else (nan, nan)
        )
        _, lt_cpu = (
            first_and_compiled(theirs["times"][step], 1) if theirs else (nan, nan)
        )
        cells = [fmt(first), fmt(first_cpu), fmt(compiled), fmt(lt_first), fmt(lt)]
        cells += [f"{compiled / lt:.2f}", f"{cpu / lt_cpu:.2f}"]
        cells += [f"{first / lt_first:.2f}"]
        cells = [c.replace("nan", "-") for c in cells]
        print(f"  {step:<14}" + "".join(f"{c:>10}" for c in cells))
        rows.append(f"| {model} | {curvature} | {step} | " + " | ".join(cells) + " |")
    for label, key in (
        ("tuned prior precision", "prior"),
        ("log evidence at the tuned prior", "evidence"),
        (f"log evidence at prior precision {FIXED_PRIOR}", "fixed_evidence"),
    ):
        values = [
            f"{name} {r[key]:.6g}"
            for name, r in (("fisherops", ours), ("laplace-torch", theirs))
            if r is not None
        ]
        print(f"  {label}: " + ", ".join(values))
    if ours and theirs:
        difference = abs(ours["fixed_evidence"] - theirs["fixed_evidence"])
        probs = np.abs(np.asarray(ours["fixed_probs"]) - theirs["fixed_probs"])
        print(
            f"  at prior precision {FIXED_PRIOR}: |Δ log evidence| {difference:.2e} "
            f"(relative {difference / abs(theirs['fixed_evidence']):.1e}), "
            f"max |Δ predictive probability| {probs.max():.2e}"
        )
    return rows


def have_laplace_torch() -> str | None:
    try:
        import laplace  # noqa: F401
        import torch  # noqa: F401
    except ImportError as error:
        return str(error)
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats, GGN only")
    parser.add_argument("--repeats", type=int, default=None, help="default 4")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--curvatures", default=None, help="default ggn,mc,ef[,kfac]")
    parser.add_argument("--epochs", type=int, default=60, help="training epochs")
    parser.add_argument("--no-torch", action="store_true", help="skip laplace-torch")
    parser.add_argument(
        "--lt-repeats", type=int, default=None, help="laplace-torch's (default: same)"
    )
    parser.add_argument("--save-torch", help="write laplace-torch's results (JSON)")
    parser.add_argument(
        "--torch-only", action="store_true", help="skip the fisherops side"
    )
    parser.add_argument("--save-fisherops", help="write fisherops' results (JSON)")
    parser.add_argument(
        "--load-fisherops", help="read fisherops' results instead of running it"
    )
    parser.add_argument(
        "--load-torch", help="read laplace-torch's results instead of running it"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    options = parser.parse_args()
    repeats = options.repeats or (2 if options.quick else 4)
    if options.worker:
        model, curvature = options.worker.split(":")
        result = run_fisherops(model, curvature, options.weights, repeats)
        print(json.dumps(result))
        return

    import equinox as eqx
    import jax

    if options.curvatures:
        curvatures = options.curvatures.split(",")
    elif options.quick:
        curvatures = ["ggn"]
    else:
        curvatures = ["ggn", "mc", "ef"] + (["kfac"] if kfac_available() else [])
    missing = None if options.no_torch else have_laplace_torch()
    use_torch = not options.no_torch and missing is None

    print(f"fisherops workflow benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(
        f"jax {jax.__version__} ({jax.default_backend()}), {platform.processor()}, "
        f"{os.cpu_count()} cores, load average {load()}"
    )
    if use_torch:
        import laplace
        import torch

        version = getattr(laplace, "__version__", None)
        if version is None:
            from importlib.metadata import version as package_version

            version = package_version("laplace-torch")
        print(
            f"laplace-torch {version}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)"
        )
    elif not options.no_torch:
        print(f"laplace-torch is not installed ({missing}): its part is skipped.")
    print(f"{repeats} repeats: first call, then the median of the rest")

    (x_train, y_train), (x_test, y_test) = digits()
    rows = []
    saved, saved_ours = {}, {}
    loaded, loaded_ours = {}, {}
    if options.load_torch:
        with open(options.load_torch) as file:
            loaded = json.load(file)
        print(f"laplace-torch's results read from {options.load_torch}")
    if options.load_fisherops:
        with open(options.load_fisherops) as file:
            loaded_ours = json.load(file)
        print(f"fisherops' results read from {options.load_fisherops}")
    with tempfile.TemporaryDirectory() as folder:
        for model in options.models.split(","):
            model_fn, params, accuracy = train(model, x_train, y_train, options.epochs)
            weights = str(pathlib.Path(folder) / f"{model}.eqx")
            eqx.tree_serialise_leaves(weights, params)
            checksum = sum(float(abs(leaf).sum()) for leaf in jax.tree.leaves(params))
            print(f"\n{model}: trained, sum |θ| = {checksum:.6f}")
            net = None
            if use_torch:
                import numpy as np
                import torch

                net = torch_model(model, params)
                inputs = jax_inputs(model, x_test)
                with torch.no_grad():
                    torch_logits = net(torch.as_tensor(inputs)).numpy()
                jax_logits = np.asarray(
                    jax.vmap(model_fn, in_axes=(0, None))(inputs, params)
                )
                print(
                    f"\n{model}: max |logits(torch) - logits(jax)| on the test set "
                    f"{np.max(np.abs(torch_logits - jax_logits)):.2e}"
                )
            for curvature in curvatures:
                ours = None
                if f"{model}:{curvature}" in loaded_ours:
                    ours = loaded_ours[f"{model}:{curvature}"]
                elif not options.torch_only:
                    ours = fisherops_in_subprocess(model, curvature, weights, repeats)
                    saved_ours[f"{model}:{curvature}"] = ours
                    if options.save_fisherops:
                        with open(options.save_fisherops, "w") as file:
                            json.dump(saved_ours, file)
                theirs = None
                if f"{model}:{curvature}" in loaded:
                    theirs = loaded[f"{model}:{curvature}"]
                elif use_torch:
                    theirs = run_laplace_torch(
                        model,
                        net,
                        curvature,
                        (jax_inputs(model, x_train), y_train),
                        jax_inputs(model, x_test),
                        options.lt_repeats or repeats,
                    )
                    saved[f"{model}:{curvature}"] = theirs
                    if options.save_torch:  # after each, for long runs
                        with open(options.save_torch, "w") as file:
                            json.dump(saved, file)
                rows += report(
                    model, num_params(params), accuracy, curvature, ours, theirs
                )
    print(
        "\n| model | curvature | step | first | first, CPU | compiled "
        "| laplace-torch first | laplace-torch | ratio | CPU ratio | ratio first |"
    )
    print("|---" * 11 + "|")
    print("\n".join(rows))
    if options.save_torch:
        with open(options.save_torch, "w") as file:
            json.dump(saved, file)
    del y_test


if __name__ == "__main__":
    main()
