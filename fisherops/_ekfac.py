r"""Eigenvalue-corrected KFAC (EKFAC; George et al. 2018).

KFAC approximates a layer's curvature block by `scale A ⊗ G` (see `_kfac`). With
`A = U diag(α) U^T` and `G = Q diag(γ) Q^T`, that block is diagonal in the
Kronecker eigenbasis `U ⊗ Q`, with eigenvalues `α_i γ_j`. EKFAC keeps the basis
and replaces the eigenvalues by the exact second moments of the curvature's
per-datum factors projected onto it:

$$\text{scale}\,(U \otimes Q)\operatorname{diag}(\operatorname{vec} E)
(U \otimes Q)^\top, \qquad
E_{ij} = \sum_{n,k} \big(U^\top \Gamma_{n,k} Q\big)_{ij}^2, \qquad
\Gamma_{n,k} = \sum_r a_{n,r}\, g_{n,r,k}^\top,$$

`Γ_{n,k}` `(D_in (+1), D_out)` the gradient of the layer's params along column `k`
of the likelihood factor `B_n` (the exact block is
`scale Σ_{n,k} vec Γ_{n,k} vec Γ_{n,k}^T`). So `scale E_{ij}` is the exact block's
quadratic form on the basis vector `u_i ⊗ q_j`: each block's trace is the exact
block's trace, and, of all matrices diagonal in `U ⊗ Q` (KFAC among them), EKFAC
is the nearest to the exact block in Frobenius norm. The damped algebra of
`K + Λ` (inverse, log-determinant, square root) is KFAC's with `α γ^T` replaced by
`E`, exact for a prior that is one scalar per layer weight and bias.
"""

from collections.abc import Callable, Hashable
from typing import Any, Literal

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Real

from . import _core, _layers
from ._checks import _check_method
from ._kfac import (
    _HIGHEST,
    Kind,
    _AbstractKronecker,
    _eigh,
    _factors,
    _per_datum,
    _PerDatum,
    _repr,
    _setup,
)


def _projected_second_moment(
    a: Float[Array, "n R Di"],
    g: Float[Array, "K n R Do"],
    u: Float[Array, "Di Di"],
    q: Float[Array, "Do Do"],
) -> Float[Array, "Di Do"]:
    """`Σ_{n,k} (U^T Γ_{n,k} Q)^2` with `Γ_{n,k} = Σ_r a_{n,r} g_{n,r,k}^T`.

    Through the per-position Gram matrices, `Σ_n Σ_{r,s} (ã_{nr} ∘ ã_{ns})
    (Σ_k g̃_{knr} ∘ g̃_{kns})^T` (memory `n R^2 (D_in + D_out)`), when that is
    smaller than the projected per-datum gradients `(K, n, D_in, D_out)`; for
    `R = 1` it is one product of the squared projections.
    """
    a = jnp.einsum("nri,ij->nrj", a, u, precision=_HIGHEST)
    g = jnp.einsum("knrd,de->knre", g, q, precision=_HIGHEST)
    k, _, r, d_out = g.shape
    d_in = a.shape[-1]
    if r * r * (d_in + d_out) <= k * d_in * d_out:
        aa = jnp.einsum("nri,nsi->nrsi", a, a, precision=_HIGHEST)
        gg = jnp.einsum("knrd,knsd->nrsd", g, g, precision=_HIGHEST)
        return jnp.einsum("nrsi,nrsd->id", aa, gg, precision=_HIGHEST)
    gradients = jnp.einsum("nri,knrd->knid", a, g, precision=_HIGHEST)
    return jnp.sum(jnp.square(gradients), axis=(0, 1))


@eqx.filter_jit
def _build(
    curvature, structure: _layers.Structure, single: _PerDatum, weight_sharing: str
):
    """The eigenbases `(U, Q)` (KFAC's, `weight_sharing` as there), the corrected
    eigenvalues `E` (without `scale`; from the exact `B_n`, whatever KFAC's
    convention) and the other params' squared gradients: two passes over the
    data."""
    inputs, gradients, others = _factors(
        curvature, structure, single, weight_sharing, merge_positions=True
    )
    bases = tuple(
        (_eigh(a)[1], _eigh(g)[1]) for a, g in zip(inputs, gradients, strict=True)
    )
    terms = _per_datum(curvature, structure, single)

    def on_chunk(chunk, indices, weights):
        layer_terms, _ = terms(chunk, indices, weights)
        return tuple(
            _projected_second_moment(a, g, u, q)
            for (a, g), (u, q) in zip(layer_terms, bases, strict=True)
        )

    eigenvalues = _core.chunked_sum(
        on_chunk, curvature.data, curvature.num_data, curvature.chunk_size
    )
    return bases, eigenvalues, others


