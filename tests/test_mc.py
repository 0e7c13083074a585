"""The Monte-Carlo Fisher.

F = factor / M * sum_{n,m} J_n^T g_nm g_nm^T J_n,  g_nm = grad_f c(y~_nm, f_n),
y~_nm ~ r(y | f_n). Its samples cannot be redrawn bit-exactly outside fisherops,
so it is tested by what SPEC.md fixes:

- its form: for cross-entropy every `g_nm` is `p_n - e_c` for some class `c`, so
  `F` must be `sum_{n,c} (k_nc / M) J_n^T (p_n - e_c)(p_n - e_c)^T J_n` with
  integer counts `k_nc >= 0` summing to `M` over `c`; for binary cross-entropy
  `F` is fixed by the integer counts of ones per output (and pair of outputs);
  both are checked by least squares against dense `jax.jacfwd` Jacobians;
- one fixed matrix per key, the same in every mode, chunking and target layout
  (samples replace the targets), symmetric PSD with rank <= N * M;
- its average over keys converges to the GGN (the exact Fisher).
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from _reference import (
    LOSS_TARGET_IDS,
    LOSS_TARGETS,
    N_DATA,
    assert_close,
    assert_like_params,
    check_operator,
    dense_ggn,
    flat,
    init_params,
    jacobian,
    make_data,
    mlp,
    model_for,
    random_vector,
)

import fisherops as fo

PARAMS = init_params()
KEY = jax.random.key(0)


def mc(data, loss, key=KEY, *, model_fn=mlp, **kwargs):
    return fo.MCFisherOperator(model_fn, PARAMS, data, loss, key, **kwargs)


def rank(matrix):
    matrix = np.asarray(matrix)
    return np.linalg.matrix_rank(matrix, tol=1e-8 * max(np.abs(matrix).max(), 1e-300))


def assert_symmetric_psd(matrix):
    matrix = np.asarray(matrix)
    assert_close(matrix, matrix.T, err_msg="not symmetric")
    assert np.linalg.eigvalsh(matrix).min() > -1e-10 * np.abs(matrix).max()


# --------------------------------------------------------------------------
# the form of the matrix, against dense Jacobians
# --------------------------------------------------------------------------


def _jacobians_and_outputs(inputs):
    jacobians = np.stack([np.asarray(jacobian(mlp, PARAMS, x)) for x in inputs])
    outputs = np.stack([np.asarray(mlp(x, PARAMS)) for x in inputs])
    return jacobians, outputs


def _solve_for_weights(matrix, constant, atoms):
    """Least-squares weights w with matrix = constant + sum_i w_i atoms_i."""
    target = (np.asarray(matrix) - constant).ravel()
    design = np.stack([atom.ravel() for atom in atoms], axis=1)
    weights, *_ = np.linalg.lstsq(design, target, rcond=None)
    residual = np.linalg.norm(design @ weights - target)
    assert residual < 1e-8 * np.linalg.norm(matrix), "not of the sampled form"
    return weights


def _assert_counts(counts, mc_samples):
    counts = np.asarray(counts)
    assert_close(counts, np.round(counts), atol=1e-6, err_msg="counts not integers")
    assert np.all(np.round(counts) >= 0)
    assert np.all(np.round(counts) <= mc_samples)


def check_cross_entropy_form(matrix, inputs, mc_samples):
    """F = sum_{n,c} (k_nc / M) J_n^T (p_n - e_c)(p_n - e_c)^T J_n, sum_c k_nc = M."""
    jacobians, outputs = _jacobians_and_outputs(inputs)
    probabilities = np.exp(outputs) / np.exp(outputs).sum(axis=1, keepdims=True)
    n_data, n_classes = probabilities.shape
    atoms = []
    for jac, p in zip(jacobians, probabilities, strict=True):
        for c in range(n_classes):
            column = jac.T @ (p - np.eye(n_classes)[c])
            atoms.append(np.outer(column, column))
    weights = _solve_for_weights(matrix, 0.0, atoms)
    counts = weights.reshape(n_data, n_classes) * mc_samples
    _assert_counts(counts, mc_samples)
    assert_close(counts.sum(axis=1), mc_samples, atol=1e-6, err_msg="counts per datum")


def check_bernoulli_form(matrix, inputs, mc_samples):
    """(1/M) sum_m (p - y_m)(p - y_m)^T with y_m in {0,1}^O is
    p p^T + sum_o a_o (e_o e_o^T - p e_o^T - e_o p^T) + sum_{o<q} b_oq (e_o e_q^T +
    e_q e_o^T), with a_o = #(y_mo = 1) / M and b_oq = #(y_mo = y_mq = 1) / M."""
    jacobians, outputs = _jacobians_and_outputs(inputs)
    probabilities = 1.0 / (1.0 + np.exp(-outputs))
    n_out = probabilities.shape[1]
    eye = np.eye(n_out)
    constant = 0.0
    atoms, pairs = [], []
    for jac, p in zip(jacobians, probabilities, strict=True):
        constant = constant + jac.T @ np.outer(p, p) @ jac
        for o in range(n_out):
            e = eye[o]
            atoms.append(
                jac.T @ (np.outer(e, e) - np.outer(p, e) - np.outer(e, p)) @ jac
            )
        for o in range(n_out):
            for q in range(o + 1, n_out):
                pair = np.outer(eye[o], eye[q]) + np.outer(eye[q], eye[o])
                atoms.append(jac.T @ pair @ jac)
                pairs.append((o, q))
    weights = _solve_for_weights(matrix, constant, atoms) * mc_samples
    per_datum = n_out + len(pairs) // len(inputs)
    counts = weights.reshape(len(inputs), per_datum)
    _assert_counts(counts, mc_samples)
    ones, both = np.round(counts[:, :n_out]), np.round(counts[:, n_out:])
    for k, (o, q) in enumerate(pairs[: per_datum - n_out]):
        assert np.all(both[:, k] <= np.minimum(ones[:, o], ones[:, q]))


