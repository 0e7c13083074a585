"""Bad input is a clear error naming the argument, never a wrong number.

Every test matches the specific message: the argument's name and what was
expected (a raw JAX or numpy error would not pass).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import (
    init_params,
    make_data,
    make_inputs,
    make_targets,
    mlp,
    quartic_grad,
    quartic_loss,
    random_vector,
)

import fisherops as fo

PARAMS = init_params()
KEY = jax.random.key(0)
KINDS = ["empirical", "mc", "ggn"]
N = 5  # data points in make_data


def build(kind, data, loss_fn, params=PARAMS, model_fn=mlp, **kwargs):
    if kind == "empirical":
        return fo.EmpiricalFisherOperator(model_fn, params, data, loss_fn, **kwargs)
    if kind == "mc":
        return fo.MCFisherOperator(model_fn, params, data, loss_fn, KEY, **kwargs)
    return fo.GGNOperator(model_fn, params, data, loss_fn, **kwargs)


def raises(message, error=ValueError):
    """`pytest.raises` for an exact piece of the message (escaped, not a pattern)."""
    return pytest.raises(error, match=re.escape(message))


# ---------------------------------------------------------------------------
# loss arguments
# ---------------------------------------------------------------------------

UNKNOWN = "unknown loss_fn 'msee'; expected one of ['binary_cross_entropy', "


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_loss_name(kind):
    with raises(UNKNOWN):
        build(kind, make_data("vector"), "msee")


def test_unknown_loss_name_functional():
    with raises(UNKNOWN):
        fo.create_empirical_fisher_mv(mlp, PARAMS, make_data("vector"), "msee")
    with raises(UNKNOWN):
        fo.create_MC_fisher_mv(mlp, PARAMS, make_data("vector"), "msee", KEY)
    with raises(UNKNOWN):
        fo.create_empirical_fisher_mv_without_data(mlp, PARAMS, "msee", 1.0)
    with raises(UNKNOWN):
        fo.create_MC_fisher_mv_without_data(mlp, PARAMS, "msee", KEY, 1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_loss_type(kind):
    with raises("loss_fn must be a loss name, a callable", TypeError):
        build(kind, make_data("vector"), 3.0)


def test_empirical_fisher_needs_exactly_one_of_loss_fn_and_loss_grad_fn():
    data = make_data("vector")
    expected = "the empirical Fisher needs exactly one of loss_fn and loss_grad_fn; got"
    with raises(f"{expected} neither."):
        fo.EmpiricalFisherOperator(mlp, PARAMS, data)
    with raises(f"{expected} both."):
        fo.EmpiricalFisherOperator(mlp, PARAMS, data, "mse", loss_grad_fn=quartic_grad)
    with raises(f"{expected} neither."):
        fo.create_empirical_fisher_mv(mlp, PARAMS, data)
    with raises(f"{expected} both."):
        fo.create_empirical_fisher_mv(
            mlp, PARAMS, data, quartic_loss, loss_grad_fn=quartic_grad
        )
    with raises(f"{expected} neither."):
        fo.create_empirical_fisher_mv_without_data(mlp, PARAMS, None, 1.0)


def test_mc_needs_a_key():
    data = make_data("vector")
    expected = (
        "key must be a jax.random.key (or PRNGKey) to draw samples with; got None."
    )
    with raises(expected):
        fo.MCFisherOperator(mlp, PARAMS, data, "mse", None)
    with raises(expected):
        fo.create_MC_fisher_mv(mlp, PARAMS, data, "mse", None)
    with raises(expected):
        fo.create_MC_fisher_mv_without_data(mlp, PARAMS, "mse", None, 1.0)
    with raises("key must be one jax.random.key (or PRNGKey); got key<fry>[2]."):
        fo.MCFisherOperator(mlp, PARAMS, data, "mse", jax.random.split(KEY))


@pytest.mark.parametrize(
    ("mc_samples", "shown"),
    [(0, "0"), (-1, "-1"), (True, "True"), (2.0, "2.0"), (jnp.array([1, 2]), "a ")],
    ids=["zero", "negative", "bool", "float", "vector"],
)
def test_mc_samples_must_be_a_positive_int(mc_samples, shown):
    data = make_data("vector")
    with raises(f"mc_samples must be an int >= 1; got {shown}"):
        fo.MCFisherOperator(mlp, PARAMS, data, "mse", KEY, mc_samples=mc_samples)
    with raises(f"mc_samples must be an int >= 1; got {shown}"):
        fo.create_MC_fisher_mv(mlp, PARAMS, data, "mse", KEY, mc_samples=mc_samples)


def test_mc_samples_none_is_one():
    """laplax allows mc_samples=None; it means one sample per datum."""
    data = make_data("labels")
    default = fo.MCFisherOperator(mlp, PARAMS, data, "cross_entropy", KEY)
    none = fo.MCFisherOperator(mlp, PARAMS, data, "cross_entropy", KEY, mc_samples=None)
    assert none.mc_samples == 1
    np.testing.assert_array_equal(none.as_matrix(), default.as_matrix())


def test_mc_refuses_a_loss_without_a_sampler():
    data = make_data("vector")
    expected = "the Monte-Carlo Fisher needs a loss_fn it can sample targets from"
    with raises(expected):
        fo.MCFisherOperator(mlp, PARAMS, data, quartic_loss, KEY)
    with raises(expected):
        fo.create_MC_fisher_mv(mlp, PARAMS, data, quartic_loss, KEY)
    with raises(f"{expected}: a built-in loss name, a fisherops.Likelihood"):
        fo.MCFisherOperator(mlp, PARAMS, data, fo.Likelihood(quartic_loss), KEY)


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("as_dict", [False, True], ids=["tuple", "dict"])
def test_input_and_target_with_different_numbers_of_data(kind, as_dict):
    inputs, targets = make_inputs(5), make_targets("vector", 4)
    data = {"input": inputs, "target": targets} if as_dict else (inputs, targets)
    expected = "data input has 5 data points but data target has 4; axis 0 must"
    with raises(expected):
        build(kind, data, "mse")
    with raises(expected):
        build(kind, data, "mse", vmap_over_data=False)


def test_data_that_is_not_a_pair():
    with raises("data must be {'input': X, 'target': Y} or a tuple (X, Y);", TypeError):
        build("ggn", {"x": make_inputs(), "y": make_targets("vector")}, "mse")


@pytest.mark.parametrize("kind", KINDS)
def test_empty_data(kind):
    with raises("data must hold at least one data point; got 0."):
        build(kind, (make_inputs(0), make_targets("vector", 0)), "mse")


@pytest.mark.parametrize("where", ["params", "input", "target"])
def test_non_finite_params_or_data(where):
    inputs, targets = make_data("vector")
    params = PARAMS
    if where == "params":
        params = {**PARAMS, "layer1": {**PARAMS["layer1"], "b": jnp.full(4, jnp.nan)}}
        expected = "params['layer1']['b'] must be finite; got 4 NaN or inf values."
    elif where == "input":
        inputs = inputs.at[2, 1].set(jnp.inf)
        expected = "data input must be finite; got 1 NaN or inf value."
    else:
        targets = targets.at[0, 0].set(jnp.nan)
        expected = "data target must be finite; got 1 NaN or inf value."
    with raises(expected):
        build("ggn", (inputs, targets), "mse", params=params)


def test_numpy_data_is_copied():
    """Editing the user's numpy arrays afterwards does not change the operator."""
    inputs, targets = (np.array(a, copy=True) for a in make_data("vector"))
    operator = build("empirical", (inputs, targets), "mse")
    vector = random_vector(PARAMS)
    before = operator.mv(vector)
    inputs[:] = 0.0
    targets[:] = 1.0
    after = operator.mv(vector)
    jax.tree.map(np.testing.assert_array_equal, after, before)


