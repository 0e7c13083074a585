r"""Kronecker-factored curvature (KFAC) with exact damped inverses.

For a layer with weight `W` (`D_in x D_out`) and bias `b` (appended to `W` as a
last row, so that `W` and `b` form one block), input `a_{n,r}` (with a 1
appended when there is a bias) and `g_{n,r,k}` the backpropagation to the layer's
output of column `k` of the likelihood factor `B_n`, KFAC approximates the
curvature block of the layer by

$$\text{scale}\; A \otimes G, \qquad
A = \frac{1}{N R} \sum_{n, r} a_{n,r} a_{n,r}^\top, \qquad
G = \sum_{n, r, k} g_{n,r,k} g_{n,r,k}^\top,$$

block-diagonal across layers. `r` runs over the `R` rows a layer shares its
weight across on one datum: `R = 1` for a dense layer on a vector, the positions
of a sequence, the output locations of a convolution ("expand", Eschenhagen et
al. 2023; `weight_sharing="reduce"` averages `a` and sums `g` over the rows
first and divides `A` by `N` only). Params in no recognised layer get the exact
diagonal of the curvature.

With `A = U diag(α) U^T` and `G = Q diag(γ) Q^T`, the damped matrix
`scale A ⊗ G + Λ` has an exact inverse, log-determinant and square root whenever
`Λ` is `λ_W` on the weight and `λ_b` on the bias of each layer (a scalar or one
scalar per params leaf): the bias row's different precision is a rank-one update
in the `A` factor, handled by Sherman-Morrison per eigenvalue of `G`.
"""

import abc
import functools as ft
from collections.abc import Callable, Hashable
from typing import Any, Literal, Self

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Real, Scalar

from . import _core, _layers, _linalg
from ._checks import _check_like, _check_method
from ._operators import (
    AbstractCurvatureOperator,
    EmpiricalFisherOperator,
    GGNOperator,
    MCFisherOperator,
    _AbstractScalable,
)
from ._priors import PriorPrecision
from ._queries import register_symmetric_psd

_HIGHEST = jax.lax.Precision.HIGHEST


class _PerDatum(eqx.Module):
    """`model_fn` on one datum, whatever `vmap_over_data`."""

    model_fn: Callable
    vmap_over_data: bool = eqx.field(static=True)

    def __call__(self, x, params):
        if self.vmap_over_data:
            return self.model_fn(x, params)
        batch = jtu.tree_map(lambda leaf: jnp.asarray(leaf)[None], x)
        return self.model_fn(batch, params)[0]


def _example(inputs: PyTree) -> PyTree[jax.ShapeDtypeStruct]:
    return jtu.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(jnp.shape(leaf)[1:], jnp.result_type(leaf)),
        inputs,
    )


def _gram(rows: Float[Array, "m d"]) -> Float[Array, "d d"]:
    return jnp.matmul(rows.T, rows, precision=_HIGHEST)


def _merged_columns(curvature, outputs, targets) -> Array | None:
    """For the GGN of a structured output `(T, C)`, the Hessian root's blocks over
    the `T` positions stacked: `(n, O, K)` columns with `K = C`, where `B_n` has
    `T C` (`None` where that changes nothing: other operators, one position)."""
    if not isinstance(curvature, GGNOperator):
        return None
    likelihood = curvature.likelihood
    targets = likelihood.prepare_targets(targets, outputs)
    blocks = jax.vmap(likelihood.hessian_sqrt_blocks)(outputs, targets)
    if blocks.shape[1] == 1:
        return None
    return blocks.reshape(blocks.shape[0], -1, blocks.shape[-1]).astype(outputs.dtype)