def check_form(loss, matrix, inputs, mc_samples):
    matrix = np.asarray(matrix)
    assert_symmetric_psd(matrix)
    assert rank(matrix) <= len(inputs) * mc_samples
    if loss == "cross_entropy":
        check_cross_entropy_form(matrix, inputs, mc_samples)
    elif loss == "binary_cross_entropy":
        check_bernoulli_form(matrix, inputs, mc_samples)


@functools.cache
def canonical_matrix(loss, mc_samples):
    """The matrix for KEY on the loss's first target layout, vmapped, unchunked."""
    target_kind = next(kind for name, kind in LOSS_TARGETS if name == loss)
    op = mc(make_data(target_kind), loss, mc_samples=mc_samples)
    return np.asarray(op.as_matrix())


# Every loss x target layout x mode, with mc_samples cycling through 1, 2 and 10
# so that each loss meets each value (every case compiles its own programs:
# the full product would triple the cost for no new path).
MATCH_CASES = [
    (loss, kind, vmap_over_data, (1, 2, 10)[(2 * i + j) % 3])
    for i, (loss, kind) in enumerate(LOSS_TARGETS)
    for j, vmap_over_data in enumerate((True, False))
]


@pytest.mark.parametrize(
    ("loss", "target_kind", "vmap_over_data", "mc_samples"),
    MATCH_CASES,
    ids=[
        f"{loss}-{kind}-{'vmap' if vmap else 'batched'}-{m}"
        for loss, kind, vmap, m in MATCH_CASES
    ],
)
def test_matches_reference(loss, target_kind, vmap_over_data, mc_samples):
    """Every loss x target layout x mode; chunk_size=2 (N=5, uneven).

    The matrix has the sampled form, and it is the same for every target layout
    and mode (the samples replace the targets and depend only on (key, n, m)).
    """
    data = make_data(target_kind)
    kwargs = {"mc_samples": mc_samples, "vmap_over_data": vmap_over_data}
    op = mc(data, loss, model_fn=model_for(vmap_over_data), **kwargs)
    matrix = np.asarray(op.as_matrix())
    check_form(loss, matrix, data[0], mc_samples)
    assert_close(matrix, canonical_matrix(loss, mc_samples), err_msg="layout/mode")

    vector = random_vector(PARAMS)
    product = op.mv(vector)
    assert_like_params(product, PARAMS)
    assert_close(flat(product), matrix @ flat(vector), err_msg="mv")
    assert_close(
        flat(op.linearise().mv(vector)), matrix @ flat(vector), err_msg="linearise"
    )
    assert_close(lx.diagonal(op), np.diag(matrix), err_msg="lineax.diagonal")

    chunked = mc(data, loss, model_fn=model_for(vmap_over_data), chunk_size=2, **kwargs)
    assert_close(flat(chunked.mv(vector)), matrix @ flat(vector), err_msg="chunked mv")