class ArrayLike:
    """An object that only defines `__array__` (a dataset wrapper)."""

    def __init__(self, array):
        self.array = np.asarray(array)

    def __array__(self, dtype=None, copy=None):
        return self.array if dtype is None else self.array.astype(dtype)


def test_lists_and_array_likes_are_data():
    """Issue 19.7: nested lists of numbers and objects with only `__array__` are
    arrays (were "leading sizes ['None']" and "Cannot determine dtype"); anything
    else names the argument."""
    inputs, targets = (np.asarray(a) for a in make_data("vector"))
    vector = random_vector(PARAMS)
    expected = build("ggn", (inputs, targets), "mse").mv(vector)
    for data in (
        (inputs.tolist(), targets.tolist()),
        (ArrayLike(inputs), ArrayLike(targets)),
    ):
        got = build("ggn", data, "mse").mv(vector)
        jax.tree.map(np.testing.assert_array_equal, got, expected)
    with raises("data target must be an array (or something np.asarray", TypeError):
        build("ggn", (inputs, "targets"), "mse")


@pytest.mark.parametrize("vmap_over_data", [True, False], ids=["vmap", "batched"])
@pytest.mark.parametrize("extra", [lambda y: (y, 1.0), lambda y: {"logits": y}])
def test_model_fn_returning_a_pytree(vmap_over_data, extra):
    """Issue 19.7: a `model_fn` returning a tuple or dict (was `AttributeError:
    'tuple' object has no attribute 'ndim'`)."""
    with raises("model_fn must return one array", TypeError):
        build(
            "ggn",
            make_data("vector"),
            "mse",
            model_fn=lambda x, p: extra(mlp(x, p)),
            vmap_over_data=vmap_over_data,
        )


