"""EKFAC build time against curvlinops' `EKFACLinearOperator` on the same model.

    python benchmarks/bench_ekfac.py            # the full run (5 repeats)
    python benchmarks/bench_ekfac.py --quick    # a fast smoke run (3 repeats)

Problems from `_problems.py`, float32, cross-entropy: the MLP 32-256-256-10
(N = 512) and the small CNN (two stride-2 3x3 convolutions and a dense layer on
28x28 images, N = 256), each as the same `torch.nn.Sequential` with the same
weights (padding and flattening order ported so the outputs agree).

- fisherops: `EKFACOperator(..., kind=k)` built inside `eqx.filter_jit`: the
  first call (compilation included) and the median of the compiled calls.
- curvlinops: `EKFACLinearOperator(model, CrossEntropyLoss(reduction="sum"),
  params, [(X, y)], fisher_type=..., separate_weight_and_bias=False,
  num_data=N, num_per_example_loss_terms=1, check_deterministic=False)` and its
  `_maybe_compute_ekfac()` (the factors, their eigenvectors and the eigenvalue
  correction, the same work): the median over calls. torch runs in a
  subprocess (loaded next to jaxlib it has crashed XLA's compiler), with its
  default thread count.

Kinds: the GGN (curvlinops' `"type-2"`) and the MC Fisher with one sample
(`"mc"`). Before timing, a check in float64 on each model (N = 32): both
operators' products with one random vector (GGN kind; the same matrix, so the
relative difference is at rounding level).
"""

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# --------------------------------------------------------------------------- #
# The torch side (run in a subprocess: python bench_ekfac.py --torch IN OUT).
# --------------------------------------------------------------------------- #


def torch_net(model: str, params: dict, dtype):
    """The `_problems` network as a `torch.nn.Sequential` with the JAX weights."""
    import torch
    from torch import nn

    def tensor(a):
        return torch.as_tensor(np.asarray(a)).to(dtype)

    if model == "mlp":
        layers, count = [], len(params) // 2
        for i in range(count):
            w = params[f"w{i}"]
            linear = nn.Linear(w.shape[0], w.shape[1])
            layers.append(linear)
            if i < count - 1:
                layers.append(nn.Tanh())
        net = nn.Sequential(*layers).to(dtype)
        with torch.no_grad():
            for i in range(count):
                net[2 * i].weight.copy_(tensor(params[f"w{i}"].T))
                net[2 * i].bias.copy_(tensor(params[f"b{i}"]))
        return net
    # JAX's "SAME" with stride 2 on an even size pads one row/column at the end.
    net = nn.Sequential(
        nn.ZeroPad2d((0, 1, 0, 1)),
        nn.Conv2d(1, 8, 3, stride=2),
        nn.Tanh(),
        nn.ZeroPad2d((0, 1, 0, 1)),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(7 * 7 * 16, 10),
    ).to(dtype)
    # JAX flattens (h, w, c); torch (c, h, w).
    w3 = params["w3"].reshape(7, 7, 16, 10).transpose(2, 0, 1, 3).reshape(-1, 10)
    with torch.no_grad():
        net[1].weight.copy_(tensor(params["c1"].transpose(3, 2, 0, 1)))
        net[1].bias.copy_(tensor(params["cb1"]))
        net[4].weight.copy_(tensor(params["c2"].transpose(3, 2, 0, 1)))
        net[4].bias.copy_(tensor(params["cb2"]))
        net[7].weight.copy_(tensor(w3.T))
        net[7].bias.copy_(tensor(params["b3"]))
    return net


def torch_inputs(model: str, inputs: np.ndarray) -> np.ndarray:
    return inputs if model == "mlp" else inputs.transpose(0, 3, 1, 2)


