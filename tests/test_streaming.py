"""`StreamedOperator`: the in-memory matrix, from batches read one at a time."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from _reference import assert_close, counted_compilations, mlp
from _scaling import DATA, KINDS, NUM_DATA, PARAMS, PRIOR, VECTOR
from _scaling import expected as in_memory
from _scaling import operator as make_operator
from jax.flatten_util import ravel_pytree

import fisherops as fo


def batches(size):
    """A data loader: a callable returning a fresh iterator of numpy batches."""
    inputs, targets = (np.asarray(leaf) for leaf in DATA)
    return lambda: (
        (inputs[i : i + size], targets[i : i + size]) for i in range(0, NUM_DATA, size)
    )


def streamed(kind, size, **kwargs):
    return fo.StreamedOperator(
        lambda batch: make_operator(kind, batch), batches(size), **kwargs
    )


def flat(tree):
    return ravel_pytree(tree)[0]


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_mv_equals_in_memory(kind):
    # Batches of 24, 24 and 16 points; MC draws its samples at the global indices.
    operator = streamed(kind, 24, num_total_samples=1000)
    assert_close(flat(operator.mv(VECTOR)), in_memory(kind)["mv"] * 1000 / NUM_DATA)


def test_streamed_diagonal_and_matrix_equal_in_memory():
    operator = streamed("mc", 16, num_curv_samples=32, num_total_samples=64)
    assert_close(lx.diagonal(operator), 2 * in_memory("mc")["diagonal"])
    assert_close(operator.as_matrix(), 2 * in_memory("mc")["as_matrix"])


def test_mc_batches_with_first_index_are_the_whole_data_set():
    @jax.jit
    def half(start):
        data = jax.tree.map(
            lambda leaf: jax.lax.dynamic_slice_in_dim(leaf, start, 32), DATA
        )
        return flat(make_operator("mc", data, first_index=start).mv(VECTOR))

    assert_close(half(0) + half(32), in_memory("mc")["mv"])


def test_cg_solves_eagerly_and_under_jit():
    precision = streamed("ef", 32) + fo.PriorPrecision(PARAMS, PRIOR)
    cg = lx.CG(rtol=1e-12, atol=1e-12, max_steps=200)
    expected = in_memory("ef")["cg"]
    assert_close(flat(lx.linear_solve(precision, VECTOR, cg).value), expected)
    solve = jax.jit(lambda b: lx.linear_solve(precision, b, cg).value)
    assert_close(flat(solve(VECTOR)), expected)


def test_each_batch_shape_compiles_once():
    """Two batch shapes (24 and 16 points): two compilations of the per-batch `mv`,
    reused by later products and by a new operator with new params."""
    compilations = fo._streaming._accumulate._cache_size

    def ggn(params):
        return fo.StreamedOperator(
            lambda batch: fo.GGNOperator(mlp, params, batch, "cross_entropy"),
            batches(24),
        )

    before = compilations()
    ggn(PARAMS).mv(VECTOR)
    assert compilations() - before <= 2
    after = compilations()
    ggn(PARAMS).mv(VECTOR)
    ggn(jax.tree.map(lambda leaf: 2 * leaf, PARAMS)).mv(VECTOR)
    assert compilations() == after


def test_user_loop_over_the_functional_form_equals_in_memory():
    """The loop `create_empirical_fisher_mv_without_data` documents."""
    mv = jax.jit(
        fo.create_empirical_fisher_mv_without_data(
            mlp, PARAMS, "cross_entropy", factor=1000 / NUM_DATA
        )
    )
    total = None
    for batch in batches(16)():
        term = mv(VECTOR, batch)
        total = term if total is None else jax.tree.map(jnp.add, total, term)
    assert_close(flat(total), in_memory("ef")["mv"] * 1000 / NUM_DATA)


def test_progress_bar(capsys, monkeypatch):
    """One bar per eager call; none inside a solve (not one per CG product)."""
    tqdm = pytest.importorskip("tqdm")
    bars = []
    original = tqdm.tqdm

    def counting(*args, **kwargs):
        bars.append(kwargs.get("total"))
        return original(*args, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", counting)
    operator = streamed("ef", 32, progress=True)
    assert_close(flat(operator.mv(VECTOR)), in_memory("ef")["mv"])
    assert len(bars) == 1
    assert "batch" in capsys.readouterr().err
    precision = operator + fo.PriorPrecision(PARAMS, PRIOR)
    cg = lx.CG(rtol=1e-12, atol=1e-12, max_steps=200)
    solution = lx.linear_solve(precision, VECTOR, cg).value
    assert_close(flat(solution), in_memory("ef")["cg"])
    assert len(bars) == 1


def test_repeated_eager_calls_compile_nothing():
    """mv, diagonal and as_matrix, with progress bars, called again and on a new
    operator with new params: no compilation after the first call of each."""

    def ggn(params):
        return fo.StreamedOperator(
            lambda batch: fo.GGNOperator(mlp, params, batch, "cross_entropy"),
            batches(24),
            progress=True,
        )

    with counted_compilations() as events:
        first = ggn(PARAMS)
        calls = [lambda op: op.mv(VECTOR), lambda op: op.diagonal()]
        calls.append(lambda op: op.as_matrix())
        for call in calls:
            call(first)
        before = len(events)
        second = ggn(jax.tree.map(lambda leaf: 2 * leaf, PARAMS))
        for call in calls:
            call(first)
            call(second)
        assert len(events) == before


def test_repr_names_the_loader():
    def digits_loader():
        return iter([DATA])

    operator = fo.StreamedOperator(
        lambda batch: make_operator("ef", batch), digits_loader
    )
    assert "source=digits_loader," in repr(operator)
    operator = fo.StreamedOperator(lambda batch: make_operator("ef", batch), [DATA])
    assert "source=list of 1 batches" in repr(operator)


def test_bad_arguments():
    one_shot = iter(batches(32)())
    with pytest.raises(TypeError, match="batches must be re-iterable"):
        fo.StreamedOperator(lambda batch: make_operator("ef", batch), one_shot)
    with pytest.raises(ValueError, match="default scaling .* Got an operator with "):
        fo.StreamedOperator(
            lambda batch: make_operator("ef", batch, num_total_samples=10),
            batches(32),
        )
    with pytest.raises(TypeError, match="operator_fn must return"):
        fo.StreamedOperator(lambda batch: lx.IdentityLinearOperator(VECTOR), [DATA])
    with pytest.raises(ValueError, match="at least one batch"):
        fo.StreamedOperator(lambda batch: make_operator("ef", batch), [])
    with pytest.raises(
        ValueError, match="num_total_samples must be a positive finite number; got -1"
    ):
        streamed("ef", 32, num_total_samples=-1)
    with pytest.raises(
        ValueError, match="num_curv_samples must be a positive finite number; got inf"
    ):
        streamed("ef", 32, num_curv_samples=np.inf)


def split(data, size=24):
    """`data` as a list of numpy batches of `size` points (copies, to corrupt)."""
    inputs, targets = (np.array(leaf) for leaf in data)
    return [
        (inputs[i : i + size], targets[i : i + size])
        for i in range(0, len(inputs), size)
    ]


def ef_of(batch):
    return make_operator("ef", batch)


@pytest.fixture(scope="module")
def solve_under_jit():
    """CG with the prior under `jit`, where `mv` runs in a host callback."""
    cg = lx.CG(rtol=1e-12, atol=1e-12, max_steps=200)

    @eqx.filter_jit
    def solve(operator, vector):
        return lx.linear_solve(operator + fo.PriorPrecision(PARAMS, PRIOR), vector, cg)

    return lambda operator: solve(operator, VECTOR).value


def test_every_batch_is_checked(solve_under_jit):
    """A later batch of an already seen shape gets the in-memory checks (issue
    19.3): label range by the likelihood, finite inputs on the device, eagerly
    and inside CG under `jit`."""
    labels = split(DATA)
    labels[1][1][5] = -1
    operator = fo.StreamedOperator(ef_of, labels)
    with pytest.raises(ValueError, match=r"batch 1: loss 'cross_entropy' .* \[-1, "):
        operator.mv(VECTOR)
    nan = split(DATA)
    nan[1][0][3, 2] = np.nan
    operator = fo.StreamedOperator(ef_of, nan)
    message = "batch 1: data input must be finite; got 1 NaN or inf value"
    with pytest.raises(ValueError, match=message):
        operator.diagonal()
    with pytest.raises(Exception, match=message):
        solve_under_jit(operator)


def test_a_batch_of_another_shape_must_differ_in_axis_0_only():
    wrong = split(DATA)
    wrong[2] = (np.ones((16, 4)), wrong[2][1])
    expected = (
        r"batch 2: got shapes input \(16, 4\), target \(16,\); every batch must "
        r"have the shapes of batch 0 but for its number of points \(axis 0\): "
        r"input \(n, 3\), target \(n,\)\."
    )
    with pytest.raises(ValueError, match=expected):
        fo.StreamedOperator(ef_of, wrong).mv(VECTOR)
    lengths = split(DATA)
    lengths[2] = (lengths[2][0], lengths[2][1][:15])
    with pytest.raises(ValueError, match="batch 2: data input has 16 data points"):
        fo.StreamedOperator(ef_of, lengths).mv(VECTOR)


SAME_BATCHES = "must give the same batches in the same order on every pass"


def test_a_stream_that_changes_between_passes_is_an_error():
    """A shuffling loader, one that reorders the points of a batch, one that gives
    fewer batches (issue 19.4): caught by the batches' fingerprints."""
    rng = np.random.default_rng(0)

    def shuffling():
        order = rng.permutation(NUM_DATA)
        return iter(split(jax.tree.map(lambda leaf: np.asarray(leaf)[order], DATA)))

    operator = fo.StreamedOperator(lambda batch: make_operator("mc", batch), shuffling)
    with pytest.raises(ValueError, match="batch 0 differs from batch 0 read when"):
        operator.mv(VECTOR)

    passes = []

    def changing():
        passes.append(None)
        batches = split(DATA)
        if len(passes) == 3:  # the second mv: batch 1's points reversed
            batches[1] = jax.tree.map(lambda leaf: leaf[::-1], batches[1])
        if len(passes) == 4:  # the third: no last batch
            del batches[-1]
        return iter(batches)

    operator = fo.StreamedOperator(lambda batch: make_operator("mc", batch), changing)
    assert_close(flat(operator.mv(VECTOR)), in_memory("mc")["mv"])
    with pytest.raises(ValueError, match="batch 1 differs from batch 1 read on the "):
        operator.mv(VECTOR)
    with pytest.raises(
        ValueError,
        match=f"2 batches \\(48 points\\) on this pass but 3 \\(64 "
        f"points\\) on the first.*{SAME_BATCHES}",
    ):
        operator.mv(VECTOR)