# ---------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------

CE = "loss 'cross_entropy' needs data target as integer class labels in [0, 3) "


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vmap_over_data", [True, False], ids=["vmap", "batched"])
@pytest.mark.parametrize(
    ("loss", "target", "expected"),
    [
        (
            "mse",
            make_targets("vector").astype(jnp.int32),
            "loss 'mse' needs data target of floats shaped like the outputs (5, 3); "
            "got int32 targets (integer class labels are for 'cross_entropy'",
        ),
        (
            "binary_cross_entropy",
            make_targets("labels"),
            "loss 'binary_cross_entropy' needs data target of labels in [0, 1] "
            "shaped like the outputs (5, 3); got shape (5,).",
        ),
        (
            "cross_entropy",
            make_targets("labels").astype(jnp.float64),
            f"{CE}of shape (5,) or (5, 1), or probability vectors of shape (5, 3); "
            "got float64 targets of shape (5,) (cast class labels to int).",
        ),
        ("cross_entropy", make_targets("vector")[:, :2], "got float64 targets of"),
        (
            "mse",
            make_targets("vector")[:, :2],
            "loss 'mse' needs data target of floats shaped like the outputs (5, 3); "
            "got shape (5, 2).",
        ),
    ],
    ids=["mse-int", "bce-labels", "ce-float-labels", "ce-2-classes", "mse-2-dims"],
)
def test_target_layout_that_does_not_fit_the_loss(
    kind, vmap_over_data, loss, target, expected
):
    data = (make_inputs(), target)
    with raises(expected):
        build(kind, data, loss, vmap_over_data=vmap_over_data)


def test_bad_target_is_reported_under_jit():
    @jax.jit
    def build_and_apply(params, data):
        op = fo.EmpiricalFisherOperator(mlp, params, data, "mse")
        return op.mv(params)

    with raises("loss 'mse' needs data target of floats shaped like the outputs"):
        build_and_apply(PARAMS, (make_inputs(), make_targets("labels")))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("labels", "shown"),
    [([1, 2, 3, 1, 2], "[1, 3] (0-based"), ([0, -1, 2, 1, 0], "[-1, 2] (0-based")],
    ids=["one_based", "minus_one"],
)
def test_labels_out_of_range(kind, labels, shown):
    data = (make_inputs(), jnp.asarray(labels))
    with raises(
        f"{CE}of shape (5,) or (5, 1), or probability vectors of shape (5, 3); "
    ):
        build(kind, data, "cross_entropy")
    with raises(f"got labels in {shown}"):
        build(kind, (data[0], data[1][:, None]), "cross_entropy")