def _per_datum(
    curvature,
    structure: _layers.Structure,
    single: _PerDatum,
    merge_positions: bool = False,
):
    """`terms(chunk, indices, weights)`: each layer's inputs and output gradients.

    For every layer, the inputs `a (n, R, D_in (+1))` (a 1 appended for the bias)
    and the backpropagations `g (K, n, R, D_out)` of the `K` likelihood factor
    columns to its output; and, for each other param, the per-datum gradients
    `(K, n, ...)`. Padding points (weight 0) get zero `a` and `g`.

    `merge_positions`: for the GGN of a structured output, the layers' `g` come
    from the per-position Hessian roots stacked (`_merged_columns`: `C` backward
    passes for all `T` positions at once, where `B_n` takes `T C`). The other
    params' gradients still come from `B_n` (their exact diagonal), in a second
    set of backward passes when there are other params.

    One batched pass per chunk: a forward pass with zero taps on the layer outputs
    that records the layer inputs, then `K` `vjp`s to the taps (and to per-datum
    copies of the other params), never one pass per datum.
    """
    params = curvature.params
    leaves = jtu.tree_leaves(params)
    jaxpr = _layers.flat_jaxpr(single, params, _example(curvature.data[0]))
    layers, other = structure.layers, structure.other
    eqns = jaxpr.jaxpr.eqns
    tap_dtypes = [eqns[layer.eqn].outvars[0].aval.dtype for layer in layers]

    def one(x_leaves, taps, other_leaves):
        p = list(leaves)
        for i, value in zip(other, other_leaves, strict=True):
            p[i] = value
        return _layers.run_tapped(jaxpr, structure, p, x_leaves, taps)

    def terms(chunk, indices, weights):
        chunk_inputs, chunk_targets = chunk
        n = indices.shape[0]
        taps = tuple(
            jnp.zeros((n, *layer.output_shape), dtype)
            for layer, dtype in zip(layers, tap_dtypes, strict=True)
        )
        others = tuple(
            jnp.broadcast_to(leaves[i], (n, *leaves[i].shape)) for i in other
        )
        x_leaves = jtu.tree_leaves(chunk_inputs)

        def forward(taps, others):
            return jax.vmap(one)(x_leaves, taps, others)

        outputs, vjp_fn, activations = jax.vjp(forward, taps, others, has_aux=True)

        def backward(b):
            b = b * weights[:, None, None].astype(b.dtype)
            cotangents = jnp.moveaxis(b, 2, 0).reshape((b.shape[2], *outputs.shape))
            return jax.vmap(vjp_fn)(cotangents)

        factors = curvature._likelihood_factors(outputs, chunk_targets, indices)
        merged = None
        if merge_positions:
            merged = _merged_columns(curvature, outputs, chunk_targets)
        if merged is None:
            tap_grads, other_grads = backward(factors)
        else:
            tap_grads, _ = backward(merged)
            other_grads = backward(factors)[1] if other else ()
        layer_terms = []
        for layer, operand, g in zip(layers, activations, tap_grads, strict=True):
            a = jax.vmap(layer.inputs)(operand)  # (n, R, D_in)
            if layer.bias is not None:
                a = jnp.concatenate([a, jnp.ones((*a.shape[:2], 1), a.dtype)], -1)
            a = a * weights[:, None, None].astype(a.dtype)
            rows = jax.vmap(
                jax.vmap(ft.partial(_layers.apply_chain, layer.output_chain))
            )
            layer_terms.append((a, rows(g)))  # g: (K, n, R, D_out)
        return tuple(layer_terms), other_grads

    return terms


@eqx.filter_jit
def _factors(
    curvature,
    structure: _layers.Structure,
    single: _PerDatum,
    weight_sharing: str = "expand",
    merge_positions: bool = False,
):
    """`(A_l, G_l)` for every layer and the other params' squared gradients.

    `weight_sharing="expand"`: every one of a layer's `R` positions is one more
    datum, `A = Σ_{n,r} a a^T / (N R)`, `G = Σ_{n,r,k} g g^T`. `"reduce"`: the
    inputs averaged and the output gradients summed over the positions first,
    `A = Σ_n ā ā^T / N`, `G = Σ_{n,k} ĝ ĝ^T` (`ā = Σ_r a_r / R`, `ĝ = Σ_r g_r`).
    `merge_positions`: see `_per_datum`.
    """
    terms = _per_datum(curvature, structure, single, merge_positions)

    def on_chunk(chunk, indices, weights):
        layer_terms, other_grads = terms(chunk, indices, weights)
        if weight_sharing == "reduce":
            layer_terms = tuple(
                (jnp.mean(a, axis=1, keepdims=True), jnp.sum(g, axis=2, keepdims=True))
                for a, g in layer_terms
            )
        input_sums = tuple(_gram(a.reshape(-1, a.shape[-1])) for a, _ in layer_terms)
        # Contracted over (K, n, R) without a reshape that would gather data
        # sharded along n.
        gradient_sums = tuple(
            jnp.einsum("knrd,knre->de", g, g, precision=_HIGHEST)
            for _, g in layer_terms
        )
        squares = tuple(jnp.sum(jnp.square(g), axis=(0, 1)) for g in other_grads)
        return input_sums, gradient_sums, squares

    input_sums, gradient_sums, squares = _core.chunked_sum(
        on_chunk, curvature.data, curvature.num_data, curvature.chunk_size
    )
    input_covariances = tuple(
        s / (curvature.num_data * (layer.rows if weight_sharing == "expand" else 1))
        for s, layer in zip(input_sums, structure.layers, strict=True)
    )
    return input_covariances, gradient_sums, squares


def _structure(params: PyTree) -> PyTree[jax.ShapeDtypeStruct]:
    return jtu.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)