def test_chunked_operator_reads():
    """as_matrix, linearise().mv and the diagonal of a chunked MC operator.

    (Every combination's chunked mv is in test_matches_reference.)"""
    chunked = mc(
        make_data("labels"),
        "cross_entropy",
        model_fn=model_for(False),
        mc_samples=10,
        vmap_over_data=False,
        chunk_size=2,
    )
    check_operator(chunked, canonical_matrix("cross_entropy", 10), PARAMS)


def test_form_check_rejects_wrong_matrices():
    """The form checks above can fail: a GGN, a doubled MC matrix, and the
    laplax bug (the M one-hot samples of a datum summed into one vector) do."""
    data = make_data("labels")
    inputs = data[0]
    matrix = canonical_matrix("cross_entropy", 10)
    wrong = {
        "ggn": np.asarray(dense_ggn(mlp, PARAMS, data, "cross_entropy")),
        "doubled": 2.0 * matrix,
    }
    jacobians, outputs = _jacobians_and_outputs(inputs)
    p = np.exp(outputs) / np.exp(outputs).sum(axis=1, keepdims=True)
    rng = np.random.default_rng(0)
    summed = 0.0
    for jac, prob in zip(jacobians, p, strict=True):
        counts = np.bincount(rng.choice(3, size=10, p=prob), minlength=3)
        column = jac.T @ (prob - counts)
        summed = summed + np.outer(column, column) / 10
    wrong["summed_one_hot"] = summed
    for name, candidate in wrong.items():
        try:
            check_cross_entropy_form(candidate, inputs, 10)
        except AssertionError:
            continue
        pytest.fail(f"{name} passed the form check")


# --------------------------------------------------------------------------
# one fixed matrix per key
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss", "target_kind"),
    [
        ("mse", "vector"),
        ("cross_entropy", "labels"),
        ("binary_cross_entropy", "binary"),
    ],
)
def test_one_fixed_matrix_per_key(loss, target_kind):
    """Repeated mv calls, eager or jitted, and a rebuilt operator agree exactly."""
    data = make_data(target_kind)
    vector = random_vector(PARAMS)
    op = mc(data, loss, mc_samples=2)
    first = flat(op.mv(vector))
    np.testing.assert_array_equal(flat(op.mv(vector)), first)
    np.testing.assert_array_equal(flat(mc(data, loss, mc_samples=2).mv(vector)), first)
    jitted = eqx.filter_jit(lambda operator, v: operator.mv(v))
    once = flat(jitted(op, vector))
    np.testing.assert_array_equal(flat(jitted(op, vector)), once)
    assert_close(once, first)
    other = mc(data, loss, jax.random.key(1), mc_samples=2)
    assert not np.allclose(flat(other.mv(vector)), first)


@pytest.mark.parametrize(
    ("loss", "target_kind"),
    [
        ("mse", "vector"),
        ("cross_entropy", "labels"),
        ("binary_cross_entropy", "binary"),
    ],
)
def test_rank_with_three_data_points(loss, target_kind):
    n = 3
    data = make_data(target_kind, n=n)
    assert rank(mc(data, loss, mc_samples=1).as_matrix()) == n
    assert rank(mc(data, loss, mc_samples=2).as_matrix()) <= 2 * n


@pytest.mark.parametrize(
    ("loss", "target_kind"),
    [
        ("mse", "vector"),
        ("cross_entropy", "labels"),
        ("binary_cross_entropy", "binary"),
    ],
)
def test_samples_depend_only_on_key_datum_and_sample_index(loss, target_kind):
    """y~_nm depends only on (key, n, m): not on N, not on M.

    So dropping data points removes their terms only (the difference is PSD of
    rank <= dropped * M), and 2 * F(M=2) - F(M=1) is the m=1 term alone (PSD of
    rank <= N).
    """
    inputs, targets = make_data(target_kind)
    full = canonical_matrix(loss, 2)
    prefix = np.asarray(mc((inputs[:3], targets[:3]), loss, mc_samples=2).as_matrix())
    assert_symmetric_psd(full - prefix)
    assert rank(full - prefix) <= 2 * 2

    second_sample = 2.0 * full - canonical_matrix(loss, 1)
    assert_symmetric_psd(second_sample)
    assert rank(second_sample) <= N_DATA


