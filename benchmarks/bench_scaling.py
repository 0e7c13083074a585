"""Scaling of one curvature-vector product: sharded over devices, and streamed.

    python benchmarks/bench_scaling.py                 # the full run
    python benchmarks/bench_scaling.py --quick         # a fast smoke run
    python benchmarks/bench_scaling.py --devices 1,2,4,8,16

Problem: the MLP 32-256-256-10 with cross-entropy on N=4096 points, float32.

- Strong scaling: for each device count d, a fresh process with
  `XLA_FLAGS=--xla_force_host_platform_device_count=d` (CPU devices) shards the
  data over d devices (`fisherops.shard_data`) and times the jitted
  "build the operator from (params, data), one mv" for the empirical Fisher,
  unchunked and with `chunk_size=512`, and for the MC Fisher (M=1). The data is
  fixed, so perfect scaling would divide the time by d. Forced host devices share
  the machine's cores: with fewer cores than devices this shows the SPMD
  overhead, not a speed-up.
- Streaming: in this process (default backend), the in-memory EF mv on all N
  points against `fisherops.StreamedOperator` over numpy batches (host to device
  copies included), for a few batch sizes; throughput in data points per second.

Each timed function is compiled and warmed up, then called `--repeats` times; the
table shows medians.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys

HERE = pathlib.Path(__file__).parent
NUM_DATA = 4096
CHUNK_SIZE = 512


def worker(repeats: int) -> dict:
    """One device count: runs in its own process (see `strong_scaling`)."""
    import functools as ft

    import jax
    from _problems import make_problem
    from _timing import median_seconds

    import fisherops as fo

    problem = make_problem("mlp", NUM_DATA)
    data = fo.shard_data((problem.inputs, problem.targets))
    vector = problem.params
    key = jax.random.key(0)

    def ef(params, inputs, targets, chunk_size=None):
        op = fo.EmpiricalFisherOperator(
            problem.model_fn,
            params,
            (inputs, targets),
            problem.loss,
            chunk_size=chunk_size,
        )
        return op.mv(vector)

    def mc(params, inputs, targets):
        op = fo.MCFisherOperator(
            problem.model_fn, params, (inputs, targets), problem.loss, key
        )
        return op.mv(vector)

    result = {"devices": jax.device_count()}
    for name, fn in (
        ("EF mv", ef),
        (f"EF mv chunk {CHUNK_SIZE}", ft.partial(ef, chunk_size=CHUNK_SIZE)),
        ("MC mv", mc),
    ):
        compiled = jax.jit(fn).lower(problem.params, *data).compile()
        result[name] = median_seconds(
            ft.partial(compiled, problem.params, *data), repeats, warmup=2
        )
        result[f"{name} all-reduces"] = compiled.as_text().count("all-reduce(")
    return result


def strong_scaling(device_counts, repeats: int) -> list[dict]:
    rows = []
    for count in device_counts:
        env = {
            **os.environ,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}",
            "JAX_PLATFORMS": "cpu",
        }
        command = [sys.executable, __file__, "--worker", "--repeats", str(repeats)]
        out = subprocess.run(
            command, env=env, cwd=HERE, capture_output=True, text=True, timeout=1200
        )
        if out.returncode:
            raise RuntimeError(out.stderr)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def streaming(batch_sizes, repeats: int) -> list[tuple[str, float]]:
    import functools as ft

    import jax
    import numpy as np
    from _problems import make_problem
    from _timing import median_seconds

    import fisherops as fo

    problem = make_problem("mlp", NUM_DATA)
    vector = problem.params

    def operator(batch):
        return fo.EmpiricalFisherOperator(
            problem.model_fn, problem.params, batch, problem.loss
        )

    in_memory = jax.jit(lambda data: operator(data).mv(vector))
    data = (problem.inputs, problem.targets)
    rows = [("in memory", median_seconds(lambda: in_memory(data), repeats, warmup=2))]
    inputs, targets = (np.asarray(leaf) for leaf in data)
    for size in batch_sizes:
        batches = [
            (inputs[i : i + size], targets[i : i + size])
            for i in range(0, NUM_DATA, size)
        ]
        streamed = fo.StreamedOperator(operator, batches)
        seconds = median_seconds(ft.partial(streamed.mv, vector), repeats, warmup=2)
        rows.append((f"streamed, batches of {size}", seconds))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 devices max, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--devices", default="1,2,4,8", help="device counts")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 20)
    if args.worker:
        print(json.dumps(worker(repeats)))
        return
    device_counts = [int(d) for d in args.devices.split(",")]
    if args.quick:
        device_counts = [d for d in device_counts if d <= 2]

    import jax

    print(f"fisherops scaling benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(f"jax {jax.__version__}, {os.cpu_count()} CPU cores ({platform.processor()})")
    print(f"MLP 32-256-256-10, cross-entropy, N={NUM_DATA}, float32, ", end="")
    print(f"medians of {repeats} calls\n")

    rows = strong_scaling(device_counts, repeats)
    names = [
        name for name in rows[0] if name != "devices" and "all-reduces" not in name
    ]
    print("Strong scaling over forced CPU host devices (ms; speed-up vs 1 device)\n")
    print("| devices | " + " | ".join(names) + " |")
    print("|---:|" + "---:|" * len(names))
    first = rows[0]
    for row in rows:
        cells = [
            f"{row[name] * 1e3:.2f} ({first[name] / row[name]:.2f}x)" for name in names
        ]
        print(f"| {row['devices']} | " + " | ".join(cells) + " |")
    reduces = {name: rows[-1][f"{name} all-reduces"] for name in names}
    print(
        f"\nall-reduces in the compiled HLO on {rows[-1]['devices']} devices: {reduces}"
    )

    device = jax.devices()[0]
    print(
        f"\nStreamed vs in memory, EF mv, on {device.platform} ({device.device_kind})\n"
    )
    print("| operator | ms per mv | points / s |")
    print("|---|---:|---:|")
    for name, seconds in streaming([256, 1024], repeats):
        print(f"| {name} | {seconds * 1e3:.2f} | {NUM_DATA / seconds:,.0f} |")


if __name__ == "__main__":
    main()
