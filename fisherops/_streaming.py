"""Curvature operators over data sets that do not fit in memory.

`StreamedOperator` sums an in-memory curvature operator over batches read one at
a time from a data loader. Each batch goes through the same jitted function, so
it compiles once per batch shape; only one batch is in device memory at a time.
"""

import functools as ft
from collections.abc import Callable, Iterable, Iterator

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jaxtyping import Array, Float, PyTree

from ._checks import Data, _check_count, _check_vector, _split_data
from ._operators import AbstractCurvatureOperator, MCFisherOperator
from ._queries import register_symmetric_psd

Batches = Iterable[Data] | Callable[[], Iterator[Data]]


class _NoData:
    """Stands in for a template operator's data: each batch brings its own."""


_NO_DATA = _NoData()


class _Static:
    """The non-array part of an operator: a static argument of `jit`.

    Compared by value (its pytree structure and leaves), like `eqx.filter_jit`
    does, so a new operator of the same kind and shapes reuses the compilation.
    """

    def __init__(self, tree: PyTree):
        self.tree = tree
        leaves, treedef = jtu.tree_flatten(tree)
        self.key = (treedef, tuple(leaves))

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _Static) and self.key == other.key


@ft.partial(jax.jit, static_argnums=(0, 1))
def _accumulate(static, method, dynamic, data, first_index, args, total):
    """`total + getattr(C_b, method)(*args)`, `C_b` the template holding batch `b`."""
    operator = eqx.combine(dynamic, static.tree)
    operator = eqx.tree_at(lambda op: op.data, operator, data)
    if isinstance(operator, MCFisherOperator):
        index = jnp.asarray(first_index, operator.first_index.dtype)
        operator = eqx.tree_at(lambda op: op.first_index, operator, index)
    term = getattr(operator, method)(*args)
    return jtu.tree_map(jnp.add, total, term)


class _Template:
    """The operator of one batch shape, split for `_accumulate`: arrays and the rest.

    Its data is left out (each batch brings its own), so only the params and the
    other arrays of the operator travel with every call.
    """

    def __init__(self, operator: AbstractCurvatureOperator):
        hollow = eqx.tree_at(lambda op: op.data, operator, _NO_DATA)
        dynamic, static = eqx.partition(hollow, eqx.is_array)
        self.operator = operator
        self.dynamic = dynamic
        self.static = _Static(static)
        self.zeros: dict[str, PyTree[Array]] = {}

    def accumulate(self, method, data, first_index, args, total):
        if total is None:
            if method not in self.zeros:
                shapes = jax.eval_shape(lambda: getattr(self.operator, method)(*args))
                self.zeros[method] = jtu.tree_map(
                    lambda s: jnp.zeros(s.shape, s.dtype), shapes
                )
            total = self.zeros[method]
        return _accumulate(
            self.static, method, self.dynamic, data, first_index, args, total
        )


def _signature(batch: tuple[PyTree, PyTree]) -> tuple:
    leaves, treedef = jtu.tree_flatten(batch)
    return treedef, tuple((np.shape(x), getattr(x, "dtype", None)) for x in leaves)


class _Source:
    """The batches, and one template operator per batch shape.

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
        self.templates: dict[tuple, _Template] = {}
        self.sizes = getattr(batches, "__len__", None)
        self.name = _name(batches)

    def __repr__(self):
        return self.name

    def template(self, batch: Data) -> tuple[_Template, tuple[PyTree, PyTree]]:
        """The template for a batch's shape, and the batch as `(inputs, targets)`."""
        data = _split_data(batch)
        signature = _signature(data)
        if signature not in self.templates:
            self.templates[signature] = _Template(self.checked_operator(batch))
        return self.templates[signature], data

    def checked_operator(self, batch: Data) -> AbstractCurvatureOperator:
        operator = self.operator_fn(batch)
        if not isinstance(operator, AbstractCurvatureOperator):
            raise TypeError(
                "operator_fn must return a fisherops curvature operator "
                "(EmpiricalFisherOperator, MCFisherOperator, GGNOperator); got "
                f"{type(operator).__name__}."
            )
        if float(operator.scale) != 1.0:
            raise ValueError(
                "operator_fn must build its operators with the default scaling (a "
                "plain sum over the batch); give num_total_samples and "
                "num_curv_samples to StreamedOperator instead. Got an operator with "
                f"scale {float(operator.scale)}."
            )
        return operator

    def batches(self, progress: bool) -> Iterator[Data]:
        batches = self.iterate()
        if progress:
            import tqdm

            total = self.sizes() if self.sizes is not None else None
            batches = tqdm.tqdm(batches, total=total, unit="batch", leave=False)
        return iter(batches)


def _name(batches) -> str:
    """How the batches show in a repr: the loader's name, or the container's."""
    if callable(batches):
        name = getattr(batches, "__name__", None) or type(batches).__name__
        return f"{name}()" if name == "<lambda>" else name
    size = f" of {len(batches)} batches" if hasattr(batches, "__len__") else ""
    return f"{type(batches).__name__}{size}"


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
    - `progress`: show a tqdm progress bar over the batches (needs `tqdm`) for
      each eager `mv`, `diagonal()` and `as_matrix()`; none inside `jit` or
      `lineax.linear_solve`, where it would show one bar per product.
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
        _check_count("num_curv_samples", num_curv_samples)
        _check_count("num_total_samples", num_total_samples)
        self.num_curv_samples = (
            None if num_curv_samples is None else float(num_curv_samples)
        )
        self.num_total_samples = (
            None if num_total_samples is None else float(num_total_samples)
        )
        first = next(iter(self.source.iterate()), None)
        if first is None:
            raise ValueError("batches must hold at least one batch; got none.")
        self.source.template(first)

    def _stream(self, method: str, *args, progress: bool = True) -> PyTree[Array]:
        """`scale * sum_b getattr(C_b, method)(*args)` over the batches."""
        total, count = None, 0
        for batch in self.source.batches(progress and self.source.progress):
            template, data = self.source.template(batch)
            total = template.accumulate(method, data, count, args, total)
            count += template.operator.num_data
        num_curv = count if self.num_curv_samples is None else self.num_curv_samples
        num_total = (
            num_curv if self.num_total_samples is None else self.num_total_samples
        )
        return jtu.tree_map(lambda x: x * (num_total / num_curv), total)

    def mv(self, vector: PyTree[Float[Array, "..."]]) -> PyTree[Float[Array, "..."]]:
        vector = _check_vector(self, vector)
        if any(isinstance(x, jax.core.Tracer) for x in jtu.tree_leaves(vector)):
            # Inside a solve: no progress bar (it would show one per product).
            return jax.pure_callback(
                lambda v: jax.device_get(self._stream("mv", v, progress=False)),
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
        return template.operator.in_structure()

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


register_symmetric_psd(StreamedOperator)
