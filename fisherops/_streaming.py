"""Curvature operators over data sets that do not fit in memory.

`StreamedOperator` sums an in-memory curvature operator over batches read one at
a time from a data loader. Each batch goes through the same jitted function, so
it compiles once per batch shape; only one batch is in device memory at a time.
"""

from collections.abc import Callable, Iterable, Iterator

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jaxtyping import Array, Float, PyTree

from ._operators import (
    AbstractCurvatureOperator,
    Data,
    MCFisherOperator,
    _check_vector,
    _split_data,
    _structure,
)

Batches = Iterable[Data] | Callable[[], Iterator[Data]]


@eqx.filter_jit
def _batch_term(operator: AbstractCurvatureOperator, method: str, args: tuple):
    return getattr(operator, method)(*args)


_add = jax.jit(lambda total, term: jtu.tree_map(jnp.add, total, term))


def _signature(batch: tuple[PyTree, PyTree]) -> tuple:
    leaves, treedef = jtu.tree_flatten(batch)
    return treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)


class _Source:
    """The batches, and one operator per batch shape to put each batch into.

    Not a pytree: it stays out of `jit` (its hash is its identity), and the
    batches are never traced.
    """

    def __init__(self, operator_fn, batches, progress: bool):
        if callable(batches):
            self.iterate = batches
        elif isinstance(batches, Iterable) and iter(batches) is not batches:
            self.iterate = lambda: iter(batches)
        else:
            raise TypeError(
                "batches must be re-iterable, as every mv reads them all: a list of "
                "batches, or a callable returning a fresh iterator over them; got "
                f"{type(batches).__name__}."
            )
        if progress:
            try:
                import tqdm  # noqa: F401
            except ImportError:
                raise ImportError(
                    "progress=True needs tqdm: pip install tqdm"
                ) from None
        self.operator_fn = operator_fn
        self.progress = progress
        self.templates: dict[tuple, AbstractCurvatureOperator] = {}
        self.sizes = getattr(batches, "__len__", None)

    def operator(self, batch: Data, first_index: int) -> AbstractCurvatureOperator:
        """The curvature operator of one batch."""
        data = _split_data(batch)
        signature = _signature(data)
        template = self.templates.get(signature)
        if template is None:
            template = self.template(batch)
            self.templates[signature] = template
        operator = eqx.tree_at(lambda op: op.data, template, data)
        if isinstance(operator, MCFisherOperator):
            index = jnp.asarray(first_index, template.first_index.dtype)
            operator = eqx.tree_at(lambda op: op.first_index, operator, index)
        return operator

    def template(self, batch: Data) -> AbstractCurvatureOperator:
        operator = self.operator_fn(batch)
        if not isinstance(operator, AbstractCurvatureOperator):
            raise TypeError(
                "operator_fn must return a fisherops curvature operator "
                "(EmpiricalFisherOperator, MCFisherOperator, GGNOperator); got "
                f"{type(operator).__name__}."
            )
        if float(operator.factor) != 1.0:
            raise ValueError(
                "operator_fn must build its operators with the default scaling (a "
                "plain sum over the batch); give num_total_samples and "
                "num_curv_samples to StreamedOperator instead. Got an operator with "
                f"factor {float(operator.factor)}."
            )
        return operator

    def __iter__(self) -> Iterator[Data]:
        batches = self.iterate()
        if self.progress:
            import tqdm

            total = self.sizes() if self.sizes is not None else None
            batches = tqdm.tqdm(batches, total=total, unit="batch", leave=False)
        return iter(batches)