def torch_vector(model: str, vector: dict) -> list:
    """A params-shaped JAX-layout vector in the torch net's parameter order."""
    if model == "mlp":
        order = []
        for i in range(len(vector) // 2):
            order += [vector[f"w{i}"].T, vector[f"b{i}"]]
        return order
    w3 = vector["w3"].reshape(7, 7, 16, 10).transpose(2, 0, 1, 3).reshape(-1, 10)
    return [
        vector["c1"].transpose(3, 2, 0, 1),
        vector["cb1"],
        vector["c2"].transpose(3, 2, 0, 1),
        vector["cb2"],
        w3.T,
        vector["b3"],
    ]


def run_torch(path_in: str, path_out: str) -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.script
    import torch
    from curvlinops import EKFACLinearOperator

    torch.manual_seed(0)
    spec = dict(np.load(path_in, allow_pickle=True))
    model, kind, repeats = str(spec["model"]), str(spec["kind"]), int(spec["repeats"])
    check = bool(spec["check"])
    dtype = torch.float64 if check else torch.float32
    params = {k[2:]: v for k, v in spec.items() if k.startswith("p_")}
    net = torch_net(model, params, dtype)
    x = torch.as_tensor(torch_inputs(model, spec["inputs"])).to(dtype)
    y = torch.as_tensor(spec["targets"]).long()
    loss = torch.nn.CrossEntropyLoss(reduction="sum")

    def build():
        operator = EKFACLinearOperator(
            net,
            loss,
            list(net.parameters()),
            [(x, y)],
            fisher_type="type-2" if kind == "ggn" else "mc",
            separate_weight_and_bias=False,
            num_data=len(y),
            num_per_example_loss_terms=1,
            check_deterministic=False,
        )
        operator._maybe_compute_ekfac()
        return operator

    out = {"threads": torch.get_num_threads()}
    if check:
        vector = {k[2:]: v for k, v in spec.items() if k.startswith("v_")}
        product = build() @ [torch.as_tensor(v) for v in torch_vector(model, vector)]
        out["product"] = np.concatenate([p.detach().numpy().ravel() for p in product])
    else:
        build()  # warm-up
        walls, cpus = [], []
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            build()
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        out["wall"], out["cpu"] = statistics.median(walls), statistics.median(cpus)
    np.savez(path_out, **out)


def curvlinops(spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path_in, path_out = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        np.savez(path_in, **spec)
        subprocess.run(
            [sys.executable, __file__, "--torch", path_in, path_out],
            check=True,
            timeout=1800,
        )
        return dict(np.load(path_out))


# --------------------------------------------------------------------------- #
# The JAX side.
# --------------------------------------------------------------------------- #


def jax_side(args) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)  # the float64 check only
    import equinox as eqx
    import jax.numpy as jnp

    sys.path.insert(0, HERE)
    from _problems import make_problem

    import fisherops

    def build(problem, kind):
        extra = {"key": jax.random.key(3)} if kind == "mc" else {}

        @eqx.filter_jit
        def run(params, inputs, targets):
            return fisherops.EKFACOperator(
                problem.model_fn,
                params,
                (inputs, targets),
                problem.loss,
                kind=kind,
                **extra,
            )

        return run

    def block(tree):
        return jax.block_until_ready(eqx.filter(tree, eqx.is_array))

    def spec(problem, model, kind, **extra):
        return {
            "model": model,
            "kind": kind,
            "inputs": np.asarray(problem.inputs),
            "targets": np.asarray(problem.targets),
            **{f"p_{k}": np.asarray(v) for k, v in problem.params.items()},
            **extra,
        }

    print("\n### Check: EKFAC GGN mv, float64, N = 32\n")
    print("| model | P | relative difference fisherops vs curvlinops |")
    print("|---|---|---|")
    for model in ("mlp", "cnn"):
        problem = make_problem(model, 32, jnp.float64)
        operator = build(problem, "ggn")(
            problem.params, problem.inputs, problem.targets
        )
        vector = jax.tree_util.tree_map(
            lambda p: jax.random.normal(jax.random.key(1), p.shape, p.dtype),
            problem.params,
        )
        ours = operator.mv(vector)
        vector_np = {k: np.asarray(v) for k, v in vector.items()}
        theirs = curvlinops(
            spec(
                problem,
                model,
                "ggn",
                repeats=0,
                check=True,
                **{f"v_{k}": v for k, v in vector_np.items()},
            )
        )["product"]
        ours_np = {k: np.asarray(v) for k, v in ours.items()}
        ours_flat = np.concatenate([v.ravel() for v in torch_vector(model, ours_np)])
        difference = np.linalg.norm(ours_flat - theirs) / np.linalg.norm(theirs)
        print(f"| {model} | {problem.num_params} | {difference:.1e} |")

    print(f"\n### EKFAC build, float32, median of {args.repeats}\n")
    print(
        "| problem | P | kind | fisherops first call s | fisherops ms | "
        "fisherops CPU ms | curvlinops ms | curvlinops CPU ms | fisherops / "
        "curvlinops |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for model, num_data in (("mlp", 512), ("cnn", 256)):
        problem = make_problem(model, num_data)
        data = (problem.params, problem.inputs, problem.targets)
        for kind in ("ggn", "mc"):
            run = build(problem, kind)
            start = time.perf_counter()
            block(run(*data))
            first = time.perf_counter() - start
            walls, cpus = [], []
            for _ in range(args.repeats):
                wall, cpu = time.perf_counter(), time.process_time()
                block(run(*data))
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
            wall, cpu = statistics.median(walls), statistics.median(cpus)
            theirs = curvlinops(
                spec(problem, model, kind, repeats=args.repeats, check=False)
            )
            print(
                f"| {problem.name} | {problem.num_params} | {kind} | {first:.2f} | "
                f"{wall * 1e3:.1f} | {cpu * 1e3:.1f} | {theirs['wall'] * 1e3:.1f} | "
                f"{theirs['cpu'] * 1e3:.1f} | {wall / theirs['wall']:.2f} |",
                flush=True,
            )
    print(f"\ntorch threads: {int(theirs['threads'])}")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--torch":
        run_torch(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.quick:
        args.repeats = 3
    import jax

    print(
        f"# bench_ekfac {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"jax {jax.__version__}, {jax.default_backend()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
        f"repeats {args.repeats}"
    )
    jax_side(args)
    print(f"\nload at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
