"""Wall-clock timing shared by the benchmark scripts."""

import statistics
import time


def median_seconds(fn, repeats: int, *, warmup: int = 1, cap: float | None = None):
    """The median wall time of `repeats` calls of `fn()`, each blocked until its
    results are ready, after `warmup` untimed calls (compilation). With `cap`,
    timing stops after the first call that takes longer than `cap` seconds.

    jax is imported here, not at the top, so that a script can set up devices
    (`XLA_FLAGS`) before it starts.
    """
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
        if cap is not None and times[-1] > cap:
            break
    return statistics.median(times)
