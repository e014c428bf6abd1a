"""The models of the per-example benchmark (``bench_per_example``): a CNN and a small LM.

Each ``build_*`` returns ``(params, args, loss, layers)``:

- ``params``: a pytree of float32 arrays; ``args``: the batch, examples on axis 0;
- ``loss(params, *args) -> (n,)``: per-example losses (what ``jaxlinear.clipped_grad``
  takes);
- ``layers``: one ``Layer`` per jaxlinear op call, in call order, with the input that op
  sees on this batch, so that each layer's per-example rule can be timed alone.

Every weight and bias enters through a jaxlinear op (``conv``, ``linear``, ``einsum``,
``embed``), except the LayerNorm scales and biases of the LM, which plain ``jnp`` uses
(they take ``clipped_grad``'s per-leaf fallback; the route report says so).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jaxlinear


@dataclasses.dataclass
class Layer:
    """One jaxlinear op call of a model: ``y = op(w, x)``, ``w`` the params subtree at ``path``."""

    name: str
    path: tuple  # keys into params
    op: Callable  # op(w, x) -> y
    w: object
    x: jax.Array


class _Tape:
    """Records each layer call (name, params path, op, input) while the model is traced."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, name, path, op, w, x):
        self.calls.append((name, path, op, x))
        return op(w, x)


def _record(forward, params, *args) -> list[Layer]:
    """The model's layers with their inputs on this batch (one jitted forward pass)."""
    tapes = []

    def inputs(params, *args):
        tapes.append(_Tape())
        forward(params, *args, layer=tapes[-1])
        return [x for *_, x in tapes[-1].calls]

    xs = jax.jit(inputs)(params, *args)
    return [
        Layer(name, path, op, _get(params, path), x)
        for (name, path, op, _), x in zip(tapes[-1].calls, xs, strict=True)
    ]


def _direct(name, path, op, w, x):
    return op(w, x)


def _get(params, path):
    for k in path:
        params = params[k]
    return params


def _cross_entropy(logits, labels):
    """``-log softmax(logits)[label]``, elementwise over the leading axes."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


# -- CNN ---------------------------------------------------------------------------------

# (C_out, stride) per 3×3 "SAME" conv, ReLU after each.
CNN_CONVS = ((32, 1), (64, 2), (64, 1), (128, 2))


def build_cnn(n=128, hw=32, channels=3, convs=CNN_CONVS, classes=10, seed=0):
    """CIFAR-shaped CNN: 3×3 convs (ReLU), global average pool, a dense head to ``classes``.

    ``x: (n, hw, hw, channels)``; loss: softmax cross-entropy per example.
    """
    keys = iter(jax.random.split(jax.random.key(seed), len(convs) + 2))
    params, c_in = {}, channels
    for i, (c_out, _) in enumerate(convs):
        p = jaxlinear.init_conv(next(keys), (3, 3), c_in, c_out, scheme="he_normal")
        params[f"conv{i + 1}"] = jaxlinear.Params(p.W, 0.01 * jnp.ones_like(p.b))
        c_in = c_out
    params["head"] = jaxlinear.init(next(keys), c_in, classes)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, hw, hw, channels)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, classes, size=n), jnp.int32)

    def forward(params, x, layer=_direct):
        h = x
        for i, (_, stride) in enumerate(convs):
            name = f"conv{i + 1}"
            conv = lambda p, h, s=stride: jaxlinear.conv(p, h, strides=s)  # noqa: E731
            h = jax.nn.relu(layer(name, (name,), conv, params[name], h))
        h = jnp.mean(h, axis=(1, 2))  # (n, C)
        return layer("head", ("head",), jaxlinear.linear, params["head"], h)

    def loss(params, x, labels):
        return _cross_entropy(forward(params, x), labels)

    return params, (x, labels), loss, _record(forward, params, x)


# -- Transformer LM ----------------------------------------------------------------------


def _standardize(h, eps=1e-5):
    """``(h − mean) / sqrt(var + eps)`` over the last axis."""
    mu = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h - mu), axis=-1, keepdims=True)
    return (h - mu) * jax.lax.rsqrt(var + eps)


def _layer_norm(h, scale, bias):
    """LayerNorm over the last axis, in plain jnp: ``scale``, ``bias`` of shape ``(d,)``."""
    lead = (1,) * (h.ndim - 1)
    return _standardize(h) * scale.reshape(*lead, -1) + bias.reshape(*lead, -1)


def _ln_scale(w, h):
    """LayerNorm's scale as a jaxlinear op (per-example rule included): ``h ⊙ w``."""
    return jaxlinear.einsum("btd,d->btd", h, w)


