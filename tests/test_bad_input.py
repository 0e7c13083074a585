"""Bad input is a clear error naming the argument, never a wrong number."""

import jax
import jax.numpy as jnp
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
ERRORS = (ValueError, TypeError)
KINDS = ["empirical", "mc", "ggn"]


def build(kind, data, loss_fn, params=PARAMS, **kwargs):
    if kind == "empirical":
        return fo.EmpiricalFisherOperator(mlp, params, data, loss_fn, **kwargs)
    if kind == "mc":
        return fo.MCFisherOperator(mlp, params, data, loss_fn, KEY, **kwargs)
    return fo.GGNOperator(mlp, params, data, loss_fn, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_loss_name(kind):
    with pytest.raises(ERRORS, match="loss_fn") as info:
        build(kind, make_data("vector"), "mean_squared_error")
    assert "mean_squared_error" in str(info.value)


def test_unknown_loss_name_functional():
    with pytest.raises(ERRORS, match="loss_fn"):
        fo.create_empirical_fisher_mv(mlp, PARAMS, make_data("vector"), "msee")
    with pytest.raises(ERRORS, match="loss_fn"):
        fo.create_MC_fisher_mv(mlp, PARAMS, make_data("vector"), "msee", KEY)
    with pytest.raises(ERRORS, match="loss_fn"):
        fo.create_empirical_fisher_mv_without_data(mlp, PARAMS, "msee", 1.0)
    with pytest.raises(ERRORS, match="loss_fn"):
        fo.create_MC_fisher_mv_without_data(mlp, PARAMS, "msee", KEY, 1.0)


def test_empirical_fisher_needs_exactly_one_of_loss_fn_and_loss_grad_fn():
    data = make_data("vector")
    with pytest.raises(ERRORS, match=r"loss_(grad_)?fn"):
        fo.EmpiricalFisherOperator(mlp, PARAMS, data)
    with pytest.raises(ERRORS, match=r"loss_(grad_)?fn"):
        fo.EmpiricalFisherOperator(mlp, PARAMS, data, "mse", loss_grad_fn=quartic_grad)
    with pytest.raises(ERRORS, match=r"loss_(grad_)?fn"):
        fo.create_empirical_fisher_mv(mlp, PARAMS, data)
    with pytest.raises(ERRORS, match=r"loss_(grad_)?fn"):
        fo.create_empirical_fisher_mv(
            mlp, PARAMS, data, quartic_loss, loss_grad_fn=quartic_grad
        )
    with pytest.raises(ERRORS, match=r"loss_(grad_)?fn"):
        fo.create_empirical_fisher_mv_without_data(mlp, PARAMS, None, 1.0)


def test_mc_needs_a_key():
    data = make_data("vector")
    with pytest.raises(ERRORS, match="key"):
        fo.MCFisherOperator(mlp, PARAMS, data, "mse", None)
    with pytest.raises(ERRORS, match="key"):
        fo.create_MC_fisher_mv(mlp, PARAMS, data, "mse", None)
    with pytest.raises(ERRORS, match="key"):
        fo.create_MC_fisher_mv_without_data(mlp, PARAMS, "mse", None, 1.0)


@pytest.mark.parametrize("mc_samples", [0, -1])
def test_mc_samples_must_be_positive(mc_samples):
    data = make_data("vector")
    with pytest.raises(ERRORS, match="mc_samples"):
        fo.MCFisherOperator(mlp, PARAMS, data, "mse", KEY, mc_samples=mc_samples)
    with pytest.raises(ERRORS, match="mc_samples"):
        fo.create_MC_fisher_mv(mlp, PARAMS, data, "mse", KEY, mc_samples=mc_samples)


def test_mc_refuses_a_loss_without_a_sampler():
    data = make_data("vector")
    with pytest.raises(ERRORS, match="loss_fn"):
        fo.MCFisherOperator(mlp, PARAMS, data, quartic_loss, KEY)
    with pytest.raises(ERRORS, match="loss_fn"):
        fo.create_MC_fisher_mv(mlp, PARAMS, data, quartic_loss, KEY)
    with pytest.raises(ERRORS, match="loss_fn|sample"):
        fo.MCFisherOperator(mlp, PARAMS, data, fo.Likelihood(quartic_loss), KEY)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("as_dict", [False, True], ids=["tuple", "dict"])
def test_input_and_target_with_different_numbers_of_data(kind, as_dict):
    inputs, targets = make_inputs(5), make_targets("vector", 4)
    data = {"input": inputs, "target": targets} if as_dict else (inputs, targets)
    with pytest.raises(ERRORS, match="(?i)input|target|data"):
        build(kind, data, "mse")
    with pytest.raises(ERRORS, match="(?i)input|target|data"):
        build(kind, data, "mse", vmap_over_data=False)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vmap_over_data", [True, False], ids=["vmap", "batched"])
@pytest.mark.parametrize(
    ("loss", "target"),
    [
        ("mse", make_targets("labels")),  # integer labels where vectors are needed
        ("binary_cross_entropy", make_targets("labels")),
        ("cross_entropy", make_targets("labels").astype(jnp.float64)),  # float (N,)
        ("cross_entropy", make_targets("vector")[:, :2]),  # wrong number of classes
        ("mse", make_targets("vector")[:, :2]),  # wrong output size
    ],
    ids=["mse-labels", "bce-labels", "ce-float-labels", "ce-2-classes", "mse-2-dims"],
)
def test_target_layout_that_does_not_fit_the_loss(kind, vmap_over_data, loss, target):
    data = (make_inputs(), target)
    with pytest.raises(ERRORS, match="(?i)target"):
        build(kind, data, loss, vmap_over_data=vmap_over_data)


def test_bad_target_is_reported_under_jit():
    @jax.jit
    def build_and_apply(params, data):
        op = fo.EmpiricalFisherOperator(mlp, params, data, "mse")
        return op.mv(params)

    with pytest.raises(ERRORS, match="(?i)target"):
        build_and_apply(PARAMS, (make_inputs(), make_targets("labels")))


@pytest.mark.parametrize("kind", KINDS)
def test_non_floating_params(kind):
    params = jax.tree.map(lambda leaf: leaf.astype(jnp.int32), PARAMS)
    with pytest.raises(ERRORS, match="params"):
        build(kind, make_data("vector"), "mse", params=params)


def test_one_non_floating_params_leaf():
    params = {**PARAMS, "layer1": {**PARAMS["layer1"], "b": jnp.arange(4)}}
    with pytest.raises(ERRORS, match="params"):
        fo.EmpiricalFisherOperator(mlp, params, make_data("vector"), "mse")
    with pytest.raises(ERRORS, match="params"):
        fo.PriorPrecision(params, 1.0)


def _vector_cases():
    vector = random_vector(PARAMS)
    missing = {"layer1": vector["layer1"]}
    extra = {**vector, "layer3": jnp.zeros(2)}
    as_list = {"layer1": vector["layer1"], "layer2": list(vector["layer2"])}
    float32 = jax.tree.map(lambda leaf: leaf.astype(jnp.float32), vector)
    wrong_shape = {**vector, "layer2": (vector["layer2"][0].T, vector["layer2"][1])}
    flat_array = jnp.zeros(31)
    return {
        "missing_leaf": missing,
        "extra_leaf": extra,
        "list_for_tuple": as_list,
        "float32": float32,
        "transposed_leaf": wrong_shape,
        "flat_array": flat_array,
    }


VECTOR_CASES = _vector_cases()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vector", VECTOR_CASES.values(), ids=VECTOR_CASES.keys())
def test_vector_that_does_not_match_in_structure(kind, vector):
    op = build(kind, make_data("vector"), "mse")
    with pytest.raises(ERRORS, match="(?i)vector|structure|dtype|shape"):
        op.mv(vector)
    with pytest.raises(ERRORS, match="(?i)vector|structure|dtype|shape"):
        op.linearise().mv(vector)


def test_functional_mv_checks_its_vector():
    mv = fo.create_empirical_fisher_mv(mlp, PARAMS, make_data("vector"), "mse")
    with pytest.raises(ERRORS, match="(?i)vector|structure|dtype|shape"):
        mv(VECTOR_CASES["transposed_leaf"])


@pytest.mark.parametrize(
    "precision",
    [
        {"layer1": {"w": 1.0, "b": 1.0}},  # a leaf missing
        {"layer1": {"w": jnp.ones(3), "b": 1.0}, "layer2": (1.0, 1.0)},  # bad shape
    ],
    ids=["missing", "bad_shape"],
)
def test_prior_precision_that_does_not_fit_params(precision):
    with pytest.raises(ERRORS, match="precision"):
        fo.PriorPrecision(PARAMS, precision)


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_loss_type(kind):
    with pytest.raises(ERRORS, match="loss_fn"):
        build(kind, make_data("vector"), 3.0)
