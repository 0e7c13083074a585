"""Standalone reproduction of the jaxlib CPU LAPACK deadlock (issue 10.9).

Not collected by pytest (the name does not start with ``test_``). Run it as

    timeout 300 python tests/repro_lapack_deadlock.py --variant vmap

on a 2-core machine (or under ``taskset -c 0,1``). It jit-compiles one function
holding two INDEPENDENT batched LAPACK calls (an LU for ``inv`` and an LU for
``slogdet``, as ``tests/test_laplace.py``'s dense evidence reference had) and
calls it repeatedly with new arrays.

What happens: XLA:CPU runs the two independent custom calls concurrently, each
on a worker of the intra-op (``tf_XLAEigen``) pool. jaxlib's batched LAPACK
kernels split their batch with ``ParallelBatchMap`` into tasks scheduled on that
SAME pool and block in ``BlockingCounter::Wait``. With two workers, both are
blocked waiting for tasks that no free worker can run: every thread in
``futex_do_wait``, 0% CPU, forever.

A watchdog thread reports ``DEADLOCK`` (exit code 3) when no call finished and
the process used under 0.2 s of CPU in the last ``--stall`` seconds (a slow but
live process keeps using CPU); with ``--gdb`` it first prints every native
thread's stack.

Variants (``--variant``):

- ``vmap``: ``jax.vmap(jnp.linalg.inv)`` and ``jax.vmap(jnp.linalg.slogdet)``
  (batched custom calls: the trigger).
- ``vmap-dependent``: the same two batched calls, the second on the first's
  result (never concurrent).
- ``vmap-one``: one batched call next to an independent batched matmul.
- ``two-programs``: one jitted ``vmap(inv)`` called twice without waiting in
  between.
- ``map``: the same via ``jax.lax.map`` (one unbatched LAPACK call per step).
- ``numpy``: ``np.linalg.inv`` / ``np.linalg.slogdet`` (no XLA at all).

XLA flags are read from the environment as usual, e.g.
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``.

Measured on the 2-core development machine (jax/jaxlib 0.10.2, 100 calls of
601 31x31 matrices each, a run counted as hung when the watchdog fired):
``vmap`` hung in 4 of 6 runs, with ``--xla_cpu_multi_thread_eigen=false`` in 2
of 6, with ``JAX_CPU_ENABLE_ASYNC_DISPATCH=false`` in 2 of 5; ``vmap-dependent``
0 of 4, ``vmap-one`` 0 of 4, ``two-programs`` 0 of 4, ``map`` 0 of 4, ``numpy``
0 of 3. Neither flag prevents it; only never running two batched calls at once
does (unbatched decompositions, or numpy for test references), at no cost here:
``slogdet`` of 601 31x31 matrices took 31.0 ms batched, 26.6 ms by ``lax.map``,
20.1 ms in numpy.
"""

import argparse
import os
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)


VARIANTS = ["vmap", "vmap-dependent", "vmap-one", "two-programs", "map", "numpy"]


def _functions(variant):
    if variant == "vmap":
        return jax.jit(
            lambda a, b: (jax.vmap(jnp.linalg.inv)(a), jax.vmap(jnp.linalg.slogdet)(b))
        )
    if variant == "vmap-dependent":
        # The same two batched calls, but the second needs the first's result, so
        # XLA cannot run them at the same time.
        return jax.jit(
            lambda a, b: jax.vmap(jnp.linalg.slogdet)(b + jax.vmap(jnp.linalg.inv)(a))
        )
    if variant == "vmap-one":
        # One batched LAPACK call next to independent non-LAPACK work.
        return jax.jit(lambda a, b: (jax.vmap(jnp.linalg.inv)(a), jnp.tanh(b @ b)))
    if variant == "two-programs":
        # One batched call per program, two programs dispatched back to back
        # (asynchronous dispatch lets them run at the same time).
        inverse = jax.jit(jax.vmap(jnp.linalg.inv))
        return lambda a, b: (inverse(a), inverse(b))
    if variant == "map":
        return jax.jit(
            lambda a, b: (
                jax.lax.map(jnp.linalg.inv, a),
                jax.lax.map(jnp.linalg.slogdet, b),
            )
        )
    return lambda a, b: (np.linalg.inv(a), np.linalg.slogdet(b))


def _native_stacks():
    subprocess.run(
        ["gdb", "-p", str(os.getpid()), "-batch", "-ex", "thread apply all bt 12"],
        check=False,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, default="vmap")
    parser.add_argument("--batch", type=int, default=601)
    parser.add_argument("--size", type=int, default=31)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--stall", type=float, default=20.0)
    parser.add_argument("--gdb", action="store_true")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    eye = args.size * np.eye(args.size)
    a = rng.normal(size=(args.batch, args.size, args.size)) + eye
    b = rng.normal(size=(args.batch, args.size, args.size)) + eye
    function = _functions(args.variant)

    done = [0]

    def watchdog():
        last_done, last_cpu = -1, time.process_time()
        while True:
            time.sleep(args.stall)
            cpu = time.process_time()
            if done[0] == last_done and cpu - last_cpu < 0.2:
                print(
                    f"DEADLOCK after {done[0]} calls: no progress and "
                    f"{cpu - last_cpu:.2f} s CPU in {args.stall:.0f} s",
                    flush=True,
                )
                if args.gdb:
                    _native_stacks()
                os._exit(3)
            last_done, last_cpu = done[0], cpu

    threading.Thread(target=watchdog, daemon=True).start()
    start = time.perf_counter()
    for i in range(args.calls):
        jax.block_until_ready(function(a + i, b - i))
        done[0] += 1
    elapsed = time.perf_counter() - start
    print(
        f"ok: {args.calls} calls of variant {args.variant!r} in {elapsed:.2f} s "
        f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