def _block(layer: _layers.Layer, leaves: list) -> Array:
    """The layer's part of a params-shaped vector as `(D_in (+1), D_out)`."""
    matrix = layer.weight_matrix(leaves[layer.weight])
    if layer.bias is None:
        return matrix
    bias = layer.bias_vector(leaves[layer.bias]).astype(matrix.dtype)
    return jnp.concatenate([matrix, bias[None]], axis=0)


def _unblock(layer: _layers.Layer, block: Array, leaves: list, out: list) -> None:
    """Write `block` back into the params leaves `out` (shapes from `leaves`)."""
    w = leaves[layer.weight]
    out[layer.weight] = layer.weight_leaf(block[: layer.d_in], w.shape).astype(w.dtype)
    if layer.bias is not None:
        b = leaves[layer.bias]
        out[layer.bias] = layer.bias_leaf(block[-1], b.shape).astype(b.dtype)


def _scaled(x: Array, scale: Array) -> Array:
    return x * scale.astype(x.dtype)


Kind = Literal["ggn", "mc", "ef"]


def _setup(
    model_fn: Callable,
    params: PyTree,
    data: Any,
    loss_fn: Any,
    *,
    kind: str,
    key: PRNGKeyArray | None,
    mc_samples: int,
    other: str,
    layers: PyTree[Hashable | None] | None,
    **common,
) -> tuple[AbstractCurvatureOperator, _layers.Structure, _PerDatum]:
    """The exact operator of `kind` (data, likelihood factors, scale, chunking), the
    layer structure and the per-datum model, for a Kronecker operator's factors."""
    _check_method("kind", kind, ("ggn", "mc", "ef"))
    _check_method("other", other, ("diagonal", "error"))
    if kind == "ggn":
        curvature = GGNOperator(model_fn, params, data, loss_fn, **common)
    elif kind == "mc":
        curvature = MCFisherOperator(
            model_fn, params, data, loss_fn, key, mc_samples=mc_samples, **common
        )
    else:
        curvature = EmpiricalFisherOperator(model_fn, params, data, loss_fn, **common)
    single = _PerDatum(curvature.model_fn, common["vmap_over_data"])
    structure = _layers.structure(
        single, curvature.params, _example(curvature.data[0]), layers, other
    )
    return curvature, structure, single


