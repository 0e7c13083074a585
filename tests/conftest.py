"""Shared pytest configuration.

- Every test runs with 64-bit types on unless it turns them off itself
  (`tests/test_float32.py` does, per test, with `jax.enable_x64(False)`).
- Batched LAPACK calls are watched (issue 10.9). jaxlib's CPU LAPACK kernels
  split a batch into tasks on XLA's intra-op thread pool and block until they
  finish; two such calls running at once on a 2-core machine can each hold one
  of the pool's two threads and wait forever for the other's tasks
  (`tests/repro_lapack_deadlock.py` reproduces it). Every batched LAPACK call
  traced during the session (a decomposition of a stack of matrices, e.g.
  `jnp.linalg.inv`, `slogdet`, `cholesky` or `eigh` under `vmap`) gives a
  `BatchedLapackWarning` at the line of the package or test that asked for it
  (pytest's warnings summary lists them); the `batched_lapack_calls` fixture
  lists the ones a test traced, so a test can require none
  (`tests/test_no_batched_lapack.py` does for the library's decompositions).
  Dense references in tests use numpy (`np.linalg`) or unbatched calls
  (`jax.lax.map`) instead. `pytest-timeout` (pyproject.toml) turns any hang that
  remains into a failure with every thread's stack.
"""

import os
import tempfile
import traceback
import warnings
from pathlib import Path

# The suite's time is XLA's compile time: thousands of small programs (one per
# operator method, static configuration and shape), each run a few times on tiny
# data. LLVM's optimisation level 0 halves compile time (a test_mc case: 5.9 s
# -> 3.0 s of compilation; the suite 1050 s -> 880 s) and changes nothing the
# tests check. Subprocesses (notebook kernels, the sharding scripts) inherit it.
# Set before jax starts.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()
# The LAPACK that jaxlib calls on CPU is scipy's OpenBLAS, whose threads spin
# while they wait: next to XLA's own threads (and a second pytest worker) they
# slow a decomposition down many times over. One thread each.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.lax.linalg  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)

# Compiled programs are shared between test modules through a persistent cache
# in a temporary folder (removed at exit): modules build the same operators on
# the same shapes, and the cache takes a third off the suite's time. Tests that
# count compilations count its hits too (`tests/_reference.py`).
_CACHE = tempfile.TemporaryDirectory(prefix="fisherops-tests-xla-")
jax.config.update("jax_compilation_cache_dir", _CACHE.name)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# The jax primitives that run a jaxlib LAPACK kernel on CPU.
LAPACK_PRIMITIVES = (
    "cholesky",
    "eig",
    "eigh",
    "hessenberg",
    "householder_product",
    "lu",
    "ormqr",
    "qr",
    "schur",
    "svd",
    "triangular_solve",
    "tridiagonal",
    "tridiagonal_solve",
)


class BatchedLapackWarning(UserWarning):
    """A LAPACK decomposition of a stack of matrices was traced (see above)."""


_calls: list[tuple[str, tuple[int, ...], str]] = []


def _origin() -> traceback.FrameSummary | None:
    """The innermost frame in the package or the tests: who asked for the call."""
    for frame in reversed(traceback.extract_stack()):
        folder = Path(frame.filename).parent.name
        if frame.filename != __file__ and folder in ("fisherops", "tests"):
            return frame
    return None


def _watching(name, primitive):
    bind = primitive.bind

    def watched_bind(*args, **params):
        # The matrix operand: `b` (..., m, k) for tridiagonal_solve, else the first.
        shape = jax.numpy.shape(args[-1 if name == "tridiagonal_solve" else 0])
        if len(shape) > 2 and any(size > 1 for size in shape[:-2]):
            frame = _origin()
            where = f"{frame.filename}:{frame.lineno}" if frame else "unknown"
            _calls.append((name, shape, where))
            warnings.warn_explicit(
                f"batched LAPACK call {name} on shape {shape} (from {where}): two "
                "of these at once can deadlock jaxlib's CPU thread pool; use "
                "np.linalg or jax.lax.map over the batch",
                BatchedLapackWarning,
                frame.filename if frame else "unknown",
                frame.lineno if frame else 0,
            )
        return bind(*args, **params)

    primitive.bind = watched_bind


for _name in LAPACK_PRIMITIVES:
    _watching(_name, getattr(jax.lax.linalg, f"{_name}_p"))


@pytest.fixture
def batched_lapack_calls():
    """`calls()`: the batched LAPACK calls `(primitive, shape, "file:line")`
    traced since the test started. A function compiled earlier in the session is
    not traced again: give the test shapes of its own."""
    start = len(_calls)
    return lambda: list(_calls[start:])


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module.

    XLA:CPU maps each executable's code into memory; the whole suite compiles
    thousands of programs, and one long process then ran out of memory maps
    (`vm.max_map_count`, 65530) and segfaulted inside XLA's compiler. Modules do
    not share compiled programs, so releasing them costs nothing.
    """
    yield
    jax.clear_caches()