def test_out_of_range_labels_under_jit_count_as_no_target():
    """Under jit labels cannot be checked (documented): label C counts as zeros."""
    inputs = make_inputs()
    labels = jnp.asarray([0, 1, 3, 1, 2])

    @jax.jit
    def matrix(labels):
        return build("empirical", (inputs, labels), "cross_entropy").as_matrix()

    targets = jax.nn.one_hot(labels, 3)  # a row of zeros for label 3
    assert not targets[2].any()
    np.testing.assert_allclose(matrix(labels), matrix(targets), atol=1e-12)


def test_bool_labels_are_reported_as_bool():
    data = (make_inputs(), jnp.asarray([True, False, True, True, False]))
    with raises("got bool targets of shape (5,) (cast class labels to int)."):
        build("ggn", data, "cross_entropy")


def test_integer_one_hot_targets_are_probability_vectors():
    one_hot = make_targets("one_hot")
    as_int = build(
        "empirical", (make_inputs(), one_hot.astype(jnp.int32)), "cross_entropy"
    )
    as_float = build("empirical", (make_inputs(), one_hot), "cross_entropy")
    np.testing.assert_allclose(as_int.as_matrix(), as_float.as_matrix())


def test_soft_targets_must_sum_to_one():
    soft = make_targets("soft")
    build("ggn", (make_inputs(), soft), "cross_entropy")
    with raises(
        "loss 'cross_entropy' needs data target probabilities that sum to 1 over the "
        "classes (axis -1); got sums up to 0.5 away from 1."
    ):
        build("empirical", (make_inputs(), soft * 0.5), "cross_entropy")
    with raises("needs data target probabilities in [0, 1]; got values in [-0.98"):
        build("empirical", (make_inputs(), soft - 1), "cross_entropy")


def test_binary_targets_must_be_in_the_unit_interval():
    binary = make_targets("binary")
    with raises(
        "loss 'binary_cross_entropy' needs data target labels in [0, 1]; got values "
        "in [0, 2]."
    ):
        build("empirical", (make_inputs(), binary * 2), "binary_cross_entropy")


@pytest.mark.parametrize("vmap_over_data", [True, False], ids=["vmap", "batched"])
def test_cross_entropy_with_a_scalar_per_datum(vmap_over_data):
    def scalar(x, params):
        return mlp(x, params)[..., 0]

    with raises(
        "loss 'cross_entropy' needs model_fn to return logits of shape (C,) or "
        "(..., C) per datum (the classes last); got outputs (5,), i.e. a scalar per "
        "datum; for one binary logit use 'binary_cross_entropy'"
    ):
        build(
            "ggn",
            make_data("labels"),
            "cross_entropy",
            model_fn=scalar,
            vmap_over_data=vmap_over_data,
        )


def test_cross_entropy_labels_without_the_position_axes():
    """Logits `(1, 3)` per datum (one position) need labels `(N, 1)`."""

    def row(x, params):
        return mlp(x, params)[None]

    with raises(
        f"{CE}of shape (5, 1), or probability vectors of shape (5, 1, 3); got int"
    ):
        build("mc", make_data("labels"), "cross_entropy", model_fn=row)


# ---------------------------------------------------------------------------
# counts and sizes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (np.inf, "num_total_samples must be a positive finite number; got inf."),
        (0, "num_total_samples must be a positive finite number; got 0."),
        (np.nan, "num_total_samples must be a positive finite number; got nan."),
        (True, "num_total_samples must be a positive finite number (a scalar); got"),
        (jnp.ones(2), "num_total_samples must be a positive finite number (a scalar)"),
    ],
    ids=["inf", "zero", "nan", "bool", "vector"],
)
def test_num_total_samples(value, expected):
    with raises(expected):
        build("ggn", make_data("vector"), "mse", num_total_samples=value)


@pytest.mark.parametrize("value", [1e300, 1e-300])
def test_scale_must_be_finite_and_positive_in_the_params_dtype(value):
    """Issue 19.7: with float32 params `1e300 / N` was `inf` and `1e-300 / N`
    was 0, silently."""
    params = jax.tree.map(lambda leaf: leaf.astype(jnp.float32), PARAMS)
    with raises("num_total_samples / num_curv_samples = "):
        build("ggn", make_data("vector"), "mse", params, num_total_samples=value)


