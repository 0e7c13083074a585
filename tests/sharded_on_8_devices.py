"""Data sharded over 8 devices: SPMD under jit, the same numbers as on one.

Run by `test_sharding.py` in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`, so that the rest of the
suite keeps one device. The data is sharded along axis 0 over a mesh of all 8
devices (`fisherops.shard_data`), the params are replicated. Each check compiles
the computation for the sharded data, reads the compiled HLO, runs it and
compares with the unsharded dense matrix.
"""

import functools as ft

import jax
import numpy as np
import pytest
from _reference import assert_close
from _scaling import (
    DATA,
    KINDS,
    NUM_DATA,
    PARAMS,
    expected,
    mv,
    operator,
    quantities,
)
from jax.sharding import NamedSharding, PartitionSpec

import fisherops as fo

pytestmark = pytest.mark.skipif(
    jax.device_count() != 8, reason="needs 8 devices (see test_sharding.py)"
)

# 16 = 2 points per device per chunk: chunk_size / 8 divides the 8 per device.
CHUNK_SIZES = [None, 16]
GATHERS = ("all-gather(", "all-to-all(", "collective-permute(")


def compile_sharded(fn):
    """`fn(inputs, targets)` compiled for the sharded data: (callable, HLO text)."""
    data = fo.shard_data(DATA)
    compiled = jax.jit(fn).lower(*data).compile()
    return ft.partial(compiled, *data), compiled.as_text()


def test_shard_data_splits_the_leading_axis_over_all_devices():
    for leaf, original in zip(fo.shard_data(DATA), DATA, strict=True):
        assert isinstance(leaf.sharding, NamedSharding)
        assert leaf.sharding.spec == PartitionSpec("data")
        assert leaf.sharding.shard_shape(leaf.shape)[0] == NUM_DATA // 8
        np.testing.assert_array_equal(leaf, original)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_sharded_mv_is_one_all_reduce_and_equals_unsharded(kind, chunk_size):
    """Each device on its shard, one all-reduce; MC draws the same samples."""
    run, hlo = compile_sharded(ft.partial(mv, kind, chunk_size=chunk_size))
    assert hlo.count("all-reduce(") == 1
    assert not any(gather in hlo for gather in GATHERS)
    assert_close(run(), expected(kind)["mv"])


@pytest.mark.parametrize(
    "kind, chunk_size", [(kind, 16) for kind in KINDS] + [("mc", None)]
)
def test_sharded_matrix_diagonal_and_cg_equal_unsharded(kind, chunk_size):
    run, hlo = compile_sharded(ft.partial(quantities, kind, chunk_size=chunk_size))
    assert not any(gather in hlo for gather in GATHERS)
    for name, value in run().items():
        assert_close(value, expected(kind)[name], err_msg=name)


def test_automatic_chunks_of_the_diagonal_keep_the_sharding(monkeypatch):
    # Rows of about 5 points per chunk: rounded to 8, a chunk size that keeps it.
    row_bytes = 8 * sum(leaf.size for leaf in jax.tree.leaves(PARAMS))
    monkeypatch.setattr(fo._operators, "_ROWS_BYTES", 5 * row_bytes)
    run, hlo = compile_sharded(
        lambda inputs, targets: operator("ef", (inputs, targets)).diagonal()
    )
    assert not any(gather in hlo for gather in GATHERS)
    assert_close(run(), expected("ef")["diagonal"])


@pytest.mark.parametrize("chunk_size", [12, 4])
def test_chunk_size_that_would_gather_sharded_data_is_refused(chunk_size):
    # 12 does not divide the 64 points; 4 is not a multiple of the 8 devices.
    expected = (
        r"chunk_size must divide the number of data points \(64\) and be a multiple "
        r"of the number of devices the data is sharded over \(8\), i\.e\. chunk_size "
        rf"/ 8 must divide the 8 points per device; got chunk_size={chunk_size}\."
    )
    with pytest.raises(ValueError, match=expected):
        operator("ef", fo.shard_data(DATA), chunk_size)
    # Under jit (the README's way) the sharding is not known while tracing: the
    # same refusal, from the static shapes, instead of an all-gather.
    with pytest.raises(ValueError, match=expected + ".* Under jit the data's sharding"):
        jax.jit(ft.partial(mv, "ef", chunk_size=chunk_size))(*fo.shard_data(DATA))


def test_shard_data_refuses_a_data_axis_it_cannot_split():
    with pytest.raises(
        ValueError,
        match=r"data\[0\] must have a leading data axis whose length is a multiple of "
        r"8 \(the shards along 'data'\); got shape \(60, 3\)\.",
    ):
        fo.shard_data((DATA[0][:60], DATA[1][:60]))