class _AbstractKronecker(_AbstractScalable):
    """A curvature approximation that is block-diagonal over the model's layers,
    each block `scale (U ⊗ Q) diag(vec E) (U ⊗ Q)^T` in the Kronecker eigenbasis of
    the layer's factors `A = U diag(α) U^T`, `G = Q diag(γ) Q^T`, and diagonal on
    the params in no layer.

    The concrete operators (KFAC: `E = α γ^T`; EKFAC) give each block's product,
    matrix, diagonal and eigenvalues `E`; the damped algebra of `K + Λ` (inverse,
    log-determinant, square root) is written once here, on `U`, `Q` and `E`.
    """

    params: eqx.AbstractVar[PyTree[Float[Array, "..."]]]
    scale: eqx.AbstractVar[Float[Array, ""]]
    other_diagonals: eqx.AbstractVar[tuple[Float[Array, "..."], ...]]
    structure: eqx.AbstractVar[_layers.Structure]

    @abc.abstractmethod
    def _block_mv(self, index: int, block: Array) -> Array:
        """Layer `index`'s block (without `scale`) times `block (D_in (+1), D_out)`."""

    @abc.abstractmethod
    def _block_matrix(self, index: int) -> Array:
        """Layer `index`'s block (without `scale`) as a dense matrix."""

    @abc.abstractmethod
    def _block_diagonal(self, index: int) -> Array:
        """Layer `index`'s block diagonal (without `scale`) as `(D_in (+1), D_out)`."""

    @abc.abstractmethod
    def _spectrum(self) -> tuple[tuple[Array, Array, Array], ...]:
        """`(U, Q, E)` per layer: `E (D_in (+1), D_out)` the block's eigenvalues
        (without `scale`) in the eigenbasis `U ⊗ Q`."""

    @property
    def layers(self) -> PyTree[int | None]:
        """Params-shaped labels: the layer index of each leaf, `None` if in none."""
        return _layers.labels(self.params, self.structure)

    @eqx.filter_jit
    def mv(self, vector: PyTree[Float[Array, "..."]]) -> PyTree[Float[Array, "..."]]:
        _check_like("vector", vector, self.in_structure())
        leaves, treedef = jtu.tree_flatten(vector)
        out = list(leaves)
        for index, layer in enumerate(self.structure.layers):
            product = self._block_mv(index, _block(layer, leaves))
            _unblock(layer, _scaled(product, self.scale), leaves, out)
        for i, d in zip(self.structure.other, self.other_diagonals, strict=True):
            out[i] = _scaled(d * leaves[i], self.scale)
        return jtu.tree_unflatten(treedef, out)

    @eqx.filter_jit
    def as_matrix(self) -> Float[Array, "P P"]:
        """The dense `(P, P)` matrix in `ravel_pytree` order."""
        structure = jtu.tree_leaves(self.in_structure())
        offsets = np.cumsum([0] + [s.size for s in structure])
        indices = [
            np.arange(s.size).reshape(s.shape) + offset
            for s, offset in zip(structure, offsets, strict=False)
        ]
        dtype = jnp.result_type(*structure)
        matrix = jnp.zeros((offsets[-1], offsets[-1]), dtype)
        for index, layer in enumerate(self.structure.layers):
            rows = np.asarray(_block_indices(layer, indices)).reshape(-1)
            block = self._block_matrix(index).astype(dtype)
            matrix = matrix.at[np.ix_(rows, rows)].set(block)
        for i, d in zip(self.structure.other, self.other_diagonals, strict=True):
            rows = indices[i].reshape(-1)
            matrix = matrix.at[rows, rows].set(d.reshape(-1).astype(dtype))
        return _scaled(matrix, self.scale)

    @eqx.filter_jit
    def diagonal(self) -> Float[Array, " P"]:
        """The exact diagonal of the matrix: flat `(P,)`, `ravel_pytree` order."""
        leaves = jtu.tree_leaves(self.params)
        out = [jnp.zeros_like(leaf) for leaf in leaves]
        for index, layer in enumerate(self.structure.layers):
            _unblock(layer, self._block_diagonal(index), leaves, out)
        for i, d in zip(self.structure.other, self.other_diagonals, strict=True):
            out[i] = d.astype(leaves[i].dtype)
        return _scaled(jfu.ravel_pytree(out)[0], self.scale)

    def transpose(self) -> Self:
        return self

    def in_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        return _structure(self.params)

    def out_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        return _structure(self.params)

    # ----------------------------------------------------------------------- #
    # The damped algebra.
    # ----------------------------------------------------------------------- #

    def _prior(self, prior_precision) -> PriorPrecision:
        if not isinstance(prior_precision, PriorPrecision):
            prior_precision = PriorPrecision(self.params, prior_precision)
        _check_like(
            "prior_precision", prior_precision.full_diagonal(), self.in_structure()
        )
        return prior_precision

    def is_exact(self, prior_precision) -> bool:
        """Whether `inverse`, `logdet` and `inverse_sqrt_mv` are exact for this prior.

        They are when the prior precision is one scalar on each layer's weight and
        one on its bias (a scalar prior, or one scalar per params leaf). A prior
        that varies within a layer's weight or bias (a full diagonal) is replaced,
        in those layers only, by its mean over the weight and over the bias: the
        inverse is then the exact inverse of that nearby matrix, a good
        preconditioner for CG on `K + Λ`.
        """
        precision = jtu.tree_leaves(self._prior(prior_precision).per_leaf())
        return all(
            jnp.ndim(precision[i]) == 0
            for layer in self.structure.layers
            for i in (layer.weight, layer.bias)
            if i is not None
        )

    def inverse(self, prior_precision) -> "KFACInverse":
        """`(K + Λ)^{-1}` as a symmetric PSD lineax operator on params.

        Exact when `is_exact(prior_precision)`; otherwise the exact inverse of `K`
        plus the prior averaged within each layer's weight and bias. Pass it as
        `lx.CG`'s preconditioner: `lx.linear_solve(ggn + prior, b, lx.CG(...),
        options={"preconditioner": kfac.inverse(prior)})`.

        - `prior_precision`: a [`fisherops.PriorPrecision`][] or what
          `PriorPrecision(params, ·)` accepts.
        """
        return KFACInverse(_damp(self, self._prior(prior_precision)))

    def logdet(self, prior_precision) -> Scalar:
        """`log det(K + Λ)`, exact; raises when `is_exact(prior_precision)` is False."""
        self._require_exact(prior_precision, "logdet")
        return _logdet(_damp(self, self._prior(prior_precision)))

    def inverse_sqrt_mv(
        self, prior_precision, noise: PyTree[Float[Array, "..."]]
    ) -> PyTree[Float[Array, "..."]]:
        """`S e` with `S S^T = (K + Λ)^{-1}`: with `e ~ N(0, I)`, a draw of
        `N(0, (K + Λ)^{-1})`. `S` is the symmetric square root when the prior is
        the same on a layer's weight and bias. Raises when
        `is_exact(prior_precision)` is False.
        """
        self._require_exact(prior_precision, "inverse_sqrt_mv")
        _check_like("noise", noise, self.in_structure())
        return _inverse_sqrt_mv(_damp(self, self._prior(prior_precision)), noise)

    def _require_exact(self, prior_precision, name: str) -> None:
        if not self.is_exact(prior_precision):
            raise ValueError(
                f"{type(self).__name__}.{name} is exact only for a prior precision "
                "that is one scalar per layer weight and bias (a scalar, or one "
                "scalar per params leaf); got a prior that varies within a layer. "
                "Use inverse(prior_precision) as a CG preconditioner instead."
            )


