r"""Randomised estimates of a linear operator's trace, diagonal, spectral density
and extreme eigenpairs, from matrix-vector products only.

Every function takes any square lineax operator `A` (a fisherops curvature
operator, the Hessian, a `lineax.MatrixLinearOperator`, a sum with a prior...)
on params-shaped pytrees or flat vectors, a `key`, and a budget in products
(`num_matvecs`, or probes and Lanczos steps). The operator is `lineax.linearise`d
first (a fisherops operator then does its forward pass once for all products),
products go through `vmap` in blocks of up to 64 vectors, and every function is
compiled once per operator type, shapes and static arguments. Vectors inside are
flat `(P,)` in `jax.flatten_util.ravel_pytree` order; results that are vectors
(`diagonal`, eigenvectors) come back in that order (diagonal) or in the
operator's structure (eigenvectors).

The probe vectors of one call are `draw(fold_in(key, i))`, `i = 0, 1, ...`: a
fixed key gives a fixed estimate.
"""

from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Scalar

from . import _linalg
from ._checks import _check_key, _check_method, _check_positive_int
from ._lanczos import Which, _lanczos, _ritz_pairs, _tridiagonal_eigh
from ._logdet import _FlatMV, _unraveller

TraceMethod = Literal["hutchinson", "hutch++", "xtrace"]
DiagonalMethod = Literal["hutchinson", "xdiag"]

# Products are vmapped over blocks of at most this many vectors.
_BLOCK = 64


# --------------------------------------------------------------------------- #
# Products with many vectors, and probes.
# --------------------------------------------------------------------------- #


