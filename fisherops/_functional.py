"""The functional API of `laplax.curv.fisher`, as a thin layer over the operators.

Same names, signatures and semantics; each function builds the matching operator
and returns its `mv`.
"""

from collections.abc import Callable

from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Real

from ._checks import Data, ModelFn, empirical_likelihood, mc_arguments
from ._hessian import HessianOperator
from ._likelihoods import AbstractLikelihood, as_likelihood
from ._operators import EmpiricalFisherOperator, MCFisherOperator

Params = PyTree[Float[Array, "..."]]
Loss = "str | Callable | AbstractLikelihood | None"


def _plain_function(operator) -> Callable[[Params], Params]:
    # A plain function, not the bound method: `jax.jit(mv)` hashes its callable,
    # and an operator holding dicts of arrays cannot be hashed.
    def mv(vector: Params) -> Params:
        return operator.mv(vector)

    return mv


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

    The `mv` of [`fisherops.EmpiricalFisherOperator`][] (same arguments). As in
    laplax, `num_curv_samples` and `num_total_samples` only set the scale; neither
    is compared with the number of data points given. The returned function is
    compiled once: calling it again with new vectors compiles nothing.
    """
    operator = EmpiricalFisherOperator(
        model_fn,
        params,
        data,
        loss_fn,
        num_curv_samples=num_curv_samples,
        num_total_samples=num_total_samples,
        vmap_over_data=vmap_over_data,
        loss_grad_fn=loss_grad_fn,
        chunk_size=chunk_size,
    )
    return _plain_function(operator)


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

    For data that arrives batch by batch (a data set larger than memory): build
    `mv` once, call it on every batch and sum. `factor` multiplies each batch's
    sum, so give the scaling of the whole pass, e.g. `N_total / N_seen` with
    `N_seen` the number of points in all the batches of the pass:

    ```python
    mv = create_empirical_fisher_mv_without_data(
        model_fn, params, "cross_entropy", factor=N_total / N_seen
    )
    mv = jax.jit(mv)  # compiles once per batch shape
    total = None
    for batch in loader():
        term = mv(vector, batch)
        total = term if total is None else jax.tree.map(jnp.add, total, term)
    ```

    [`fisherops.StreamedOperator`][] runs this loop for you, as a lineax operator.
    """

    empirical_likelihood(loss_fn, loss_grad_fn)  # bad arguments fail here, not later

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

    The `mv` of [`fisherops.MCFisherOperator`][] (same arguments);
    `mc_samples=None` means one sample per datum, as in laplax.
    """
    operator = MCFisherOperator(
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
    )
    return _plain_function(operator)


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

    Samples depend on `(key, n, m)` with `n` the index *within* `data`. When you
    drive it from your own loop over batches, give each batch its own key, or the
    batches share their label noise (the same `ỹ` for the `n`-th point of every
    batch). Build one `mv` per batch key; under `jit` the key is traced, so it
    compiles once per batch shape:

    ```python
    @jax.jit
    def batch_mv(vector, batch, batch_key):
        mv = create_MC_fisher_mv_without_data(
            model_fn, params, "cross_entropy", batch_key, factor=N_total / N_seen
        )
        return mv(vector, batch)

    total = None
    for b, batch in enumerate(loader()):
        term = batch_mv(vector, batch, jax.random.fold_in(key, b))
        total = term if total is None else jax.tree.map(jnp.add, total, term)
    ```

    This is a valid Monte-Carlo Fisher, but not the same matrix as
    `create_MC_fisher_mv` on the concatenated data. For that, the samples must
    depend on the *global* index of each point: use
    `fisherops.MCFisherOperator(..., first_index=...)` per batch, or
    [`fisherops.StreamedOperator`][], which does it for you.
    """

    mc_arguments(loss_fn, key, mc_samples)  # bad arguments fail here, not later

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


def create_hessian_mv(
    model_fn: ModelFn,
    params: Params,
    data: Data,
    loss_fn: "str | Callable | AbstractLikelihood",
    *,
    num_curv_samples: Real[Array, ""] | float | None = None,
    num_total_samples: Real[Array, ""] | float | None = None,
    vmap_over_data: bool = True,
    chunk_size: int | None = None,
) -> Callable[[Params], Params]:
    r"""`v ↦ (num_total_samples / num_curv_samples) ∇²_θ [Σ_n c(y_n, f(x_n, θ))] v`.

    The `mv` of [`fisherops.HessianOperator`][] (same arguments), as laplax's
    `create_hessian_mv`.
    """
    operator = HessianOperator(
        model_fn,
        params,
        data,
        loss_fn,
        num_curv_samples=num_curv_samples,
        num_total_samples=num_total_samples,
        vmap_over_data=vmap_over_data,
        chunk_size=chunk_size,
    )
    return _plain_function(operator)


def create_hessian_mv_without_data(
    model_fn: ModelFn,
    params: Params,
    loss_fn: "str | Callable | AbstractLikelihood",
    factor: Real[Array, ""] | float,
    *,
    vmap_over_data: bool = True,
    chunk_size: int | None = None,
) -> Callable[[Params, Data], Params]:
    r"""`(v, data) ↦ factor ∇²_θ [Σ_n c(y_n, f(x_n, θ))] v` over the batch `data`.

    For data that arrives batch by batch, as
    [`create_empirical_fisher_mv_without_data`][fisherops.create_empirical_fisher_mv_without_data]:
    build `mv` once, call it on every batch (under `jax.jit`: compiled once per
    batch shape) and sum; `factor` is the scaling of the whole pass.
    """
    if as_likelihood(loss_fn) is None:  # bad arguments fail here, not later
        raise ValueError("create_hessian_mv_without_data needs loss_fn; got None.")

    def mv(vector: Params, data: Data) -> Params:
        return HessianOperator(
            model_fn,
            params,
            data,
            loss_fn,
            num_curv_samples=1,
            num_total_samples=factor,
            vmap_over_data=vmap_over_data,
            chunk_size=chunk_size,
        ).mv(vector)

    return mv
