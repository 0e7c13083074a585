"""The Monte-Carlo Fisher.

F = factor / M * sum_{n,m} J_n^T g_nm g_nm^T J_n,  g_nm = grad_f c(y~_nm, f_n),
y~_nm ~ r(y | f_n). Its samples cannot be redrawn bit-exactly outside fisherops,
so it is tested by what the SPEC fixes: one fixed matrix per key, the same matrix
in every mode and chunking, symmetric PSD with rank <= N*M, and an average over
keys that converges to the GGN (the exact Fisher).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import (
    LOSS_TARGET_IDS,
    LOSS_TARGETS,
    N_DATA,
    assert_close,
    check_operator,
    dense_ggn,
    flat,
    init_params,
    make_data,
    make_targets,
    mlp,
    model_for,
    random_vector,
)
from jax.flatten_util import ravel_pytree

import fisherops as fo

PARAMS = init_params()
KEY = jax.random.key(0)


def mc(data, loss, key=KEY, *, model_fn=mlp, **kwargs):
    return fo.MCFisherOperator(model_fn, PARAMS, data, loss, key, **kwargs)


def matrix_from_mv(op, params):
    """The dense matrix assembled column by column from `op.mv`."""
    flat_params, unravel = ravel_pytree(params)
    basis = jnp.eye(flat_params.size, dtype=flat_params.dtype)
    return jax.vmap(lambda e: ravel_pytree(op.mv(unravel(e)))[0], out_axes=1)(basis)


def rank(matrix):
    matrix = np.asarray(matrix)
    return np.linalg.matrix_rank(matrix, tol=1e-8 * max(np.abs(matrix).max(), 1e-300))


def assert_symmetric_psd(matrix):
    matrix = np.asarray(matrix)
    assert_close(matrix, matrix.T, err_msg="not symmetric")
    assert np.linalg.eigvalsh(matrix).min() > -1e-10 * np.abs(matrix).max()


@pytest.mark.parametrize(("loss", "target_kind"), LOSS_TARGETS, ids=LOSS_TARGET_IDS)
def test_one_fixed_matrix_per_key(loss, target_kind):
    """Repeated mv calls, and a rebuilt operator, give identical numbers."""
    data = make_data(target_kind)
    vector = random_vector(PARAMS)
    op = mc(data, loss, mc_samples=2)
    first = flat(op.mv(vector))
    np.testing.assert_array_equal(flat(op.mv(vector)), first)
    np.testing.assert_array_equal(flat(mc(data, loss, mc_samples=2).mv(vector)), first)
    np.testing.assert_array_equal(
        flat(jax.jit(lambda v: op.mv(v))(vector)), flat(jax.jit(lambda v: op.mv(v))(vector))
    )
    np.testing.assert_array_equal(op.as_matrix(), op.as_matrix())
    other = mc(data, loss, jax.random.key(1), mc_samples=2)
    assert not np.allclose(other.as_matrix(), op.as_matrix())


@pytest.mark.parametrize("mc_samples", [1, 2, 10])
@pytest.mark.parametrize(("loss", "target_kind"), LOSS_TARGETS, ids=LOSS_TARGET_IDS)
def test_same_matrix_in_every_mode_and_chunking(loss, target_kind, mc_samples):
    """vmap_over_data True/False and chunk_size None/2 (N=5, uneven) agree."""
    data = make_data(target_kind)
    reference = mc(data, loss, mc_samples=mc_samples)
    matrix = np.asarray(reference.as_matrix())
    assert_close(matrix_from_mv(reference, PARAMS), matrix, err_msg="as_matrix vs mv")
    assert_symmetric_psd(matrix)
    assert rank(matrix) <= N_DATA * mc_samples
    for vmap_over_data in (True, False):
        for chunk_size in (None, 2):
            op = mc(
                data,
                loss,
                model_fn=model_for(vmap_over_data),
                mc_samples=mc_samples,
                vmap_over_data=vmap_over_data,
                chunk_size=chunk_size,
            )
            check_operator(op, matrix, PARAMS)


@pytest.mark.parametrize("mc_samples", [1, 10])
@pytest.mark.parametrize(
    ("loss", "target_kinds"),
    [
        ("cross_entropy", ["labels", "labels_column", "one_hot", "soft"]),
        ("mse", ["vector"]),
        ("binary_cross_entropy", ["binary"]),
    ],
)
def test_matrix_does_not_depend_on_targets(loss, target_kinds, mc_samples):
    """Sampled targets replace the given ones: only their layout is read."""
    inputs, _ = make_data(target_kinds[0])
    targets = [make_targets(kind) for kind in target_kinds]
    if loss == "mse":
        targets.append(targets[0] + 1.0)
    if loss == "binary_cross_entropy":
        targets.append(1.0 - targets[0])
    matrices = [
        np.asarray(mc((inputs, y), loss, mc_samples=mc_samples).as_matrix())
        for y in targets
    ]
    for matrix in matrices[1:]:
        assert_close(matrix, matrices[0])


@pytest.mark.parametrize("vmap_over_data", [True, False], ids=["vmap", "batched"])
@pytest.mark.parametrize(("loss", "target_kind"), LOSS_TARGETS, ids=LOSS_TARGET_IDS)
def test_rank_is_at_most_n_times_mc_samples(loss, target_kind, vmap_over_data):
    n = 3
    data = make_data(target_kind, n=n)
    kwargs = {"model_fn": model_for(vmap_over_data), "vmap_over_data": vmap_over_data}
    one = mc(data, loss, mc_samples=1, **kwargs).as_matrix()
    assert rank(one) == n
    two = mc(data, loss, mc_samples=2, **kwargs).as_matrix()
    assert rank(two) <= 2 * n
    assert_symmetric_psd(two)


def mean_over_keys(data, loss, mc_samples, num_keys, **kwargs):
    keys = jax.random.split(jax.random.key(1234), num_keys)

    @jax.jit
    def mean(keys):
        def one(key):
            return mc(data, loss, key, mc_samples=mc_samples, **kwargs).as_matrix()

        return jnp.mean(jax.vmap(one)(keys), axis=0)

    return np.asarray(mean(keys))


def relative_error(estimate, exact):
    return np.linalg.norm(estimate - exact) / np.linalg.norm(exact)


# With 2000 draws per datum the relative Frobenius error of the average is about
# 0.01-0.05 for these losses; a Fisher off by a factor of 2 is off by 0.5 and one
# that accumulates the M one-hot samples into one vector is off by far more.
UNBIASED_TOLERANCE = 0.1


@pytest.mark.parametrize("mc_samples", [1, 10])
@pytest.mark.parametrize(("loss", "target_kind"), LOSS_TARGETS, ids=LOSS_TARGET_IDS)
def test_average_over_keys_is_the_ggn(loss, target_kind, mc_samples):
    data = make_data(target_kind)
    num_keys = {1: 2000, 10: 400}[mc_samples]
    estimate = mean_over_keys(data, loss, mc_samples, num_keys)
    exact = np.asarray(dense_ggn(mlp, PARAMS, data, loss))
    assert relative_error(estimate, exact) < UNBIASED_TOLERANCE


@pytest.mark.parametrize(
    ("loss", "target_kind"),
    [("cross_entropy", "labels"), ("cross_entropy", "labels_column"), ("mse", "vector")],
)
def test_average_over_keys_is_the_ggn_batched_chunked(loss, target_kind):
    data = make_data(target_kind)
    estimate = mean_over_keys(
        data,
        loss,
        mc_samples=2,
        num_keys=1000,
        model_fn=model_for(False),
        vmap_over_data=False,
        chunk_size=2,
    )
    exact = np.asarray(dense_ggn(mlp, PARAMS, data, loss))
    assert relative_error(estimate, exact) < UNBIASED_TOLERANCE


@pytest.mark.parametrize(("loss", "target_kind"), LOSS_TARGETS, ids=LOSS_TARGET_IDS)
def test_samples_depend_only_on_key_datum_and_sample_index(loss, target_kind):
    """y~_nm depends only on (key, n, m): not on N, not on M.

    So dropping data points removes their terms only (the difference is PSD of
    rank <= dropped * M), and 2 * F(M=2) - F(M=1) is the m=1 term alone (PSD of
    rank <= N).
    """
    inputs, targets = make_data(target_kind)
    full = np.asarray(mc((inputs, targets), loss, mc_samples=2).as_matrix())
    prefix = np.asarray(mc((inputs[:3], targets[:3]), loss, mc_samples=2).as_matrix())
    assert_symmetric_psd(full - prefix)
    assert rank(full - prefix) <= 2 * 2

    single = np.asarray(mc((inputs, targets), loss, mc_samples=1).as_matrix())
    second_sample = 2.0 * full - single
    assert_symmetric_psd(second_sample)
    assert rank(second_sample) <= N_DATA


@pytest.mark.parametrize(
    ("num_curv_samples", "num_total_samples", "factor"),
    [(None, 20, 4.0), (10, None, 1.0), (2, 7, 3.5)],
)
def test_scaling(num_curv_samples, num_total_samples, factor):
    data = make_data("labels")
    plain = np.asarray(mc(data, "cross_entropy", mc_samples=2).as_matrix())
    scaled = mc(
        data,
        "cross_entropy",
        mc_samples=2,
        num_curv_samples=num_curv_samples,
        num_total_samples=num_total_samples,
    )
    check_operator(scaled, factor * plain, PARAMS)


@pytest.mark.parametrize(("loss", "target_kind"), LOSS_TARGETS, ids=LOSS_TARGET_IDS)
def test_single_unbatched_datum_is_a_batch_of_one(loss, target_kind):
    """Without vmap, one datum with no batch axis is datum n=0 of a batch of one."""
    inputs, targets = make_data(target_kind)
    single = mc((inputs[0], targets[0]), loss, vmap_over_data=False, mc_samples=2)
    batch = mc((inputs[:1], targets[:1]), loss, mc_samples=2)
    check_operator(single, batch.as_matrix(), PARAMS)
    assert rank(single.as_matrix()) <= 2


def test_jit_gives_the_eager_matrix():
    data = make_data("labels")
    eager = mc(data, "cross_entropy", mc_samples=3).as_matrix()

    @jax.jit
    def build(params, key):
        return fo.MCFisherOperator(
            mlp, params, data, "cross_entropy", key, mc_samples=3
        ).as_matrix()

    assert_close(build(PARAMS, KEY), eager)


def test_legacy_uint32_key():
    data = make_data("labels")
    key = jax.random.PRNGKey(0)
    op = mc(data, "cross_entropy", key, mc_samples=2)
    matrix = np.asarray(op.as_matrix())
    np.testing.assert_array_equal(mc(data, "cross_entropy", key, mc_samples=2).as_matrix(), matrix)
    assert_symmetric_psd(matrix)
    assert 0 < rank(matrix) <= 2 * N_DATA