class KFACOperator(_AbstractKronecker):
    r"""Kronecker-factored GGN / Fisher as a symmetric PSD lineax operator.

    Block-diagonal over the model's layers, each block `scale A ⊗ G` (see the
    module's maths and [the conventions](../conventions.md#kfac)):

    $$A = \frac{1}{N R} \sum_{n,r} a_{n,r} a_{n,r}^\top, \qquad
    G = \sum_{n,r,k} g_{n,r,k} g_{n,r,k}^\top,$$

    with `a` the layer input (a 1 appended for the bias) and `g_{n,r,k}` the
    backpropagation of column `k` of the likelihood factor `B_n` to the layer
    output: the Hessian square root (`kind="ggn"`), the sampled gradients
    (`kind="mc"`, keys `fold_in(fold_in(key, n), m)` as
    [`fisherops.MCFisherOperator`][]) or the loss gradient (`kind="ef"`).

    A layer applied at `R` positions of one datum shares its weight across them
    (a dense layer on a sequence `(T, D)`: attention's q/k/v/o projections, a
    per-token MLP, the unembedding; a convolution's output locations), with the
    two conventions of Eschenhagen et al. (2023): `"expand"` (above, the
    default: every position one more datum, so a model without interaction
    between positions has the KFAC of its flattened positions) and `"reduce"`:

    $$A = \frac{1}{N} \sum_n \bar a_n \bar a_n^\top, \quad
    \bar a_n = \frac1R \sum_r a_{n,r}, \qquad
    G = \sum_{n,k} \hat g_{n,k} \hat g_{n,k}^\top, \quad
    \hat g_{n,k} = \sum_r g_{n,r,k},$$

    the block of a dense layer on the averaged input when the layer's outputs
    are averaged over the positions right after it (exact for one datum).

    For structured outputs (per-token losses on `(T, C)` logits), `kind="ggn"`
    backpropagates the per-position Hessian roots of all positions at once
    (`C` backward passes per datum, not `T C`; see
    [the conventions](../conventions.md#kfac)).

    Layers are found in the jaxpr of `model_fn` on one datum, with no tagging:
    every `dot_general` (dense) and `conv_general_dilated` (convolution) whose
    weight operand is a params leaf (through reshapes, transposes, casts) used
    nowhere else, with the bias leaf added to its output. Plain functions,
    [`fisherops.from_equinox`][] and [`fisherops.from_flax_nnx`][] models work
    alike; `op.layers` shows what was found.

    **Arguments:** as [`fisherops.GGNOperator`][] (`model_fn`, `params`, `data`,
    `loss_fn`, `num_curv_samples`, `num_total_samples`, `vmap_over_data`,
    `chunk_size`: the factors are accumulated chunk by chunk), plus

    - `kind`: `"ggn"`, `"mc"` (needs `key`) or `"ef"`.
    - `key`, `mc_samples`: for `kind="mc"`.
    - `other`: params in no recognised layer (layer norms, embeddings, ...) get
      the exact diagonal of the curvature (`"diagonal"`), or raise an error that
      lists them (`"error"`).
    - `layers`: the layer structure by hand: a params-shaped pytree of labels,
      the weight and bias of one layer sharing a label, `None` for params in no
      layer (e.g. `op.layers` of an operator, edited).
    - `weight_sharing`: `"expand"` or `"reduce"`, for layers applied at several
      positions (no effect where `R = 1`).

    Embeddings (a gather from a params leaf), layer and batch norm scales and
    shifts, positional embeddings and weights used twice (a tied unembedding)
    are in no Kronecker layer: they get the diagonal of `other`. An embedding
    written as `one_hot(tokens) @ E` is a dense layer (its `A` the diagonal of
    token frequencies).

    The exact inverse, log-determinant and square root of `K + Λ` (`inverse`,
    `logdet`, `inverse_sqrt_mv`) make [`fisherops.LaplacePosterior`][] cheap; the
    inverse is also a preconditioner for `lineax.CG` on the exact curvature.
    """

    model_fn: Callable
    params: PyTree[Float[Array, "..."]]
    scale: Float[Array, ""]
    likelihood: Any
    input_covariances: tuple[Float[Array, "Di Di"], ...]
    gradient_covariances: tuple[Float[Array, "Do Do"], ...]
    other_diagonals: tuple[Float[Array, "..."], ...]
    eigendecompositions: tuple[tuple[Array, Array, Array, Array], ...] | None
    kind: str = eqx.field(static=True)
    weight_sharing: str = eqx.field(static=True)
    num_data: int = eqx.field(static=True)
    vmap_over_data: bool = eqx.field(static=True)
    structure: _layers.Structure = eqx.field(static=True)

    def __init__(
        self,
        model_fn: Callable[[Any, PyTree], Array],
        params: PyTree[Float[Array, "..."]],
        data: Any,
        loss_fn: Any,
        *,
        kind: Kind = "ggn",
        key: PRNGKeyArray | None = None,
        mc_samples: int = 1,
        num_curv_samples: Real[Array, ""] | float | None = None,
        num_total_samples: Real[Array, ""] | float | None = None,
        vmap_over_data: bool = True,
        chunk_size: int | None = None,
        other: Literal["diagonal", "error"] = "diagonal",
        layers: PyTree[Hashable | None] | None = None,
        weight_sharing: Literal["expand", "reduce"] = "expand",
    ):
        _check_method("weight_sharing", weight_sharing, ("expand", "reduce"))
        curvature, structure, single = _setup(
            model_fn,
            params,
            data,
            loss_fn,
            kind=kind,
            key=key,
            mc_samples=mc_samples,
            other=other,
            layers=layers,
            num_curv_samples=num_curv_samples,
            num_total_samples=num_total_samples,
            vmap_over_data=vmap_over_data,
            chunk_size=chunk_size,
        )
        inputs, gradients, others = _factors(
            curvature, structure, single, weight_sharing, merge_positions=True
        )
        self.model_fn = curvature.model_fn
        self.params = curvature.params
        self.scale = curvature.scale
        self.likelihood = curvature.likelihood
        self.input_covariances = inputs
        self.gradient_covariances = gradients
        self.other_diagonals = others
        self.eigendecompositions = None
        self.kind = kind
        self.weight_sharing = weight_sharing
        self.num_data = curvature.num_data
        self.vmap_over_data = vmap_over_data
        self.structure = structure

    def __repr__(self) -> str:
        return _repr(
            self,
            weight_sharing=repr(self.weight_sharing),
            decomposed=self.eigendecompositions is not None,
        )

    def decompose(self) -> "KFACOperator":
        """The same operator holding the eigendecompositions of every `A` and `G`.

        `inverse`, `logdet` and `inverse_sqrt_mv` otherwise decompose the factors on
        every call; decompose once before evaluating many priors (e.g. when tuning
        the prior precision).
        """
        return eqx.tree_at(
            lambda op: op.eigendecompositions,
            self,
            _eigendecompositions(self.input_covariances, self.gradient_covariances),
            is_leaf=lambda x: x is None,
        )

    def _block_mv(self, index: int, block: Array) -> Array:
        a, g = self.input_covariances[index], self.gradient_covariances[index]
        product = jnp.matmul(a, block, precision=_HIGHEST)
        return jnp.matmul(product, g, precision=_HIGHEST)

    def _block_matrix(self, index: int) -> Array:
        return jnp.kron(self.input_covariances[index], self.gradient_covariances[index])

    def _block_diagonal(self, index: int) -> Array:
        return jnp.outer(
            jnp.diagonal(self.input_covariances[index]),
            jnp.diagonal(self.gradient_covariances[index]),
        )

    def _spectrum(self) -> tuple[tuple[Array, Array, Array], ...]:
        eigen = self.eigendecompositions
        if eigen is None:
            eigen = _eigendecompositions(
                self.input_covariances, self.gradient_covariances
            )
        return tuple((u, q, jnp.outer(alpha, gamma)) for u, alpha, q, gamma in eigen)


