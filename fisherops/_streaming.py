"""Curvature operators over data sets that do not fit in memory.

`StreamedOperator` sums an in-memory curvature operator over batches read one at
a time from a data loader. Each batch goes through the same jitted function, so
it compiles once per batch shape; only one batch is in device memory at a time.

Every batch is checked as an in-memory operator checks its data, in the same
pass: its targets by the likelihood (on the host, where they are concrete),
its arrays for non-finite values and their fingerprint (`_record`) on the
device, in the program that adds its term. The records of a pass are read once
at its end; a pass whose batches differ from the first pass's is an error.
"""

import functools as ft
from collections.abc import Callable, Iterable, Iterator

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jaxtyping import Array, Float, PyTree, UInt

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


def _mixed_bits(leaf: Array) -> UInt[Array, " n"]:
    """The bits of each element of `leaf`, mixed with its position (uint32)."""
    leaf = jnp.asarray(leaf)
    if jnp.iscomplexobj(leaf):
        leaf = jnp.stack([leaf.real, leaf.imag])
    if leaf.dtype == bool:
        leaf = leaf.astype(jnp.uint8)
    unsigned = jnp.dtype(f"uint{8 * leaf.dtype.itemsize}")
    bits = jax.lax.bitcast_convert_type(leaf, unsigned)
    if unsigned.itemsize == 8:
        bits = jax.lax.bitcast_convert_type(bits, jnp.uint32)
    bits = bits.astype(jnp.uint32).reshape(-1)
    # (bits xor a position code), times an odd constant, xor-shifted: for each
    # position a bijection of the bits, and a non-linear one (a swap of two
    # elements changes the sum). One round of murmur3's finaliser: the whole
    # finaliser cost five times as much on a CPU.
    position = jax.lax.iota(jnp.uint32, bits.size) * jnp.uint32(0x9E3779B1)
    mixed = (bits ^ position) * jnp.uint32(0x85EBCA6B)
    return mixed ^ (mixed >> 15)


def _record(data: tuple[PyTree, PyTree]) -> UInt[Array, "2 L"]:
    """A batch's fingerprint (row 0) and number of non-finite values (row 1), per
    array (leaf): one array, so a pass reads one small array per batch.

    The fingerprint of an array is the sum modulo 2^32 of its elements' mixed
    bits: an integer sum, so every device and reduction order gives the same
    value, and any change of a value or of the order of the data points changes
    it (but with probability 2^-32).
    """
    leaves = jtu.tree_leaves(data)
    fingerprints = [jnp.sum(_mixed_bits(leaf), dtype=jnp.uint32) for leaf in leaves]
    non_finite = [
        jnp.sum(~jnp.isfinite(leaf), dtype=jnp.uint32)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
        else jnp.zeros((), jnp.uint32)
        for leaf in leaves
    ]
    return jnp.stack([jnp.stack(fingerprints), jnp.stack(non_finite)])


_recorded = jax.jit(_record)


@ft.partial(jax.jit, static_argnums=(0, 1))
def _accumulate(static, method, dynamic, data, first_index, args, total):
    """`total + getattr(C_b, method)(*args)`, `C_b` the template holding batch `b`,
    and batch `b`'s `_record`."""
    operator = eqx.combine(dynamic, static.tree)
    operator = eqx.tree_at(lambda op: op.data, operator, data)
    if isinstance(operator, MCFisherOperator):
        index = jnp.asarray(first_index, operator.first_index.dtype)
        operator = eqx.tree_at(lambda op: op.first_index, operator, index)
    term = getattr(operator, method)(*args)
    return jtu.tree_map(jnp.add, total, term), _record(data)


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
        self.outputs = jax.eval_shape(
            operator._model(), operator.data[0], operator.params
        )
        self.zeros: dict[str, PyTree[Array]] = {}

    def check_targets(self, targets: PyTree) -> None:
        """The likelihood's checks of a batch's targets, as `operator_fn` makes
        them (their values too: they are concrete here)."""
        likelihood = getattr(self.operator, "likelihood", None)
        if likelihood is not None:
            likelihood.prepare_targets(targets, self.outputs)

    def accumulate(self, method, data, first_index, args, total):
        """`total` plus this batch's term, and the batch's `_record` (on the device)."""
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