def build_transformer(n=32, T=64, vocab=512, d=128, heads=4, blocks=2, ln="jnp", seed=0):
    """A pre-LayerNorm character LM: ``blocks`` × (causal attention, MLP d → 4d → d).

    Token and learned position embeddings by ``jaxlinear.embed`` (the positions are ids
    ``(n, T)``, so the position table is an embed weight too), attention projections by
    ``jaxlinear.einsum`` (``"btd,dhk->bthk"``, ``"bthk,hkd->btd"``, no biases), MLP and
    the untied head by ``jaxlinear.linear``, LayerNorm in plain jnp. Loss: next-token
    cross-entropy, mean over the ``T`` positions of each example.

    ``ln="einsum"``: LayerNorm's scale by ``jaxlinear.einsum("btd,d->btd", ...)`` and its
    bias added right after it, so that they too have a structural route (no fallback).
    """
    k = d // heads
    keys = iter(jax.random.split(jax.random.key(seed), 6 * blocks + 4))
    normal = lambda shape, std: std * jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
    ln_params = lambda: {"scale": jnp.ones((d,), jnp.float32), "bias": jnp.zeros((d,), jnp.float32)}  # noqa: E731
    params = {"tok": normal((vocab, d), 0.02), "pos": normal((T, d), 0.02)}
    for i in range(blocks):
        params[f"block{i}"] = {
            "ln1": ln_params(),
            "q": normal((d, heads, k), d**-0.5),
            "k": normal((d, heads, k), d**-0.5),
            "v": normal((d, heads, k), d**-0.5),
            "o": normal((heads, k, d), d**-0.5),
            "ln2": ln_params(),
            "up": jaxlinear.init(next(keys), d, 4 * d),
            "down": jaxlinear.init(next(keys), 4 * d, d),
        }
    params["ln_f"] = ln_params()
    params["head"] = jaxlinear.init(next(keys), d, vocab)
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, vocab, size=(n, T + 1)), jnp.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    causal = jnp.tril(jnp.ones((T, T), bool))[None, None]  # (1, 1, T, T)

    def proj_in(w, h):
        return jaxlinear.einsum("btd,dhk->bthk", h, w)

    def proj_out(w, h):
        return jaxlinear.einsum("bthk,hkd->btd", h, w)

    def norm(h, p, name, layer):
        if ln == "jnp":
            return _layer_norm(h, p["scale"], p["bias"])
        h = layer(name, (*name.split("."), "scale"), _ln_scale, p["scale"], _standardize(h))
        return h + p["bias"].reshape(1, 1, -1)

    def forward(params, ids, layer=_direct):
        positions = jnp.broadcast_to(jnp.arange(T, dtype=ids.dtype), ids.shape)
        h = layer("tok", ("tok",), jaxlinear.embed, params["tok"], ids)
        h = h + layer("pos", ("pos",), jaxlinear.embed, params["pos"], positions)
        for i in range(blocks):
            b, name = params[f"block{i}"], f"block{i}"
            a = norm(h, b["ln1"], f"{name}.ln1", layer)
            q, kk, v = (layer(f"{name}.{w}", (name, w), proj_in, b[w], a) for w in "qkv")
            s = jnp.einsum("bthk,bshk->bhts", q, kk) * k**-0.5
            s = jnp.where(causal, s, -1e9)
            att = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(s, axis=-1), v)
            h = h + layer(f"{name}.o", (name, "o"), proj_out, b["o"], att)
            a = norm(h, b["ln2"], f"{name}.ln2", layer)
            u = jax.nn.gelu(layer(f"{name}.up", (name, "up"), jaxlinear.linear, b["up"], a))
            h = h + layer(f"{name}.down", (name, "down"), jaxlinear.linear, b["down"], u)
        h = norm(h, params["ln_f"], "ln_f", layer)
        return layer("head", ("head",), jaxlinear.linear, params["head"], h)  # (n, T, V)

    def loss(params, ids, targets):
        return jnp.mean(_cross_entropy(forward(params, ids), targets), axis=1)

    return params, (inputs, targets), loss, _record(forward, params, inputs)
