"""Layer discovery for KFAC: dense and convolution layers found in a model's jaxpr.

A *layer* is one `dot_general` or `conv_general_dilated` of the per-datum model
whose weight operand is a params leaf (possibly reshaped, transposed or cast),
with that leaf used nowhere else, plus, when there is one, the `add` of a bias
leaf to its output (possibly after reshapes). Nothing is tagged by the user: the
jaxpr of `model_fn` on one datum is traced, nested `jit`/`checkpoint` calls are
inlined, and the equations are classified here.

For every layer, three maps fix the Kronecker layout:

- the weight leaf as a matrix `W` of shape `(D_in, D_out)` (contracted dimensions
  first, then the output features);
- the layer's input on one datum as a matrix `a` of shape `(R, D_in)`: for a dense
  layer, the rows are the input's non-contracted dimensions (`R = 1` for a plain
  vector input); for a convolution, the patches (`im2col`) at each of the `R`
  output locations;
- the layer's output on one datum as `(R, D_out)`, so that `y = a W (+ b)`.

`run_tapped` re-evaluates the model with a zero *tap* added to every layer's
output and returns the layer inputs: the gradient with respect to the taps is
the backpropagated output gradient `g`, without any gradient of the params.
"""

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax import lax
from jax.extend import core as jex_core
from jaxtyping import Array, PyTree

# Calls whose body is inlined before the layers are looked for.
_INLINED = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr"}
_REMAT = ("checkpoint", "remat")
# Ops that only move a params leaf's elements around (or cast them).
_STRUCTURAL = {"reshape", "transpose", "squeeze", "convert_element_type", "copy"}


def _read(env: dict, atom) -> Any:
    return atom.val if isinstance(atom, jex_core.Literal) else env[atom]


