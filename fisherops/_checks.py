"""Argument checks: one rule per idea, shared by the whole library."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree


def _leaf_signature(tree: PyTree) -> list[tuple[tuple[int, ...], np.dtype]]:
    return [(tuple(jnp.shape(x)), jnp.result_type(x)) for x in jtu.tree_leaves(tree)]


def _check_like(name: str, tree: PyTree, structure: PyTree) -> None:
    if jtu.tree_structure(tree) != jtu.tree_structure(structure) or _leaf_signature(
        tree
    ) != [(s.shape, s.dtype) for s in jtu.tree_leaves(structure)]:
        expected = jtu.tree_map(lambda s: f"{s.dtype}{list(s.shape)}", structure)
        got = jtu.tree_map(lambda x: f"{jnp.result_type(x)}{list(jnp.shape(x))}", tree)
        raise ValueError(
            f"{name} must have the curvature's params structure {expected}; got {got}."
        )


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}.")
    return int(value)


def _check_key(key) -> None:
    if key is None:
        raise ValueError("key must be a jax.random.key (or PRNGKey); got None.")
    dtype, shape = jnp.result_type(key), jnp.shape(key)
    typed = jnp.issubdtype(dtype, jax.dtypes.prng_key) and shape == ()
    raw = dtype == jnp.uint32 and shape == (2,)
    if not (typed or raw):
        raise ValueError(
            f"key must be one jax.random.key (or PRNGKey); got {dtype}{list(shape)}."
        )


def _check_method(name: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}.")
    return value


def _check_scalar(name: str, value) -> Array:
    if not (eqx.is_array_like(value) and jnp.ndim(value) == 0):
        shape = f" of shape {jnp.shape(value)}" if eqx.is_array_like(value) else ""
        raise ValueError(
            f"{name} must be a scalar (a float or a 0-d array); got "
            f"{type(value).__name__}{shape}."
        )
    return jnp.asarray(value)