def test_a_loader_returning_one_shared_iterator_is_an_error(solve_under_jit):
    """Building the operator reads batch 0 of the iterator: the first pass then
    starts at batch 1, the next finds no batch (issue 19.5). Never a wrong
    number, never None, and a clear message inside CG."""
    shared = iter(split(DATA))
    operator = fo.StreamedOperator(ef_of, lambda: shared)
    with pytest.raises(ValueError, match=f"batch 0 differs .*{SAME_BATCHES}"):
        operator.mv(VECTOR)
    with pytest.raises(ValueError, match=f"no batch on this pass. .*{SAME_BATCHES}"):
        operator.mv(VECTOR)
    shared = iter(split(DATA))
    operator = fo.StreamedOperator(ef_of, lambda: shared)
    with pytest.raises(Exception, match=f"batch 0 differs .*{SAME_BATCHES}"):
        solve_under_jit(operator)


def test_a_loader_that_reuses_its_buffers():
    """A loader filling one numpy buffer per batch: each batch is copied before the
    (asynchronous) program that reads it runs, so the next batch cannot overwrite
    it. Without the copy, products were wrong or failed the fingerprint check
    (a race, lost in 5 of 5 runs of this test)."""
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(4096, DATA[0].shape[1]))
    targets = rng.integers(0, 3, 4096)
    size = 1024

    def reusing():
        buffers = np.empty((size, inputs.shape[1])), np.empty(size, targets.dtype)
        for i in range(0, len(inputs), size):
            buffers[0][:], buffers[1][:] = inputs[i : i + size], targets[i : i + size]
            yield buffers

    expected = flat(
        fo.StreamedOperator(ef_of, split((inputs, targets), size)).mv(VECTOR)
    )
    operator = fo.StreamedOperator(ef_of, reusing)
    for _ in range(10):
        assert_close(flat(operator.mv(VECTOR)), expected)