def _bind(eqn, invals: list) -> list:
    params = eqn.primitive.get_bind_params(eqn.params)
    out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _inline_eval(jaxpr, consts, *args) -> list:
    """Evaluate `jaxpr`, descending into nested `jit`/`checkpoint` bodies."""
    env: dict = {}
    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        invals = [_read(env, v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _INLINED:
            body = eqn.params[_INLINED[name]]
            outs = _inline_eval(body.jaxpr, body.consts, *invals)
        elif name in _REMAT:
            outs = _inline_eval(eqn.params["jaxpr"], (), *invals)
        else:
            outs = _bind(eqn, invals)
        env.update(zip(eqn.outvars, outs, strict=True))
    return [_read(env, v) for v in jaxpr.outvars]


def flat_jaxpr(single: Callable, params: PyTree, example: PyTree):
    """The jaxpr of `single(example, params)` (one datum) with calls inlined.

    Its inputs are the params leaves followed by the input leaves. `params` and
    `example` may be arrays or `jax.ShapeDtypeStruct`s.
    """
    closed = jax.make_jaxpr(single)(example, params)
    num_inputs = len(jtu.tree_leaves(example))
    leaves = [
        jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars
    ]
    # make_jaxpr orders the inputs (example, params); put the params first.
    order = leaves[num_inputs:] + leaves[:num_inputs]

    def inlined(*flat):
        args = flat[len(flat) - num_inputs :] + flat[: len(flat) - num_inputs]
        return _inline_eval(closed.jaxpr, closed.consts, *args)

    return jax.make_jaxpr(inlined)(*order)


# --------------------------------------------------------------------------- #
# Index maps, replayed on integer arrays at discovery and on values at run time.
# --------------------------------------------------------------------------- #

# A chain is a tuple of steps ("reshape", in_shape, out_shape) or
# ("transpose", permutation), applied in order.
Chain = tuple[tuple, ...]


def apply_chain(chain: Chain, x):
    for step in chain:
        if step[0] == "reshape":
            x = x.reshape(step[2])
        else:
            x = x.transpose(step[1])
    return x


def unapply_chain(chain: Chain, x):
    for step in reversed(chain):
        if step[0] == "reshape":
            x = x.reshape(step[1])
        else:
            x = x.transpose(np.argsort(step[1]))
    return x


def _step(eqn) -> tuple | None:
    """The chain step of a structural equation (`None` for a cast or copy)."""
    name = eqn.primitive.name
    in_shape = tuple(eqn.invars[0].aval.shape)
    out_shape = tuple(eqn.outvars[0].aval.shape)
    if name == "transpose":
        return ("transpose", tuple(eqn.params["permutation"]))
    if name in ("reshape", "squeeze"):
        return ("reshape", in_shape, out_shape)
    return None


def _canonical(shape, first: tuple[int, ...], last: tuple[int, ...]) -> Chain:
    """Transpose `shape` to `(first..., last...)` and flatten to a matrix."""
    perm = first + last
    rows = int(np.prod([shape[d] for d in first], dtype=int))
    cols = int(np.prod([shape[d] for d in last], dtype=int))
    permuted = tuple(shape[d] for d in perm)
    return (("transpose", perm), ("reshape", permuted, (rows, cols)))


@dataclasses.dataclass(frozen=True)
class Layer:
    """One Kronecker block: a dense or convolution layer (static description)."""

    eqn: int  # index of the dot_general / conv_general_dilated in the flat jaxpr
    kind: str  # "dense" | "conv"
    weight: int  # params leaf index of the weight
    bias: int | None  # params leaf index of the bias
    weight_chain: Chain  # weight leaf -> W (D_in, D_out)
    bias_index: tuple[int, ...] | None  # W-column o is bias.ravel()[bias_index[o]]
    activation: int  # which operand of the equation is the layer input
    input_chain: Chain  # layer input (or its patches) -> a (R, D_in)
    output_chain: Chain  # layer output -> (R, D_out)
    output_shape: tuple[int, ...]
    d_in: int
    d_out: int
    rows: int
    patches: tuple | None  # conv_general_dilated_patches arguments, for "conv"

    @property
    def size(self) -> int:
        """Rows of the Kronecker input factor `A`: `D_in` plus one for a bias."""
        return self.d_in + (self.bias is not None)

    def weight_matrix(self, leaf):
        return apply_chain(self.weight_chain, leaf)

    def weight_leaf(self, matrix, shape):
        return unapply_chain(self.weight_chain, matrix).reshape(shape)

    def bias_vector(self, leaf):
        return leaf.reshape(-1)[np.asarray(self.bias_index)]

    def bias_leaf(self, vector, shape):
        return vector[np.argsort(self.bias_index)].reshape(shape)

    def inputs(self, operand: Array) -> Array:
        """The layer input on one datum as `a (R, D_in)`."""
        if self.kind == "conv":
            (filter_shape, strides, padding, lhs_dilation, rhs_dilation, numbers) = (
                self.patches
            )
            operand = lax.conv_general_dilated_patches(
                operand,
                filter_shape,
                strides,
                padding,
                lhs_dilation,
                rhs_dilation,
                lax.ConvDimensionNumbers(*numbers),
                precision=lax.Precision.HIGHEST,
            )
        return apply_chain(self.input_chain, operand)


@dataclasses.dataclass(frozen=True)
class Structure:
    """The layers of a model and its params in no layer (static, hashable)."""

    layers: tuple[Layer, ...]
    other: tuple[int, ...]  # params leaf indices in no layer
    num_leaves: int


def _dense_layer(eqn, index, weight_side, leaf, chain) -> Layer | None:
    (contract_l, contract_r), (batch_l, batch_r) = eqn.params["dimension_numbers"]
    if batch_l or batch_r:
        return None
    contract = (contract_l, contract_r)
    act_side = 1 - weight_side
    w_shape = tuple(eqn.invars[weight_side].aval.shape)
    a_shape = tuple(eqn.invars[act_side].aval.shape)
    w_contract, a_contract = tuple(contract[weight_side]), tuple(contract[act_side])
    w_free = tuple(d for d in range(len(w_shape)) if d not in w_contract)
    a_free = tuple(d for d in range(len(a_shape)) if d not in a_contract)
    weight_chain = chain + _canonical(w_shape, w_contract, w_free)
    input_chain = _canonical(a_shape, a_free, a_contract)
    # dot_general's output dims: lhs free, then rhs free.
    n_a, n_w = len(a_free), len(w_free)
    if weight_side == 1:
        a_out, w_out = tuple(range(n_a)), tuple(range(n_a, n_a + n_w))
    else:
        w_out, a_out = tuple(range(n_w)), tuple(range(n_w, n_w + n_a))
    out_shape = tuple(eqn.outvars[0].aval.shape)
    d_in = weight_chain[-1][2][0]
    d_out = weight_chain[-1][2][1]
    rows = input_chain[-1][2][0]
    return Layer(
        eqn=index,
        kind="dense",
        weight=leaf,
        bias=None,
        weight_chain=weight_chain,
        bias_index=None,
        activation=act_side,
        input_chain=input_chain,
        output_chain=_canonical(out_shape, a_out, w_out),
        output_shape=out_shape,
        d_in=d_in,
        d_out=d_out,
        rows=rows,
        patches=None,
    )


def _conv_layer(eqn, index, leaf, chain) -> Layer | None:
    p = eqn.params
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return None
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    w_shape = tuple(eqn.invars[1].aval.shape)
    out_shape = tuple(eqn.outvars[0].aval.shape)
    # Patches are channel-major: (C_in, *filter spatial dims in rhs_spec order).
    weight_chain = chain + _canonical(
        w_shape, (rhs_spec[1], *rhs_spec[2:]), (rhs_spec[0],)
    )
    filter_shape = tuple(w_shape[d] for d in rhs_spec[2:])
    output_chain = _canonical(out_shape, (out_spec[0], *out_spec[2:]), (out_spec[1],))
    d_in, d_out = weight_chain[-1][2]
    patches = (
        filter_shape,
        tuple(p["window_strides"]),
        tuple(tuple(pad) for pad in p["padding"]),
        tuple(p["lhs_dilation"]),
        tuple(p["rhs_dilation"]),
        (tuple(lhs_spec), tuple(rhs_spec), tuple(out_spec)),
    )
    return Layer(
        eqn=index,
        kind="conv",
        weight=leaf,
        bias=None,
        weight_chain=weight_chain,
        bias_index=None,
        activation=0,
        # The patches have the output's layout, with D_in features.
        input_chain=output_chain[:1]
        + (
            (
                "reshape",
                output_chain[1][1][:-1] + (d_in,),
                (output_chain[1][2][0], d_in),
            ),
        ),
        output_chain=output_chain,
        output_shape=out_shape,
        d_in=d_in,
        d_out=d_out,
        rows=output_chain[-1][2][0],
        patches=patches,
    )


def discover(jaxpr, num_leaves: int, leaf_shapes: list[tuple[int, ...]]) -> list[Layer]:
    """Every layer of a flat jaxpr (with its bias when there is one), in order."""
    jaxpr = jaxpr.jaxpr
    invars = jaxpr.invars
    # origin[var] = (leaf, steps, broadcast?) for vars that are a params leaf moved.
    origin: dict = {v: (i, (), False) for i, v in enumerate(invars[:num_leaves])}
    consumers: dict = {}
    for k, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if not isinstance(v, jex_core.Literal):
                consumers.setdefault(v, []).append(k)
        name = eqn.primitive.name
        src = eqn.invars[0] if eqn.invars else None
        if src is None or isinstance(src, jex_core.Literal) or src not in origin:
            continue
        leaf, steps, broadcast = origin[src]
        if name in _STRUCTURAL and len(eqn.invars) == 1:
            if name == "reshape" and eqn.params.get("dimensions") is not None:
                continue
            origin[eqn.outvars[0]] = (leaf, steps + (_step(eqn),), broadcast)
        elif name == "broadcast_in_dim" and len(eqn.invars) == 1:
            origin[eqn.outvars[0]] = (leaf, steps + (("broadcast", eqn),), True)
    outputs = {v for v in jaxpr.outvars if not isinstance(v, jex_core.Literal)}
    # sinks[leaf]: the non-structural equations reading the leaf (or "out").
    sinks: dict = {i: set() for i in range(num_leaves)}
    for v, (leaf, _, _) in origin.items():
        if v in outputs:
            sinks[leaf].add("out")
        for k in consumers.get(v, ()):
            eqn = jaxpr.eqns[k]
            if eqn.outvars and eqn.outvars[0] in origin and len(eqn.invars) == 1:
                continue
            sinks[leaf].add(k)

    layers = []
    for k, eqn in enumerate(jaxpr.eqns):
        name = eqn.primitive.name
        if name not in ("dot_general", "conv_general_dilated"):
            continue
        sides = [
            v in origin if not isinstance(v, jex_core.Literal) else False
            for v in eqn.invars[:2]
        ]
        if sides.count(True) != 1:
            continue
        weight_side = sides.index(True)
        leaf, steps, broadcast = origin[eqn.invars[weight_side]]
        if broadcast or sinks[leaf] != {k}:
            continue
        chain = tuple(s for s in steps if s is not None)
        if name == "dot_general":
            layer = _dense_layer(eqn, k, weight_side, leaf, chain)
        elif weight_side == 1:
            layer = _conv_layer(eqn, k, leaf, chain)
        else:
            layer = None
        if layer is None or not _is_permutation(
            layer.weight_matrix(
                np.arange(np.prod(leaf_shapes[leaf], dtype=int)).reshape(
                    leaf_shapes[leaf]
                )
            ),
            int(np.prod(leaf_shapes[leaf], dtype=int)),
        ):
            continue
        layers.append(
            _with_bias(
                layer, jaxpr, eqn, origin, consumers, outputs, sinks, leaf_shapes
            )
        )
    return layers


def _is_permutation(indices, size: int) -> bool:
    flat = np.asarray(indices).reshape(-1)
    return flat.size == size and np.array_equal(np.sort(flat), np.arange(size))


def _replay_bias(steps, leaf_shape) -> np.ndarray:
    x = np.arange(int(np.prod(leaf_shape, dtype=int))).reshape(leaf_shape)
    for step in steps:
        if step is None:
            continue
        if step[0] == "broadcast":
            eqn = step[1]
            shape = eqn.params["shape"]
            dims = eqn.params["broadcast_dimensions"]
            expanded = np.reshape(
                x,
                [x.shape[dims.index(d)] if d in dims else 1 for d in range(len(shape))],
            )
            x = np.broadcast_to(expanded, shape)
        else:
            x = apply_chain((step,), x)
    return x


def _with_bias(layer, jaxpr, eqn, origin, consumers, outputs, sinks, leaf_shapes):
    """`layer` with the bias added to its output, when there is one."""
    var = eqn.outvars[0]
    steps: list = []
    while True:
        users = consumers.get(var, [])
        if var in outputs or len(users) != 1:
            return layer
        user = jaxpr.eqns[users[0]]
        if user.primitive.name in ("reshape", "squeeze", "transpose"):
            step = _step(user)
            if user.primitive.name == "reshape" and user.params.get("dimensions"):
                return layer
            steps.append(step)
            var = user.outvars[0]
            continue
        break
    if user.primitive.name != "add":
        return layer
    other = [v for v in user.invars if v is not var]
    if len(other) != 1 or isinstance(other[0], jex_core.Literal):
        return layer
    if other[0] not in origin:
        return layer
    bias, bias_steps, _ = origin[other[0]]
    if sinks[bias] != {users[0]} or bias == layer.weight:
        return layer
    added = np.broadcast_to(
        _replay_bias(bias_steps, leaf_shapes[bias]), tuple(var.aval.shape)
    )
    index = apply_chain(layer.output_chain, unapply_chain(tuple(steps), added))
    size = int(np.prod(leaf_shapes[bias], dtype=int))
    if not (np.all(index == index[:1]) and _is_permutation(index[0], size)):
        return layer
    if size != layer.d_out:
        return layer
    return dataclasses.replace(
        layer, bias=bias, bias_index=tuple(int(i) for i in index[0])
    )


def structure(
    single: Callable,
    params: PyTree,
    example: PyTree,
    labels: PyTree[Hashable | None] | None,
    other: str,
) -> Structure:
    """Find the layers of `single(example, params)` and check them against `labels`."""
    leaves_with_paths = jtu.tree_leaves_with_path(params)
    leaf_shapes = [tuple(jnp.shape(leaf)) for _, leaf in leaves_with_paths]
    names = [f"params{jtu.keystr(path)}" for path, _ in leaves_with_paths]
    num_leaves = len(leaf_shapes)
    jaxpr = flat_jaxpr(single, params, example)
    found = discover(jaxpr, num_leaves, leaf_shapes)
    if labels is not None:
        found = _select(found, labels, params, names)
    in_layer = {layer.weight for layer in found} | {
        layer.bias for layer in found if layer.bias is not None
    }
    rest = tuple(i for i in range(num_leaves) if i not in in_layer)
    if rest and other == "error":
        raise ValueError(
            "KFACOperator(other='error'): these params are in no dense or "
            "convolution layer KFAC recognises: "
            + ", ".join(names[i] for i in rest)
            + ". Pass other='diagonal' to give them an exact diagonal block, or "
            "layers= to name the layers yourself."
        )
    return Structure(
        layers=tuple(found),
        other=rest,
        num_leaves=num_leaves,
    )


def _select(found, labels, params, names) -> list[Layer]:
    """The layers named by `labels`, a params-shaped pytree of labels or `None`."""
    try:
        label_leaves = jtu.tree_structure(params).flatten_up_to(labels)
    except (ValueError, TypeError):
        raise ValueError(
            "layers must be a pytree with the structure of params whose leaves are "
            "layer labels (or None for params in no layer); got structure "
            f"{jtu.tree_structure(labels, is_leaf=lambda x: x is None)} for params "
            f"{jtu.tree_structure(params)}."
        ) from None
    groups: dict = {}
    for i, label in enumerate(label_leaves):
        if label is not None:
            groups.setdefault(label, []).append(i)
    by_weight = {layer.weight: layer for layer in found}
    chosen = []
    for label, members in groups.items():
        weights = [i for i in members if i in by_weight]
        listed = ", ".join(names[i] for i in members)
        if len(weights) != 1 or len(members) > 2:
            raise ValueError(
                f"layers: label {label!r} must name one weight of a dense or "
                "convolution layer (a params leaf used only as the weight of one "
                "dot_general or conv_general_dilated) and optionally its bias; got "
                f"{listed}."
            )
        layer = by_weight[weights[0]]
        rest = [i for i in members if i != weights[0]]
        if rest and layer.bias != rest[0]:
            raise ValueError(
                f"layers: label {label!r} pairs {names[rest[0]]} with the weight "
                f"{names[weights[0]]}, but it is not the bias added to that layer's "
                "output."
            )
        if not rest:
            layer = dataclasses.replace(layer, bias=None, bias_index=None)
        chosen.append(layer)
    return sorted(chosen, key=lambda layer: layer.eqn)


def labels(params: PyTree, structure: Structure) -> PyTree[int | None]:
    """The params-shaped pytree of layer labels (`None` for params in no layer)."""
    leaves: list = [None] * structure.num_leaves
    for label, layer in enumerate(structure.layers):
        leaves[layer.weight] = label
        if layer.bias is not None:
            leaves[layer.bias] = label
    return jtu.tree_unflatten(jtu.tree_structure(params), leaves)


def run_tapped(
    jaxpr,
    structure: Structure,
    params_leaves: list,
    input_leaves: list,
    taps: tuple,
) -> tuple[Array, tuple]:
    """Evaluate the flat jaxpr on one datum, `taps[i]` added to layer `i`'s output.

    Returns the model output and each layer's input operand (for a convolution,
    the image before patch extraction).
    """
    closed = jaxpr
    jaxpr = closed.jaxpr
    at = {layer.eqn: (index, layer) for index, layer in enumerate(structure.layers)}
    env: dict = {}
    env.update(zip(jaxpr.constvars, closed.consts, strict=True))
    env.update(zip(jaxpr.invars, list(params_leaves) + list(input_leaves), strict=True))
    recorded: list = [None] * len(structure.layers)
    for k, eqn in enumerate(jaxpr.eqns):
        invals = [_read(env, v) for v in eqn.invars]
        outs = _bind(eqn, invals)
        if k in at:
            index, layer = at[k]
            if eqn.primitive.name not in ("dot_general", "conv_general_dilated"):
                raise RuntimeError(
                    "model_fn traced to a different jaxpr than when its layers were "
                    "found; KFAC needs a model_fn that traces the same way each time."
                )
            recorded[index] = invals[layer.activation]
            outs = [outs[0] + taps[index].astype(outs[0].dtype)]
        env.update(zip(eqn.outvars, outs, strict=True))
    (output,) = [_read(env, v) for v in jaxpr.outvars]
    return output, tuple(recorded)
