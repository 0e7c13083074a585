"""One of several JAX processes on this machine: `test_sharding.py` starts them.

    python _multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_FILE

Each process has 2 CPU devices and holds its own contiguous part of the data;
`fisherops.shard_data(..., process_local=True)` makes the global arrays, sharded
over the devices of all processes. Process 0 saves the MC Fisher's mv and CG
solve to OUT_FILE.
"""

import sys

import jax

process_id, num_processes, port, out_file = sys.argv[1:]
process_id, num_processes = int(process_id), int(num_processes)
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_num_cpu_devices", 2)
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=num_processes,
    process_id=process_id,
    coordinator_bind_address=f"127.0.0.1:{port}",
    initialization_timeout=60,
)

import numpy as np  # noqa: E402
from _scaling import DATA, NUM_DATA, mv, quantities  # noqa: E402

import fisherops as fo  # noqa: E402

CHUNK_SIZE = 8  # 2 points per device per chunk, on 4 devices


def main():
    assert jax.process_count() == num_processes
    per_process = NUM_DATA // num_processes
    mine = slice(process_id * per_process, (process_id + 1) * per_process)
    local = tuple(np.asarray(leaf)[mine] for leaf in DATA)
    data = fo.shard_data(local, process_local=True)
    # The Monte-Carlo Fisher: its samples depend on each point's global index.
    product, solution = jax.jit(
        lambda inputs, targets: (
            mv("mc", inputs, targets, CHUNK_SIZE),
            quantities("mc", inputs, targets, CHUNK_SIZE)["cg"],
        )
    )(*data)
    if process_id == 0:
        np.savez(out_file, mv=product, cg=solution)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