def _shapes(batch: tuple[PyTree, PyTree], leading: str | None = None) -> str:
    """`input (24, 3), target (24,)`: a batch's shapes, axis 0 shown as `leading`."""
    shown = []
    for name, tree in zip(("input", "target"), batch, strict=True):
        for path, leaf in jtu.tree_leaves_with_path(tree):
            dims = [str(size) for size in np.shape(leaf)]
            if leading is not None and dims:
                dims[0] = leading
            text = ", ".join(dims) + ("," if len(dims) == 1 else "")
            shown.append(f"{name}{jtu.keystr(path)} ({text})")
    return ", ".join(shown)


def _leaf_names(treedef: jtu.PyTreeDef) -> list[str]:
    """`data input[...]` / `data target[...]` for each leaf of a batch."""
    inputs, targets = jtu.tree_unflatten(treedef, range(treedef.num_leaves))
    return [
        f"data {name}{jtu.keystr(path)}"
        for name, tree in (("input", inputs), ("target", targets))
        for path, _ in jtu.tree_leaves_with_path(tree)
    ]


_SAME_BATCHES = (
    "Every mv, diagonal() and as_matrix() reads the batches again, so the loader "
    "must give the same batches in the same order on every pass: a list of "
    "batches, or a callable returning a fresh iterator over them (not one shared "
    "iterator, which runs out after a pass), without shuffling or random "
    "augmentation (e.g. a torch DataLoader with shuffle=False)."
)


class _Reiterate:
    """A loader over a re-iterable: `iter(batches)` on each call (picklable, where
    a lambda is not)."""

    def __init__(self, batches: Iterable[Data]):
        self.batches = batches

    def __call__(self) -> Iterator[Data]:
        return iter(self.batches)


class _Source:
    """The batches, one template operator per batch shape, and what a pass reads.

    Building it reads the first batch (for the template operator). The first
    complete pass is remembered batch by batch (shapes and fingerprints), and
    every later pass must read the same batches (so must the first pass, up to
    the batch read here). Not a pytree: it stays out of `jit` (its hash is its
    identity), and the batches are never traced.
    """

    def __init__(self, operator_fn, batches, progress: bool):
        if callable(batches):
            self.iterate = batches
        elif isinstance(batches, Iterable) and iter(batches) is not batches:
            self.iterate = _Reiterate(batches)
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
        first = next(iter(self.iterate()), None)
        if first is None:
            raise ValueError("batches must hold at least one batch; got none.")
        _, data, signature = self.template(0, first)
        self.first = signature
        self.first_shapes = _shapes(data, "n")
        fingerprint = np.asarray(_recorded(data))[0]
        # (signature, fingerprints) of each batch of the first pass; until that
        # pass is complete, of the batch read here.
        self.expected = [(signature, fingerprint)]
        self.complete = False

    def __repr__(self):
        return self.name

    def template(
        self, position: int, batch: Data
    ) -> tuple[_Template, tuple[PyTree, PyTree], tuple]:
        """The template for a batch's shape (its targets checked), the batch as
        `(inputs, targets)`, and its signature."""
        data = _split_data(batch, f"batch {position}")
        signature = _signature(data)
        template = self.templates.get(signature)
        try:
            if template is not None:
                template.check_targets(data[1])
                return template, data, signature
            if self.templates:
                self.check_shapes(position, data, signature)
            template = _Template(self.checked_operator(batch))
        except ValueError as error:
            raise ValueError(f"batch {position}: {error}") from None
        self.templates[signature] = template
        return template, data, signature

    def check_shapes(self, position: int, data: tuple, signature: tuple) -> None:
        """A new batch shape differs from the first batch's in axis 0 only."""
        (treedef, leaves), (first_treedef, first_leaves) = signature, self.first
        if treedef == first_treedef and all(
            shape[1:] == first[1:]
            for (shape, _), (first, _) in zip(leaves, first_leaves, strict=True)
        ):
            return
        raise ValueError(
            f"got shapes {_shapes(data)}; every batch must have the shapes of batch "
            f"0 but for its number of points (axis 0): {self.first_shapes}."
        )

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

    def read(self, method: str, args: tuple, progress: bool) -> tuple[PyTree, int]:
        """`sum_b getattr(C_b, method)(*args)` over one pass, and its number of
        points, every batch checked."""
        total, count, read = None, 0, []
        for position, batch in enumerate(self.batches(progress)):
            template, data, signature = self.template(position, batch)
            total, record = template.accumulate(
                method, _copied(data), count, args, total
            )
            read.append((signature, template.operator.num_data, record))
            count += template.operator.num_data
        self.check_pass(read)
        return total, count

    def check_pass(self, read: list[tuple[tuple, int, UInt[Array, "2 L"]]]) -> None:
        """The records of a pass, read at once: every array finite, and the same
        batches as the first pass."""
        if not read:
            raise ValueError(f"the loader gave no batch on this pass. {_SAME_BATCHES}")
        records = jax.device_get([record for *_, record in read])
        for position, ((signature, *_), (_, non_finite)) in enumerate(
            zip(read, records, strict=True)
        ):
            if non_finite.any():
                leaf = np.flatnonzero(non_finite)[0]
                count = non_finite[leaf]
                raise ValueError(
                    f"batch {position}: {_leaf_names(signature[0])[leaf]} must be "
                    f"finite; got {count} NaN or inf value{'s' if count > 1 else ''}."
                )
        seen = [
            (signature, fingerprint)
            for (signature, *_), (fingerprint, _) in zip(read, records, strict=True)
        ]
        when = "on the first pass" if self.complete else "when the operator was built"
        for position, (got, expected) in enumerate(
            zip(seen, self.expected, strict=False)
        ):
            if got[0] != expected[0] or not np.array_equal(got[1], expected[1]):
                raise ValueError(
                    f"batch {position} differs from batch {position} read {when}. "
                    f"{_SAME_BATCHES}"
                )
        if self.complete and len(seen) != len(self.expected):
            points = sum(num for _, num, _ in read)
            first = sum(_num_points(signature) for signature, _ in self.expected)
            raise ValueError(
                f"the loader gave {len(seen)} batches ({points} points) on this pass "
                f"but {len(self.expected)} ({first} points) on the first. "
                f"{_SAME_BATCHES}"
            )
        self.expected, self.complete = seen, True


