"""A tiny causal transformer language model (plain JAX, float64 params).

Embedding (a gather), learned positions, one pre-LayerNorm block (causal
single-head attention with q/k/v/o projections, a tanh MLP), a final LayerNorm
and an unembedding: `tokens (T,) -> logits (T, V)` on one datum.
"""

import jax
import jax.numpy as jnp
import numpy as np

VOCAB, LENGTH, WIDTH, HIDDEN = 5, 4, 4, 6


def _dense(rng, d_in, d_out, bias=True):
    layer = {"w": jnp.asarray(rng.normal(size=(d_in, d_out)) / np.sqrt(d_in))}
    if bias:
        layer["b"] = jnp.asarray(0.1 * rng.normal(size=d_out))
    return layer


def _norm(rng):
    return {
        "scale": jnp.asarray(1 + 0.1 * rng.normal(size=WIDTH)),
        "shift": jnp.asarray(0.1 * rng.normal(size=WIDTH)),
    }


def init_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "embed": jnp.asarray(rng.normal(size=(VOCAB, WIDTH))),
        "position": jnp.asarray(0.1 * rng.normal(size=(LENGTH, WIDTH))),
        "norm1": _norm(rng),
        "q": _dense(rng, WIDTH, WIDTH),
        "k": _dense(rng, WIDTH, WIDTH, bias=False),
        "v": _dense(rng, WIDTH, WIDTH),
        "o": _dense(rng, WIDTH, WIDTH),
        "norm2": _norm(rng),
        "up": _dense(rng, WIDTH, HIDDEN),
        "down": _dense(rng, HIDDEN, WIDTH),
        "norm3": _norm(rng),
        "unembed": _dense(rng, WIDTH, VOCAB),
    }


def layer_norm(x, p):
    mean = jnp.mean(x, -1, keepdims=True)
    variance = jnp.mean((x - mean) ** 2, -1, keepdims=True)
    return (x - mean) / jnp.sqrt(variance + 1e-5) * p["scale"] + p["shift"]


def dense(x, p):
    y = x @ p["w"]
    return y + p["b"] if "b" in p else y


def transformer(tokens, p):
    """`tokens (T,)` integers -> next-token logits `(T, V)`."""
    h = p["embed"][tokens] + p["position"]
    x = layer_norm(h, p["norm1"])
    q, k, v = dense(x, p["q"]), dense(x, p["k"]), dense(x, p["v"])
    scores = q @ k.T / np.sqrt(WIDTH)
    causal = jnp.tril(jnp.ones((LENGTH, LENGTH), bool))
    attention = jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1)
    h = h + dense(attention @ v, p["o"])
    h = h + dense(jnp.tanh(dense(layer_norm(h, p["norm2"]), p["up"])), p["down"])
    return dense(layer_norm(h, p["norm3"]), p["unembed"])


def make_data(n, seed=1):
    """Token sequences `(n, T)` and their next tokens `(n, T)`."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, size=(n, LENGTH + 1))
    return jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