def padded(x):
    """Inputs of width 2 made width 3 by repeating the first feature."""
    return jnp.concatenate([x, x[..., :1]], axis=-1)


def padded_mlp(x, params):
    return mlp(padded(x), params)


@pytest.mark.parametrize(("loss", "target_kind"), LOSS_TARGETS, ids=LOSS_TARGET_IDS)
def test_single_unbatched_datum_is_a_batch_of_one(loss, target_kind):
    """Without vmap, one datum with no batch axis is datum n=0 of a batch of one.

    Its input has width 2, the output 3: an input of the output's length would
    read as a batch (the number of data points comes from the data)."""
    inputs, targets = make_data(target_kind)
    inputs = inputs[:, :2]
    single = mc(
        (inputs[0], targets[0]),
        loss,
        model_fn=padded_mlp,
        vmap_over_data=False,
        mc_samples=2,
    )
    batch = mc((inputs[:1], targets[:1]), loss, model_fn=padded_mlp, mc_samples=2)
    matrix = np.asarray(batch.as_matrix())
    check_form(loss, matrix, padded(inputs[:1]), 2)
    vector = random_vector(PARAMS)
    assert_close(single.as_matrix(), matrix)
    assert_close(flat(single.mv(vector)), matrix @ flat(vector))


@pytest.mark.parametrize(
    ("num_curv_samples", "num_total_samples", "factor"),
    [(None, 20, 4.0), (10, None, 1.0), (2, 7, 3.5)],
)
def test_scaling(num_curv_samples, num_total_samples, factor):
    scaled = mc(
        make_data("labels"),
        "cross_entropy",
        mc_samples=2,
        num_curv_samples=num_curv_samples,
        num_total_samples=num_total_samples,
    )
    check_operator(scaled, factor * canonical_matrix("cross_entropy", 2), PARAMS)


def test_jit_gives_the_eager_matrix():
    data = make_data("labels")

    @jax.jit
    def build(params, key):
        return fo.MCFisherOperator(
            mlp, params, data, "cross_entropy", key, mc_samples=2
        ).as_matrix()

    assert_close(build(PARAMS, KEY), canonical_matrix("cross_entropy", 2))


def test_legacy_uint32_key():
    data = make_data("labels")
    key = jax.random.PRNGKey(0)
    matrix = np.asarray(mc(data, "cross_entropy", key, mc_samples=2).as_matrix())
    again = mc(data, "cross_entropy", key, mc_samples=2).as_matrix()
    np.testing.assert_array_equal(again, matrix)
    check_form("cross_entropy", matrix, data[0], 2)


# --------------------------------------------------------------------------
# unbiasedness
# --------------------------------------------------------------------------


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
@pytest.mark.parametrize(
    ("loss", "target_kind"),
    [
        ("mse", "vector"),
        ("cross_entropy", "labels"),
        ("binary_cross_entropy", "binary"),
    ],
)
def test_average_over_keys_is_the_ggn(loss, target_kind, mc_samples):
    """E_key[F_MC] = GGN. (Every target layout gives the same matrix per key: see
    test_matches_reference.)"""
    data = make_data(target_kind)
    num_keys = {1: 2000, 10: 400}[mc_samples]
    estimate = mean_over_keys(data, loss, mc_samples, num_keys)
    exact = np.asarray(dense_ggn(mlp, PARAMS, data, loss))
    assert relative_error(estimate, exact) < UNBIASED_TOLERANCE


def test_average_over_keys_is_the_ggn_batched_chunked():
    data = make_data("labels_column")
    estimate = mean_over_keys(
        data,
        "cross_entropy",
        mc_samples=2,
        num_keys=1000,
        model_fn=model_for(False),
        vmap_over_data=False,
        chunk_size=2,
    )
    exact = np.asarray(dense_ggn(mlp, PARAMS, data, "cross_entropy"))
    assert relative_error(estimate, exact) < UNBIASED_TOLERANCE