def _repr(op: _AbstractKronecker, **extra) -> str:
    scale = op.scale
    if not isinstance(scale, jax.core.Tracer):
        scale = float(np.asarray(scale))
    blocks = ", ".join(
        f"{layer.kind} ({layer.d_in}{' + 1' if layer.bias is not None else ''}) "
        f"x {layer.d_out}" + (f" at {layer.rows} positions" if layer.rows > 1 else "")
        for layer in op.structure.layers
    )
    fields = {
        "kind": repr(op.kind),
        "scale": scale,
        "num_data": op.num_data,
        "layers": f"[{blocks}]",
        "other_leaves": len(op.structure.other),
        **extra,
    }
    described = ", ".join(f"{name}={value}" for name, value in fields.items())
    return f"{type(op).__name__}({described})"


def _block_indices(layer: _layers.Layer, indices: list) -> np.ndarray:
    """Global `ravel_pytree` indices of the layer's block entries `(D', D_out)`."""
    matrix = layer.weight_matrix(indices[layer.weight])
    if layer.bias is None:
        return matrix
    return np.concatenate([matrix, layer.bias_vector(indices[layer.bias])[None]], 0)


# --------------------------------------------------------------------------- #
# K + Λ in eigen-coordinates.
# --------------------------------------------------------------------------- #