def _copied(data: PyTree) -> PyTree:
    """`data` with its numpy arrays copied.

    `jit` reads a numpy argument in place, when the program runs (later: dispatch
    is asynchronous), by when a loader that reuses its buffers may have filled
    it with the next batch. A numpy copy costs a `memcpy`; `jnp.asarray` costs
    ~0.1 ms per array more on a CPU.
    """
    return jtu.tree_map(
        lambda leaf: np.array(leaf) if isinstance(leaf, np.ndarray) else leaf, data
    )


def _num_points(signature: tuple) -> int:
    """The number of points of a batch of this signature (axis 0 of its arrays)."""
    _, leaves = signature
    return leaves[0][0][0]


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

    **The same batches on every pass.** The operator is one matrix only if every
    pass reads the same batches in the same order: no shuffling (a torch
    `DataLoader(shuffle=False)`), no random augmentation, and a loader callable
    that returns a *fresh* iterator on each call (one shared iterator runs out
    after a pass). Each batch's arrays are fingerprinted on the device, in the
    program that adds its term; a pass whose batches differ from the first
    pass's (or from the first batch, read when the operator is built) raises a
    `ValueError`, as does a pass with no batch.

    **Every batch is checked** as the in-memory operator checks its data: a
    batch of another shape than the first must differ in its number of points
    only; the targets go through the likelihood's checks (label range,
    probabilities) on the host; inputs and targets must be finite, counted on
    the device in the same program and raised at the end of the pass. Errors
    name the batch, counted from 0 in the loader's order. Inside `jit` they
    come out of the callback as a `JaxRuntimeError` carrying the same message.

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
        _check_count("num_curv_samples", num_curv_samples)
        _check_count("num_total_samples", num_total_samples)
        self.num_curv_samples = (
            None if num_curv_samples is None else float(num_curv_samples)
        )
        self.num_total_samples = (
            None if num_total_samples is None else float(num_total_samples)
        )
        self.source = _Source(operator_fn, batches, progress)

    def _stream(self, method: str, *args, progress: bool = True) -> PyTree[Array]:
        """`scale * sum_b getattr(C_b, method)(*args)` over the batches."""
        total, count = self.source.read(method, args, progress and self.source.progress)
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