class EKFACOperator(_AbstractKronecker):
    r"""Eigenvalue-corrected KFAC as a symmetric PSD lineax operator.

    Block-diagonal over the model's layers like [`fisherops.KFACOperator`][], with
    the same eigenbasis `U ⊗ Q` per block (`A = U diag(α) U^T`,
    `G = Q diag(γ) Q^T`) and, instead of KFAC's eigenvalues `α_i γ_j`, the exact
    second moments of the projected per-datum factors:

    $$\text{scale}\,(U \otimes Q)\operatorname{diag}(\operatorname{vec} E)
    (U \otimes Q)^\top, \qquad
    E_{ij} = \sum_{n,k} \big(U^\top \Gamma_{n,k} Q\big)_{ij}^2,$$

    `Γ_{n,k} = Σ_r a_{n,r} g_{n,r,k}^T` the gradient of the layer's `[W; b]` along
    column `k` of the likelihood factor `B_n`. Each block has the exact curvature
    block's trace, and its Frobenius distance to the exact block is never above
    KFAC's. Params in no layer get the exact diagonal of the curvature, as in KFAC.

    Building costs KFAC's pass over the data, one `eigh` per factor, and a second
    pass for `E`; the second pass holds, per chunk and layer, the smaller of the
    projected per-datum gradients `(K, chunk, D_in (+1), D_out)` and the
    per-position Gram matrices `(chunk, R, R, D_in (+1) + D_out)` (`R` positions
    sharing the weight): `chunk_size` bounds it.

    **Arguments:** those of [`fisherops.KFACOperator`][]: `model_fn`, `params`,
    `data`, `loss_fn`, `kind` (`"ggn"`, `"mc"`, `"ef"`), `key`, `mc_samples`,
    `num_curv_samples`, `num_total_samples`, `vmap_over_data`, `chunk_size`,
    `other`, `layers`, `weight_sharing` (which KFAC eigenbasis; `E` is the exact
    second moment in it either way).

    `inverse`, `logdet` and `inverse_sqrt_mv` of `K + Λ` are exact for a prior
    that is one scalar per layer weight and bias (`is_exact`), as KFAC's, so
    [`fisherops.LaplacePosterior`][] uses them.
    """

    model_fn: Callable
    params: PyTree[Float[Array, "..."]]
    scale: Float[Array, ""]
    likelihood: Any
    bases: tuple[tuple[Float[Array, "Di Di"], Float[Array, "Do Do"]], ...]
    eigenvalues: tuple[Float[Array, "Di Do"], ...]
    other_diagonals: tuple[Float[Array, "..."], ...]
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
        bases, eigenvalues, others = _build(
            curvature, structure, single, weight_sharing
        )
        self.model_fn = curvature.model_fn
        self.params = curvature.params
        self.scale = curvature.scale
        self.likelihood = curvature.likelihood
        self.bases = bases
        self.eigenvalues = eigenvalues
        self.other_diagonals = others
        self.kind = kind
        self.weight_sharing = weight_sharing
        self.num_data = curvature.num_data
        self.vmap_over_data = vmap_over_data
        self.structure = structure

    def __repr__(self) -> str:
        return _repr(self, weight_sharing=repr(self.weight_sharing))

    def _block_mv(self, index: int, block: Array) -> Array:
        (u, q), values = self.bases[index], self.eigenvalues[index]
        projected = jnp.matmul(
            jnp.matmul(u.T, block, precision=_HIGHEST), q, precision=_HIGHEST
        )
        return jnp.matmul(
            jnp.matmul(u, values * projected, precision=_HIGHEST),
            q.T,
            precision=_HIGHEST,
        )

    def _block_matrix(self, index: int) -> Array:
        (u, q), values = self.bases[index], self.eigenvalues[index]
        basis = jnp.kron(u, q)
        return jnp.matmul(basis * values.reshape(-1), basis.T, precision=_HIGHEST)

    def _block_diagonal(self, index: int) -> Array:
        (u, q), values = self.bases[index], self.eigenvalues[index]
        return jnp.matmul(
            jnp.matmul(jnp.square(u), values, precision=_HIGHEST),
            jnp.square(q).T,
            precision=_HIGHEST,
        )

    def _spectrum(self) -> tuple[tuple[Array, Array, Array], ...]:
        return tuple(
            (u, q, values)
            for (u, q), values in zip(self.bases, self.eigenvalues, strict=True)
        )
