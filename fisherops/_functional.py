"""The functional API of `laplax.curv.fisher`, as a thin layer over the operators.

Same names, signatures and semantics; each function builds the matching operator
and returns its `mv`.
"""

from collections.abc import Callable

from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Real

from ._likelihoods import AbstractLikelihood
from ._operators import Data, EmpiricalFisherOperator, MCFisherOperator, ModelFn

Params = PyTree[Float[Array, "..."]]
Loss = "str | Callable | AbstractLikelihood | None"


def create_empirical_fisher_mv(
    model_fn: ModelFn,
    params: Params,
    data: Data,
    loss_fn: Loss = None,
    *,
    num_curv_samples: Real[Array, ""] | float | None = None,
    num_total_samples: Real[Array, ""] | float | None = None,
    vmap_over_data: bool = True,
    loss_grad_fn: Callable | None = None,
    chunk_size: int | None = None,
) -> Callable[[Params], Params]:
    r"""`v ↦ (num_total_samples / num_curv_samples) Σ_n J_n^T g_n g_n^T J_n v`.

    The `mv` of [`fisherops.EmpiricalFisherOperator`][] (same arguments).
    """
    return EmpiricalFisherOperator(
        model_fn,
        params,
        data,
        loss_fn,
        num_curv_samples=num_curv_samples,
        num_total_samples=num_total_samples,
        vmap_over_data=vmap_over_data,
        loss_grad_fn=loss_grad_fn,
        chunk_size=chunk_size,
    ).mv


def create_empirical_fisher_mv_without_data(
    model_fn: ModelFn,
    params: Params,
    loss_fn: Loss,
    factor: Real[Array, ""] | float,
    *,
    vmap_over_data: bool = True,
    loss_grad_fn: Callable | None = None,
    chunk_size: int | None = None,
) -> Callable[[Params, Data], Params]:
    r"""`(v, data) ↦ factor Σ_n J_n^T g_n g_n^T J_n v` over the batch `data`.

    For data that arrives batch by batch: sum the results of your batches, with
    `factor` the scaling you want for each (e.g. `N_total / N_seen`).
    """

    def mv(vector: Params, data: Data) -> Params:
        return EmpiricalFisherOperator(
            model_fn,
            params,
            data,
            loss_fn,
            num_curv_samples=1,
            num_total_samples=factor,
            vmap_over_data=vmap_over_data,
            loss_grad_fn=loss_grad_fn,
            chunk_size=chunk_size,
        ).mv(vector)

    return mv


def create_MC_fisher_mv(
    model_fn: ModelFn,
    params: Params,
    data: Data,
    loss_fn: "str | AbstractLikelihood",
    key: PRNGKeyArray,
    *,
    num_curv_samples: Real[Array, ""] | float | None = None,
    num_total_samples: Real[Array, ""] | float | None = None,
    vmap_over_data: bool = True,
    mc_samples: int | None = 1,
    chunk_size: int | None = None,
) -> Callable[[Params], Params]:
    r"""`v ↦ factor / M Σ_{n,m} J_n^T g_nm g_nm^T J_n v`, `ỹ_nm ~ r(y | f_n)`.

    The `mv` of [`fisherops.MCFisherOperator`][] (same arguments).
    """
    return MCFisherOperator(
        model_fn,
        params,
        data,
        loss_fn,
        key,
        num_curv_samples=num_curv_samples,
        num_total_samples=num_total_samples,
        vmap_over_data=vmap_over_data,
        mc_samples=mc_samples,
        chunk_size=chunk_size,
    ).mv


def create_MC_fisher_mv_without_data(
    model_fn: ModelFn,
    params: Params,
    loss_fn: "str | AbstractLikelihood",
    key: PRNGKeyArray,
    factor: Real[Array, ""] | float,
    *,
    vmap_over_data: bool = True,
    mc_samples: int | None = 1,
    chunk_size: int | None = None,
) -> Callable[[Params, Data], Params]:
    r"""`(v, data) ↦ factor / M Σ_{n,m} J_n^T g_nm g_nm^T J_n v` over the batch.

    Samples depend on `(key, n, m)` with `n` the index *within* `data`: when you
    drive it from your own loop, give each batch its own key, e.g.
    `jax.random.fold_in(key, batch_index)`, or the batches share label noise.
    """

    def mv(vector: Params, data: Data) -> Params:
        return MCFisherOperator(
            model_fn,
            params,
            data,
            loss_fn,
            key,
            num_curv_samples=1,
            num_total_samples=factor,
            vmap_over_data=vmap_over_data,
            mc_samples=mc_samples,
            chunk_size=chunk_size,
        ).mv(vector)

    return mv