class StreamedOperator(lx.AbstractLinearOperator):
    r"""A curvature operator over a data set read batch by batch.

    $$C v = \frac{N_\text{total}}{N_\text{curv}} \sum_b C_b v,$$

    with `C_b = operator_fn(batch_b)` the in-memory operator of batch `b` (a plain
    sum over its points). For the Monte-Carlo Fisher, each batch's samples are
    drawn at the *global* indices of its points (`first_index` = the number of
    points streamed before it), so `ỹ_nm` depends only on `(key, n, m)` and the
    matrix is the one `MCFisherOperator` gives on the concatenated data.

    Every `mv`, `diagonal()` and `as_matrix()` reads all the batches once, in
    order, and puts each through one jitted function: it compiles once per batch
    shape. A smaller last batch is not padded; it costs one more compilation and
    the result stays exact.

    **Not traceable.** The batches are read by a Python loop. Under `jit` (which
    includes `lineax.linear_solve`), `mv` runs that loop in a
    `jax.pure_callback`, so `lineax.linear_solve(op + prior, b, lineax.CG(...))`
    works, also under `jit` and `vmap` (one batch loop per vector), but is not
    differentiable with respect to the params or the data.

    **Arguments:**

    - `operator_fn`: `batch -> curvature operator`, with the default scaling, e.g.
      `lambda batch: fisherops.MCFisherOperator(model_fn, params, batch,
      "cross_entropy", key)`. It is called once per batch shape; the other
      batches are swapped into that operator.
    - `batches`: a list (or other re-iterable) of batches `(X, Y)` or
      `{"input": X, "target": Y}`, or a callable returning a fresh iterator over
      them (a data loader). A one-shot iterator is refused: every `mv` reads the
      batches again.
    - `num_curv_samples`: defaults to the number of points streamed.
    - `num_total_samples`: defaults to `num_curv_samples` (a plain sum).
    - `progress`: show a tqdm progress bar over the batches (needs `tqdm`).
    """

    source: _Source
    num_curv_samples: float | None
    num_total_samples: float | None

    def __init__(
        self,
        operator_fn: Callable[[Data], AbstractCurvatureOperator],
        batches: Batches,
        *,
        num_curv_samples: float | None = None,
        num_total_samples: float | None = None,
        progress: bool = False,
    ):
        if not callable(operator_fn):
            raise TypeError(
                "operator_fn must be a callable batch -> curvature operator; got "
                f"{type(operator_fn).__name__}."
            )
        self.source = _Source(operator_fn, batches, progress)
        for name, value in (
            ("num_curv_samples", num_curv_samples),
            ("num_total_samples", num_total_samples),
        ):
            if value is not None and not (np.ndim(value) == 0 and float(value) > 0):
                raise ValueError(f"{name} must be a positive number; got {value!r}.")
        self.num_curv_samples = (
            None if num_curv_samples is None else float(num_curv_samples)
        )
        self.num_total_samples = (
            None if num_total_samples is None else float(num_total_samples)
        )
        first = next(iter(self.source.iterate()), None)
        if first is None:
            raise ValueError("batches must hold at least one batch; got none.")
        self.source.operator(first, 0)

    def _stream(self, method: str, *args) -> PyTree[Array]:
        """`factor * sum_b getattr(C_b, method)(*args)` over the batches."""
        total, count = None, 0
        for batch in self.source:
            operator = self.source.operator(batch, count)
            term = _batch_term(operator, method, args)
            total = term if total is None else _add(total, term)
            count += operator.num_data
        num_curv = count if self.num_curv_samples is None else self.num_curv_samples
        num_total = (
            num_curv if self.num_total_samples is None else self.num_total_samples
        )
        return jtu.tree_map(lambda x: x * (num_total / num_curv), total)

    def mv(self, vector: PyTree[Float[Array, "..."]]) -> PyTree[Float[Array, "..."]]:
        _check_vector(self, vector)
        if any(isinstance(x, jax.core.Tracer) for x in jtu.tree_leaves(vector)):
            return jax.pure_callback(
                lambda v: jax.device_get(self._stream("mv", v)),
                self.out_structure(),
                vector,
                vmap_method="sequential",
            )
        return self._stream("mv", vector)

    def diagonal(self) -> Float[Array, " P"]:
        """The exact diagonal, flattened in `ravel_pytree` order."""
        return self._stream("diagonal")

    def as_matrix(self) -> Float[Array, "P P"]:
        return self._stream("as_matrix")

    def transpose(self) -> "StreamedOperator":
        return self

    def in_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        template = next(iter(self.source.templates.values()))
        return _structure(template.params)

    def out_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        return self.in_structure()


@lx.linearise.register(StreamedOperator)
@lx.materialise.register(StreamedOperator)
@lx.conj.register(StreamedOperator)
def _(operator):
    return operator


@lx.diagonal.register(StreamedOperator)
def _(operator):
    return operator.diagonal()


lx.tridiagonal.register(StreamedOperator)(
    lx.tridiagonal.dispatch(AbstractCurvatureOperator)
)


for _query, _answer in (
    (lx.is_symmetric, True),
    (lx.is_positive_semidefinite, True),
    (lx.is_negative_semidefinite, False),
    (lx.is_diagonal, False),
    (lx.is_tridiagonal, False),
    (lx.has_unit_diagonal, False),
    (lx.is_lower_triangular, False),
    (lx.is_upper_triangular, False),
):

    @_query.register(StreamedOperator)
    def _(operator, _answer=_answer):
        return _answer