@pytest.mark.parametrize(
    "chunk_size", [np.int64(2), jnp.array(2), np.array(2, np.int32)], ids=str
)
def test_chunk_size_accepts_numpy_and_zero_d_integers(chunk_size):
    data = make_data("labels")
    chunked = build("ggn", data, "cross_entropy", chunk_size=chunk_size)
    assert chunked.chunk_size == 2 and type(chunked.chunk_size) is int
    np.testing.assert_allclose(
        chunked.as_matrix(), build("ggn", data, "cross_entropy").as_matrix()
    )


@pytest.mark.parametrize(
    ("chunk_size", "shown"),
    [
        (True, "True"),
        (0, "0"),
        (2.5, "2.5"),
        (np.array([2], np.int32), "a int32[1] array"),
    ],
    ids=["bool", "zero", "float", "vector"],
)
def test_chunk_size_must_be_a_positive_int(chunk_size, shown):
    with raises(f"chunk_size must be an int >= 1; got {shown}."):
        build("ggn", make_data("vector"), "mse", chunk_size=chunk_size)


# ---------------------------------------------------------------------------
# params and vectors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_non_floating_params(kind):
    params = jax.tree.map(lambda leaf: leaf.astype(jnp.int32), PARAMS)
    with raises(
        "params must be a pytree of floating arrays; got int32 at params['layer1']",
        TypeError,
    ):
        build(kind, make_data("vector"), "mse", params=params)


def test_one_non_floating_params_leaf():
    params = {**PARAMS, "layer1": {**PARAMS["layer1"], "b": jnp.arange(4)}}
    with raises(
        "params must be a pytree of floating arrays; got int", TypeError
    ) as info:
        fo.EmpiricalFisherOperator(mlp, params, make_data("vector"), "mse")
    assert "at params['layer1']['b']." in str(info.value)
    with raises("params must be a pytree of floating arrays; got int", TypeError):
        fo.PriorPrecision(params, 1.0)


def _vector_cases():
    vector = random_vector(PARAMS)
    structure = "vector must have the structure of params PyTreeDef("
    return {
        "missing_leaf": ({"layer1": vector["layer1"]}, structure),
        "extra_leaf": ({**vector, "layer3": jnp.zeros(2)}, structure),
        "list_for_tuple": (
            {"layer1": vector["layer1"], "layer2": list(vector["layer2"])},
            structure,
        ),
        "float32": (
            jax.tree.map(lambda leaf: leaf.astype(jnp.float32), vector),
            "vector['layer1']['b'] must be float64[4] like params; got float32[4].",
        ),
        "transposed_leaf": (
            {**vector, "layer2": (vector["layer2"][0].T, vector["layer2"][1])},
            "vector['layer2'][0] must be float64[4, 3] like params; got float64[3, 4].",
        ),
        "flat_array": (jnp.zeros(31), f"{structure}{{'layer1'"),
    }


VECTOR_CASES = _vector_cases()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("vector", "expected"), VECTOR_CASES.values(), ids=VECTOR_CASES.keys()
)
def test_vector_that_does_not_match_in_structure(kind, vector, expected):
    op = build(kind, make_data("vector"), "mse")
    with raises(expected):
        op.mv(vector)
    with raises(expected):
        op.linearise().mv(vector)


def test_functional_mv_checks_its_vector():
    mv = fo.create_empirical_fisher_mv(mlp, PARAMS, make_data("vector"), "mse")
    vector, expected = VECTOR_CASES["transposed_leaf"]
    with raises(expected):
        mv(vector)


@pytest.mark.parametrize(
    ("precision", "expected"),
    [
        (
            {"layer1": {"w": 1.0, "b": 1.0}},
            "precision must be a scalar, a pytree of scalars with the structure of "
            "params, or a params-shaped pytree of arrays; got structure",
        ),
        (
            {"layer1": {"w": jnp.ones(3), "b": 1.0}, "layer2": (1.0, 1.0)},
            "precision leaves must be scalars or shaped like params; got shape (3,) "
            "for a params leaf of shape (3, 4).",
        ),
    ],
    ids=["missing", "bad_shape"],
)
def test_prior_precision_that_does_not_fit_params(precision, expected):
    with raises(expected):
        fo.PriorPrecision(PARAMS, precision)