class _Damped(eqx.Module):
    """`scale (U ⊗ Q) diag(vec E) (U ⊗ Q)^T + D ⊗ I` per layer
    (`D = diag(λ_W, .., λ_W, λ_b)`), and the other params' `scale d + λ`; for
    KFAC `E = α γ^T` with `A = U diag(α) U^T`, `G = Q diag(γ) Q^T`.
    """

    eigen: tuple[tuple[Array, Array, Array], ...]  # (U, Q, E) per layer
    weight_precision: tuple[Array, ...]
    bias_shift: tuple[Array, ...]  # λ_b - λ_W (0 without a bias)
    other: tuple[Array, ...]
    scale: Array
    leaves: tuple[jax.ShapeDtypeStruct, ...] = eqx.field(static=True)
    treedef: Any = eqx.field(static=True)
    structure: _layers.Structure = eqx.field(static=True)

    @property
    def params(self) -> PyTree[jax.ShapeDtypeStruct]:
        return jtu.tree_unflatten(self.treedef, self.leaves)

    def layer_terms(self, index: int):
        """`scale E + λ_W`, `u` (the last row of `U`), `h`, `κ` of a layer."""
        u_matrix, q, values = self.eigen[index]
        scale = self.scale.astype(values.dtype)
        e = scale * values + self.weight_precision[index]
        u = u_matrix[-1]
        h = (u**2) @ (1 / e)
        kappa = 1 + self.bias_shift[index] * h
        return u_matrix, q, e, u, h, kappa


def _eigh(
    matrix: Float[Array, "d d"],
) -> tuple[Float[Array, " d"], Float[Array, "d d"]]:
    """Eigenvalues (clipped at 0) and eigenvectors of a symmetrised PSD factor."""
    values, vectors = _linalg.eigh(matrix)
    return jnp.maximum(values, 0), vectors


@eqx.filter_jit
def _eigendecompositions(input_covariances, gradient_covariances) -> tuple:
    """`(U, α, Q, γ)` per layer; one `eigh` per factor (no batched LAPACK, also
    under a user's `vmap`)."""
    eigen = []
    for a, g in zip(input_covariances, gradient_covariances, strict=True):
        (alpha, u), (gamma, q) = _eigh(a), _eigh(g)
        eigen.append((u, alpha, q, gamma))
    return tuple(eigen)


@eqx.filter_jit
def _damp(kronecker: _AbstractKronecker, prior: PriorPrecision) -> _Damped:
    precision = jtu.tree_leaves(prior.per_leaf())
    full = jtu.tree_leaves(prior.full_diagonal())
    eigen = kronecker._spectrum()
    weight_precision, bias_shift = [], []
    for layer, (_, _, values) in zip(kronecker.structure.layers, eigen, strict=True):
        lam_w = jnp.mean(precision[layer.weight]).astype(values.dtype)
        weight_precision.append(lam_w)
        if layer.bias is None:
            bias_shift.append(jnp.zeros((), values.dtype))
        else:
            lam_b = jnp.mean(precision[layer.bias]).astype(values.dtype)
            bias_shift.append(lam_b - lam_w)
    other = tuple(
        _scaled(d, kronecker.scale) + full[i]
        for i, d in zip(
            kronecker.structure.other, kronecker.other_diagonals, strict=True
        )
    )
    return _Damped(
        tuple(eigen),
        tuple(weight_precision),
        tuple(bias_shift),
        other,
        kronecker.scale,
        tuple(jtu.tree_leaves(kronecker.in_structure())),
        jtu.tree_structure(kronecker.in_structure()),
        kronecker.structure,
    )


def _inverse_mv(damped: _Damped, vector: PyTree) -> PyTree:
    leaves, treedef = jtu.tree_flatten(vector)
    out = list(leaves)
    for index, layer in enumerate(damped.structure.layers):
        u_matrix, q, e, u, _, kappa = damped.layer_terms(index)
        y = u_matrix.T @ _block(layer, leaves) @ q
        z = y / e
        if layer.bias is not None:
            w = u @ z
            z = z - damped.bias_shift[index] * (u[:, None] / e) * (w / kappa)[None, :]
        _unblock(layer, u_matrix @ z @ q.T, leaves, out)
    for i, d in zip(damped.structure.other, damped.other, strict=True):
        out[i] = leaves[i] / d
    return jtu.tree_unflatten(treedef, out)