def _blocks(count: int) -> tuple[Array, Array]:
    """Indices `0 .. count-1` as `(num_blocks, block)` with a validity mask; the
    padding is less than one vector per block."""
    num_blocks = -(-count // _BLOCK)
    block = -(-count // num_blocks)
    indices = jnp.arange(num_blocks * block).reshape(num_blocks, block)
    return indices, indices < count


def _apply(matvec: Callable, rows: Float[Array, "k P"]) -> Float[Array, "k P"]:
    """`A x` for every row `x` of `rows`, vmapped in blocks."""
    count = rows.shape[0]
    indices, _ = _blocks(count)
    padded = jnp.concatenate(
        [rows, jnp.zeros((indices.size - count, rows.shape[1]), rows.dtype)]
    )
    products = lax.map(jax.vmap(matvec), padded[indices])
    return products.reshape(-1, rows.shape[1])[:count]


def _probe_sum(fn: Callable[[Array], Array], count: int) -> Array:
    """`sum_{i < count} fn(i)`, `fn` vmapped over blocks of indices."""
    indices, valid = _blocks(count)

    def block(total, block_data):
        index, mask = block_data
        values = jax.vmap(fn)(index)
        mask = mask.reshape(-1, *(1,) * (values.ndim - 1)).astype(values.dtype)
        return total + jnp.sum(mask * values, axis=0), None

    first = jax.eval_shape(fn, indices[0, 0])
    zero = jnp.zeros(first.shape, first.dtype)
    return lax.scan(block, zero, (indices, valid))[0]


def _rademacher(key, index, size: int, dtype) -> Float[Array, " P"]:
    return jax.random.rademacher(jax.random.fold_in(key, index), (size,), dtype)


def _gaussian(key, index, size: int, dtype) -> Float[Array, " P"]:
    return jax.random.normal(jax.random.fold_in(key, index), (size,), dtype)


def _draws(draw: Callable, key, indices: Array, size: int, dtype) -> Array:
    return jax.vmap(lambda i: draw(key, i, size, dtype))(indices)


def _complements(r: Float[Array, "s s"]) -> Float[Array, "s s"]:
    """Row `i`: a unit vector orthogonal to every column of `r` but column `i`
    (the direction the other sketches miss), from the smallest eigenvector of
    `R_{-i} R_{-i}^T`; unbatched decompositions one after another."""

    def one(i):
        kept = r * (jnp.arange(r.shape[1]) != i)[None, :]
        return _linalg.eigh(kept @ kept.T)[1][:, 0]

    return lax.map(one, jnp.arange(r.shape[1]))


class _Sketch(eqx.Module):
    """The shared part of XTrace and XDiag: test vectors `Ω` (rows), `Y = A Ω`,
    the orthonormal basis `Q` of `range(Y)` (rows), `Z = A Q`, and for each test
    vector `i` the unit vector `n_i` (in `Q`'s coordinates) that spans the
    complement of `range(Y_{-i})`: the projector of the sketch without vector
    `i` is `P_i = Q (I - n_i n_i^T) Q^T` (`n_i = 0` once `Y_{-i}` spans the
    space). `2 s` products."""

    omega: Array
    y: Array
    q: Array
    z: Array
    n: Array

    def __init__(self, matvec, key, draw, num_vectors: int, size: int, dtype):
        self.omega = _draws(draw, key, jnp.arange(num_vectors), size, dtype)
        self.y = _apply(matvec, self.omega)
        q, r = jnp.linalg.qr(self.y.T)
        self.q = q.T
        self.z = _apply(matvec, self.q)
        if num_vectors <= size:
            self.n = _complements(r)
        else:  # `Y_{-i}` has `size` columns: the whole space.
            self.n = jnp.zeros((num_vectors, self.q.shape[0]), dtype)


# --------------------------------------------------------------------------- #
# Checks.
# --------------------------------------------------------------------------- #


def _check_operator(operator, *, symmetric: bool) -> None:
    if not isinstance(operator, lx.AbstractLinearOperator):
        raise TypeError(
            "operator must be a lineax.AbstractLinearOperator; got "
            f"{type(operator).__name__}."
        )
    if operator.in_structure() != operator.out_structure():
        raise ValueError(
            "operator must map vectors to vectors of the same structure (a square "
            f"operator); got in_structure {operator.in_structure()} and "
            f"out_structure {operator.out_structure()}."
        )
    if symmetric and not lx.is_symmetric(operator):
        raise ValueError(
            "operator must be symmetric, and lineax must know it: lineax.is_symmetric"
            f"(operator) is False for {type(operator).__name__}. If it is, tag it: "
            "lineax.TaggedLinearOperator(operator, lineax.symmetric_tag)."
        )


def _flat_dtype(operator) -> jnp.dtype:
    return jnp.result_type(*jtu.tree_leaves(operator.in_structure()))


# --------------------------------------------------------------------------- #
# Trace.
# --------------------------------------------------------------------------- #


@eqx.filter_jit
def _trace(operator, key, count: int, method: str) -> Scalar:
    operator = lx.linearise(operator)
    matvec = _FlatMV(operator)
    size, dtype = operator.in_size(), _flat_dtype(operator)

    def quadratic(index):
        probe = _rademacher(key, index, size, dtype)
        return probe @ matvec(probe)

    if method == "hutchinson":
        return _probe_sum(quadratic, count) / count
    if method == "hutch++":
        # m/3 sketch vectors, m/3 for `A Q`, m/3 probes; with m >= 2P the
        # sketch is the whole space and no probes are left to draw.
        rank = size if count >= 2 * size else count // 3
        sketch = _apply(matvec, _draws(_rademacher, key, jnp.arange(rank), size, dtype))
        basis = jnp.linalg.qr(sketch.T)[0].T
        exact = jnp.sum(basis * _apply(matvec, basis))
        remaining = 0 if rank == size else count - 2 * rank
        if remaining == 0:
            return exact

        def deflated(index):
            probe = _rademacher(key, rank + index, size, dtype)
            probe = probe - (basis @ probe) @ basis
            return probe @ matvec(probe)

        return exact + _probe_sum(deflated, remaining) / remaining
    # XTrace: the mean over `i` of tr(P_i A P_i) + d u_i^T A u_i / |u_i|^2 with
    # u_i = (I - P_i) ω_i, d = P - rank(P_i): for Gaussian ω_i, u_i/|u_i| is
    # uniform on the unit sphere of range(I - P_i), so each term is unbiased, and
    # exact once d = 1.
    num_vectors = min(size, count // 2)
    sketch = _Sketch(matvec, key, _gaussian, num_vectors, size, dtype)
    h = sketch.q @ sketch.z.T  # Q^T A Q
    w = sketch.omega @ sketch.q.T  # rows: Q^T ω_i
    c = w - sketch.n * jnp.sum(sketch.n * w, axis=1, keepdims=True)
    u = sketch.omega - c @ sketch.q
    au = sketch.y - c @ sketch.z
    missed = size - num_vectors + 1
    projected = jnp.trace(h) - jnp.einsum("ij,jk,ik->i", sketch.n, h, sketch.n)
    residual = missed * jnp.sum(u * au, axis=1) / jnp.sum(u * u, axis=1)
    return jnp.mean(projected + residual)


def trace(
    operator: lx.AbstractLinearOperator,
    key: PRNGKeyArray,
    *,
    num_matvecs: int,
    method: TraceMethod = "hutch++",
) -> Scalar:
    r"""An estimate of `tr(A)` from `num_matvecs` products with `A`.

    - `"hutchinson"`: `(1/m) Σ_i z_i^T A z_i` with Rademacher `z_i`; unbiased,
      error `O(|A|_F / sqrt(m))`.
    - `"hutch++"` (Meyer, Musco, Musco, Woodruff 2021): `tr(Q^T A Q)` on the
      basis `Q` of `A S` for `m/3` Rademacher vectors `S`, plus Hutchinson with
      the remaining products on `(I - QQ^T) A (I - QQ^T)`. Unbiased; the error
      falls like `1/m` for a fast-decaying spectrum. Exact once `m >= 2P`.
    - `"xtrace"` (Epperly, Tropp, Webber 2024): every one of `s = m/2` Gaussian
      test vectors is used both in the low-rank part and in the residual
      (leave-one-out Hutch++, averaged), with the residual normalised. Unbiased;
      exact once `m >= 2P`.

    **Arguments:**

    - `operator`: a square lineax operator (params pytrees or flat vectors).
    - `key`: a `jax.random.key`.
    - `num_matvecs`: the budget `m` of products with `A` (an int `>= 1`;
      `"hutch++"` needs `>= 3`, `"xtrace"` `>= 2`).
    - `method`: `"hutchinson"`, `"hutch++"` (default) or `"xtrace"`.

    **Returns:** the scalar estimate.
    """
    _check_operator(operator, symmetric=False)
    method = _check_method("method", method, ("hutchinson", "hutch++", "xtrace"))
    _check_key(key)
    count = _check_positive_int("num_matvecs", num_matvecs)
    least = {"hutchinson": 1, "hutch++": 3, "xtrace": 2}[method]
    if count < least:
        raise ValueError(
            f"num_matvecs must be >= {least} for method={method!r}; got {count}."
        )
    return _trace(operator, key, count, method)


# --------------------------------------------------------------------------- #
# Diagonal.
# --------------------------------------------------------------------------- #


@eqx.filter_jit
def _diagonal(operator, key, count: int, method: str) -> Float[Array, " P"]:
    operator = lx.linearise(operator)
    matvec = _FlatMV(operator)
    size, dtype = operator.in_size(), _flat_dtype(operator)
    if method == "hutchinson":

        def product(index):
            probe = _rademacher(key, index, size, dtype)
            return probe * matvec(probe)

        return _probe_sum(product, count) / count
    # XDiag: the mean over `i` of diag(P_i A) + ω_i ⊙ (I - P_i) A ω_i, with A
    # symmetric (Q^T A = Z^T); exact once the other vectors' sketch spans the space.
    num_vectors = min(size + 1, count // 2)
    sketch = _Sketch(matvec, key, _rademacher, num_vectors, size, dtype)
    low_rank = jnp.sum(sketch.q * sketch.z, axis=0)  # diag(Q Z^T)
    missed = jnp.mean((sketch.n @ sketch.q) * (sketch.n @ sketch.z), axis=0)
    v = sketch.omega @ sketch.z.T  # rows: Z^T ω_i
    c = v - sketch.n * jnp.sum(sketch.n * v, axis=1, keepdims=True)
    residual = jnp.mean(sketch.omega * (sketch.y - c @ sketch.q), axis=0)
    return low_rank - missed + residual


def diagonal(
    operator: lx.AbstractLinearOperator,
    key: PRNGKeyArray,
    *,
    num_matvecs: int,
    method: DiagonalMethod = "xdiag",
) -> Float[Array, " P"]:
    r"""An estimate of `diag(A)` from `num_matvecs` products with `A`.

    - `"hutchinson"`: `(1/m) Σ_i z_i ⊙ A z_i` with Rademacher `z_i` (Bekas,
      Kokiopoulou, Saad 2007); unbiased.
    - `"xdiag"` (Epperly, Tropp, Webber 2024): for each of `s = m/2` Rademacher
      test vectors, `diag(P_i A) + ω_i ⊙ (I - P_i) A ω_i` with `P_i` the
      projector on the sketch `A Ω` of the other vectors, averaged. Unbiased for
      a symmetric `A`; exact once `m >= 2P + 2`.

    **Arguments:** as [`fisherops.estimate.trace`][]; `"xdiag"` needs a
    symmetric operator (`lineax.is_symmetric`) and `num_matvecs >= 2`.

    **Returns:** the flat `(P,)` estimate, in `jax.flatten_util.ravel_pytree`
    order (as `lineax.diagonal`).
    """
    method = _check_method("method", method, ("hutchinson", "xdiag"))
    _check_operator(operator, symmetric=method == "xdiag")
    _check_key(key)
    count = _check_positive_int("num_matvecs", num_matvecs)
    if method == "xdiag" and count < 2:
        raise ValueError(f"num_matvecs must be >= 2 for method='xdiag'; got {count}.")
    return _diagonal(operator, key, count, method)


# --------------------------------------------------------------------------- #
# Spectral density and eigenpairs: Lanczos.
# --------------------------------------------------------------------------- #


@eqx.filter_jit
def _quadrature(operator, key, num_probes: int, num_steps: int):
    """Gauss quadrature nodes `(S, m)` and weights `(S, m)` (each probe's sum to
    1) of the spectral measure, one Lanczos run per probe, one after another."""
    operator = lx.linearise(operator)
    matvec = _FlatMV(operator)
    size, dtype = operator.in_size(), _flat_dtype(operator)

    def one_probe(index):
        _, alphas, betas = _lanczos(
            matvec, _rademacher(key, index, size, dtype), num_steps
        )
        nodes, vectors = _tridiagonal_eigh(alphas, betas)
        return nodes, vectors[0] ** 2

    return lax.map(one_probe, jnp.arange(num_probes))


@eqx.filter_jit
def _smoothed(nodes, weights, grid, sigma, num_points: int):
    if grid is None:
        low, high = jnp.min(nodes), jnp.max(nodes)
        spread = jnp.maximum(high - low, jnp.finfo(nodes.dtype).eps * jnp.abs(high))
        if sigma is None:
            sigma = 0.01 * spread
        grid = jnp.linspace(low - 5 * sigma, high + 5 * sigma, num_points)
    elif sigma is None:
        sigma = 0.01 * (jnp.max(nodes) - jnp.min(nodes))
    sigma = jnp.asarray(sigma, nodes.dtype)
    kernels = jnp.exp(-0.5 * ((grid[:, None] - nodes.reshape(1, -1)) / sigma) ** 2)
    density = kernels @ weights.reshape(-1) / (weights.shape[0] * sigma)
    return grid, density / jnp.sqrt(2 * jnp.pi).astype(nodes.dtype)


def spectral_density(
    operator: lx.AbstractLinearOperator,
    key: PRNGKeyArray,
    *,
    num_probes: int = 8,
    num_lanczos_steps: int = 64,
    grid: Float[Array, " G"] | None = None,
    num_points: int = 512,
    sigma: float | None = None,
) -> tuple[Float[Array, " G"], Float[Array, " G"]]:
    r"""The spectral density of a symmetric `A` by stochastic Lanczos quadrature.

    $$\phi(t) = \frac1S \sum_{s=1}^S \sum_{k=1}^m w_{sk}\,
    \mathcal N(t;\ \theta_{sk}, \sigma^2) \approx \frac1P \sum_{j=1}^P
    \mathcal N(t;\ \lambda_j, \sigma^2),$$

    with `θ_sk` the Ritz values of `m` Lanczos steps (full reorthogonalisation)
    from the Rademacher probe `s` and `w_sk` the squared first components of the
    Ritz vectors (each probe's weights sum to 1, so `φ` integrates to 1). Any
    symmetric spectrum, indefinite (the Hessian) too. The probes run one after
    another: memory `m x P`. `S m` products in all.

    **Arguments:**

    - `operator`: a symmetric lineax operator (`lineax.is_symmetric`).
    - `key`: a `jax.random.key`; probe `s` is `rademacher(fold_in(key, s))`.
    - `num_probes`, `num_lanczos_steps`: `S` and `m` (capped at `P`).
    - `grid`: the points `t` to evaluate `φ` at; by default `num_points` points
      from the smallest Ritz value `- 5σ` to the largest `+ 5σ`.
    - `sigma`: the Gaussian kernel's width; by default 1% of the range of the
      Ritz values.

    **Returns:** `(grid, density)`, both `(G,)`.
    """
    _check_operator(operator, symmetric=True)
    _check_key(key)
    num_probes = _check_positive_int("num_probes", num_probes)
    steps = min(
        _check_positive_int("num_lanczos_steps", num_lanczos_steps),
        operator.in_size(),
    )
    num_points = _check_positive_int("num_points", num_points)
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be > 0 (or None); got {sigma!r}.")
    nodes, weights = _quadrature(operator, key, num_probes, steps)
    if grid is not None:
        grid = jnp.asarray(grid, nodes.dtype)
        if grid.ndim != 1:
            raise ValueError(f"grid must be one-dimensional; got shape {grid.shape}.")
    return _smoothed(nodes, weights, grid, sigma, num_points)


@eqx.filter_jit
def _eigenpairs(operator, key, num_pairs: int, num_steps: int, which: str):
    operator = lx.linearise(operator)
    size, dtype = operator.in_size(), _flat_dtype(operator)
    values, rows = _ritz_pairs(
        _FlatMV(operator), _gaussian(key, 0, size, dtype), num_steps, num_pairs, which
    )
    return values, jax.vmap(_unraveller(operator.in_structure()))(rows)


def eigenpairs(
    operator: lx.AbstractLinearOperator,
    key: PRNGKeyArray,
    *,
    num_pairs: int,
    num_matvecs: int | None = None,
    which: Which = "largest",
) -> tuple[Float[Array, " k"], PyTree[Float[Array, "k ..."]]]:
    r"""Extreme eigenpairs of a symmetric `A` by Lanczos with full
    reorthogonalisation from one Gaussian start vector (the same Lanczos as the
    spectral density, SLQ and the low-rank curvature).

    **Arguments:**

    - `operator`: a symmetric lineax operator (`lineax.is_symmetric`).
    - `key`: a `jax.random.key` for the start vector.
    - `num_pairs`: `k`, the number of pairs.
    - `num_matvecs`: Lanczos steps, one product each (`>= k`, capped at `P`; by
      default `min(P, max(2k + 20, 40))`). The extreme pairs converge first;
      with `P` steps the pairs are exact to rounding.
    - `which`: `"largest"` (algebraically, descending: the top of a Hessian's
      spectrum), `"smallest"` (ascending: its most negative) or `"magnitude"`
      (descending `|λ|`).

    **Returns:** `(values, vectors)`: `values` `(k,)`; `vectors` orthonormal, in
    the operator's structure with a leading axis of size `k` (vector `j` is
    `jax.tree.map(lambda leaf: leaf[j], vectors)`; a `(k, P)` array for an
    operator on flat vectors).
    """
    _check_operator(operator, symmetric=True)
    _check_key(key)
    which = _check_method("which", which, ("largest", "smallest", "magnitude"))
    size = operator.in_size()
    num_pairs = _check_positive_int("num_pairs", num_pairs)
    if num_pairs > size:
        raise ValueError(
            f"num_pairs must be at most the operator's size {size}; got {num_pairs}."
        )
    if num_matvecs is None:
        num_matvecs = max(2 * num_pairs + 20, 40)
    steps = min(_check_positive_int("num_matvecs", num_matvecs), size)
    if steps < num_pairs:
        raise ValueError(
            f"num_matvecs must be >= num_pairs = {num_pairs}; got {num_matvecs}."
        )
    return _eigenpairs(operator, key, num_pairs, steps, which)