@eqx.filter_jit
def _inverse_sqrt_mv(damped: _Damped, noise: PyTree) -> PyTree:
    leaves, treedef = jtu.tree_flatten(noise)
    out = list(leaves)
    for index, layer in enumerate(damped.structure.layers):
        u_matrix, q, e, u, h, kappa = damped.layer_terms(index)
        y = u_matrix.T @ _block(layer, leaves) @ q
        if layer.bias is not None:
            v = u[:, None] / jnp.sqrt(e)
            beta = 1 / jnp.sqrt(kappa) - 1
            y = y + v * (beta * jnp.sum(v * y, axis=0) / h)[None, :]
        _unblock(layer, u_matrix @ (y / jnp.sqrt(e)) @ q.T, leaves, out)
    for i, d in zip(damped.structure.other, damped.other, strict=True):
        out[i] = leaves[i] / jnp.sqrt(d)
    return jtu.tree_unflatten(treedef, out)


@eqx.filter_jit
def _logdet(damped: _Damped) -> Scalar:
    total = jnp.zeros((), damped.scale.dtype)
    for index, layer in enumerate(damped.structure.layers):
        _, _, e, _, _, kappa = damped.layer_terms(index)
        total = total + jnp.sum(jnp.log(e))
        if layer.bias is not None:
            total = total + jnp.sum(jnp.log(kappa))
    for d in damped.other:
        total = total + jnp.sum(jnp.log(d))
    return total


def _inverse_diagonal(damped: _Damped) -> Array:
    structure = jtu.tree_leaves(damped.params)
    leaves = [jnp.zeros(s.shape, s.dtype) for s in structure]
    out = list(leaves)
    for index, layer in enumerate(damped.structure.layers):
        u_matrix, q, e, u, _, kappa = damped.layer_terms(index)
        diag = (u_matrix**2) @ (1 / e) @ (q**2).T
        if layer.bias is not None:
            w = (u_matrix * u[None, :]) @ (1 / e)
            diag = (
                diag - (w**2 * (damped.bias_shift[index] / kappa)[None, :]) @ (q**2).T
            )
        _unblock(layer, diag, leaves, out)
    for i, d in zip(damped.structure.other, damped.other, strict=True):
        out[i] = 1 / d
    return jfu.ravel_pytree(out)[0]


class KFACInverse(lx.AbstractLinearOperator):
    """`(K + Λ)^{-1}` of a Kronecker operator: see `KFACOperator.inverse`.

    Each `mv` costs four small matrix products per layer.
    """

    damped: _Damped

    @eqx.filter_jit
    def mv(self, vector: PyTree[Float[Array, "..."]]) -> PyTree[Float[Array, "..."]]:
        _check_like("vector", vector, self.in_structure())
        return _inverse_mv(self.damped, vector)

    @eqx.filter_jit
    def as_matrix(self) -> Float[Array, "P P"]:
        flat, unravel = jfu.ravel_pytree(
            jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), self.in_structure())
        )
        columns = jax.lax.map(
            lambda e: jfu.ravel_pytree(_inverse_mv(self.damped, unravel(e)))[0],
            jnp.eye(flat.size, dtype=flat.dtype),
        )
        return columns.T

    @eqx.filter_jit
    def diagonal(self) -> Float[Array, " P"]:
        """The diagonal of `(K + Λ)^{-1}`, flat `(P,)`."""
        return _inverse_diagonal(self.damped)

    def transpose(self) -> "KFACInverse":
        return self

    def in_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        return self.damped.params

    def out_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        return self.damped.params


# --------------------------------------------------------------------------- #
# lineax's single-dispatch queries.
# --------------------------------------------------------------------------- #


@lx.linearise.register(_AbstractKronecker)
@lx.linearise.register(KFACInverse)
@lx.materialise.register(_AbstractKronecker)
@lx.materialise.register(KFACInverse)
@lx.conj.register(_AbstractKronecker)
@lx.conj.register(KFACInverse)
def _(operator):
    return operator


@lx.diagonal.register(_AbstractKronecker)
@lx.diagonal.register(KFACInverse)
def _(operator):
    return operator.diagonal()


@lx.tridiagonal.register(_AbstractKronecker)
@lx.tridiagonal.register(KFACInverse)
def _(operator):
    matrix = operator.as_matrix()
    return jnp.diagonal(matrix), jnp.diagonal(matrix, -1), jnp.diagonal(matrix, 1)


register_symmetric_psd(_AbstractKronecker, KFACInverse)
