"""Every model in one line: NNX and Equinox models in the style of their published examples.

Written here (not copied): an NNX decoder with an ``nnx.Embed`` subclass (Gemma's
``ScaledEmbed`` pattern, through ``super()``), grouped-query attention from ``nnx.Einsum`` s
(``...`` subscripts included), LoRA (``LoRALinear`` and ``LoRA`` around a base layer) and
``nnx.scan`` over stacked layers; NNX's RNN cells under ``nnx.RNN``; an Equinox GRU/LSTM
sequence model under ``lax.scan``. For each, in both bindings: values, gradients and one
jitted optax step equal the original's (float64); with ``binding="dual"`` the forward
program binds one jaxlinear primitive per weight contraction (counted) and ``jax.jvp``
equals the original's; the report lists every module. Also the shared subclass rule and
``from_torch``'s handling of whole-model state dicts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlinear
from jaxlinear._src import adapt
from tests.adapter_checks import draw, jaxlinear_primitives
from tests.helpers import assert_trees_close

nnx = pytest.importorskip("flax.nnx")
eqx = pytest.importorskip("equinox")
optax = pytest.importorskip("optax")
jlnnx = pytest.importorskip("jaxlinear.nnx")
jleqx = pytest.importorskip("jaxlinear.equinox")

BINDINGS = ("custom_vjp", "dual")
F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
INIT = dict(kernel_init=draw, bias_init=draw, **F64)
_TX = optax.sgd(0.1, momentum=0.9)


# --------------------------------------------------------------------------------------
# An NNX decoder: scaled tied embedding, GQA einsums, LoRA, scan over stacked layers.


class ScaledEmbed(nnx.Embed):
    """Gemma's pattern: the parent's lookup times √features; ``attend`` is inherited."""

    def __call__(self, ids):
        return super().__call__(ids) * jnp.sqrt(self.features).astype(self.param_dtype)


class Layer(nnx.Module):
    """Pre-RMSNorm grouped-query attention (4 query heads, 2 kv heads) and a LoRA MLP."""

    def __init__(self, rngs):
        einsum = dict(rngs=rngs, **INIT)
        self.norm = nnx.RMSNorm(4, rngs=rngs, scale_init=draw, **F64)
        self.q = nnx.Einsum("btd,dnh->btnh", (4, 4, 2), **einsum)
        self.k = nnx.Einsum("...d,dkh->...kh", (4, 2, 2), **einsum)  # '...' subscripts
        self.v = nnx.Einsum("...d,dkh->...kh", (4, 2, 2), **einsum)
        self.o = nnx.Einsum("btnh,nhd->btd", (4, 2, 4), (4,), **einsum)
        lora = dict(a_initializer=draw, b_initializer=draw, lora_param_dtype=jnp.float64)
        self.up = nnx.LoRALinear(4, 6, lora_rank=2, rngs=rngs, **lora, **INIT)
        base = nnx.Linear(6, 4, rngs=rngs, **INIT)
        self.down = nnx.LoRA(6, 2, 4, base_module=base, a_initializer=draw, b_initializer=draw,
                             rngs=rngs, **F64)  # fmt: skip

    def __call__(self, h):  # (B, T, 4) -> (B, T, 4)
        B, T, _ = h.shape
        y = self.norm(h)
        q = self.q(y).reshape(B, T, 2, 2, 2)  # (B, T, kv heads, group, head dim)
        k, v = self.k(y), self.v(y)  # (B, T, kv heads, head dim)
        logits = jnp.einsum("btkgh,bskh->bkgts", q, k) / np.sqrt(2)
        causal = jnp.tril(jnp.ones((T, T), bool))
        p = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
        h = h + self.o(jnp.einsum("bkgts,bskh->btkgh", p, v).reshape(B, T, 4, 2))
        return h + self.down(jax.nn.gelu(self.up(self.norm(h))))


class Decoder(nnx.Module):
    """ids ``(B, T)`` -> logits ``(B, T, 7)``: two layers stacked and scanned, tied logits."""

    def __init__(self, rngs):
        self.embed = ScaledEmbed(7, 4, embedding_init=draw, rngs=rngs, **F64)

        @nnx.split_rngs(splits=2)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stack(rngs):
            return Layer(rngs)

        self.layers = stack(rngs)

    def __call__(self, ids):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(h, layer):
            return layer(h)

        return self.embed.attend(body(self.embed(ids), self.layers))


class Recurrent(nnx.Module):
    """``(B, T, 2) -> (B, T, 3)``: NNX's LSTM, GRU and optimized LSTM cells under ``nnx.RNN``."""

    def __init__(self, rngs):
        cell = dict(kernel_init=draw, recurrent_kernel_init=draw, bias_init=draw, rngs=rngs, **F64)
        self.lstm = nnx.RNN(nnx.LSTMCell(2, 3, **cell))
        self.gru = nnx.RNN(nnx.GRUCell(3, 3, **cell))
        self.opt = nnx.RNN(nnx.OptimizedLSTMCell(3, 3, **cell))

    def __call__(self, x):
        return self.opt(self.gru(self.lstm(x)))


def _ids():
    return jnp.asarray(np.random.default_rng(0).integers(0, 7, (2, 4)))


def _seq():
    return jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 2)))


NNX_MODELS = {"decoder": (Decoder, _ids), "rnn": (Recurrent, _seq)}

NNX_JVP = {"decoder"}  # checked in forward mode (dual binding)

NNX_CONTRACTIONS = {  # per forward program; a scanned body counts once
    # lookup; q, k, v, o; LoRALinear: base + 2 factors; LoRA: 2 factors + base; attend
    "decoder": {"embed": 1, "einsum": 4, "dot_general": 3 + 3 + 1},
    "rnn": {"dot_general": 8 + 2 + 2},  # LSTM: 4 gates × (x, h); GRU: x, h (3 gates each); opt.: 2
}

NNX_REPORTED = {
    "decoder": {
        "embed": ("ScaledEmbed", "explicit"),
        "layers.down": ("LoRA", "explicit"),
        "layers.down.base_module": ("Linear", "explicit"),
        "layers.k": ("Einsum", "explicit"),
        "layers.norm": ("RMSNorm", "untouched"),
        "layers.o": ("Einsum", "explicit"),
        "layers.q": ("Einsum", "explicit"),
        "layers.up": ("LoRALinear", "explicit"),
        "layers.up.lora": ("LoRA", "explicit"),
        "layers.v": ("Einsum", "explicit"),
    },
}


def _nnx_loss(model, x):
    return jnp.sum(jnp.sin(model(x)))


def _nnx_primitives(model, x):
    """The jaxlinear primitives of ``model``'s forward program (traced from its state)."""
    graphdef, state = nnx.split(model)
    return jaxlinear_primitives(lambda s: nnx.merge(graphdef, s)(x), state)


def _tangent(params):
    return jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape),
                        params)  # fmt: skip


def _nnx_trained(model, x, *, jvp=True):
    """Loss, gradients, new parameters and optimizer state of one jitted optax step, and
    (``jvp``) the loss's ``jax.jvp`` in the parameters, in the same program."""
    optimizer = nnx.Optimizer(model, _TX, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x):
        extra = ()
        if jvp:
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            f = lambda p: _nnx_loss(nnx.merge(graphdef, p, rest), x)  # noqa: E731
            extra = (jax.jvp(f, (params,), (_tangent(params),)),)
        loss, grads = nnx.value_and_grad(_nnx_loss)(model, x)
        optimizer.update(model, grads)
        return loss, grads, *extra

    loss, grads, *extra = step(model, optimizer, x)
    return loss, grads, nnx.state(model, nnx.Param), nnx.state(optimizer), *extra


_NNX_ORIGINAL = {}


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize("name", NNX_MODELS)
def test_nnx_model_trains_like_the_original(name, binding):
    cls, data = NNX_MODELS[name]
    x = data()
    if name not in _NNX_ORIGINAL:
        original = cls(nnx.Rngs(0))
        assert not _nnx_primitives(original, x)
        _NNX_ORIGINAL[name] = _nnx_trained(original, x, jvp=name in NNX_JVP)
    model = jlnnx.explicit(cls(nnx.Rngs(0)), binding=binding)
    report = jlnnx.report(model)
    assert not report.paths("jax-ad")
    if name in NNX_REPORTED:
        assert {r.path: (r.module, r.status) for r in report} == NNX_REPORTED[name]
    else:
        assert not report.untouched
    if binding == "dual":
        assert _nnx_primitives(model, x) == NNX_CONTRACTIONS[name]
    # forward mode too: jax.jvp equals the original's (not through nnx.RNN's Rngs state)
    dual = binding == "dual" and name in NNX_JVP
    expected = _NNX_ORIGINAL[name]
    if name in NNX_JVP and not dual:
        expected = expected[:-1]
    assert_trees_close(_nnx_trained(model, x, jvp=dual), expected)


def test_lora_per_example_norms_take_the_rank_one_route():
    """DP fine-tuning: the base kernel and both LoRA factors each get the op's own rule."""
    lora = dict(a_initializer=draw, b_initializer=draw, lora_param_dtype=jnp.float64)
    make = lambda: nnx.LoRALinear(3, 2, lora_rank=2, rngs=nnx.Rngs(0), **lora, **INIT)  # noqa: E731
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)))
    loss = lambda y: jnp.sum(jnp.sin(y), 1)  # noqa: E731
    loss_fn, params = jlnnx.per_example_loss(jlnnx.explicit(make()), loss)
    routes = {r.leaf: r.route for r in jaxlinear.per_example_routes(loss_fn, params, x)}
    assert sorted(routes.values()) == ["bias", "rank_one", "rank_one", "rank_one"], routes
    norms = jax.jit(lambda p, x: jaxlinear.per_example_grad_norms(loss_fn, p, x))(params, x)

    graphdef, state, rest = nnx.split(make(), nnx.Param, ...)
    one = lambda p, xi: loss(nnx.merge(graphdef, p, rest)(xi[None]))[0]  # noqa: E731
    grads = jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0)))(state, x)
    expected = jnp.sqrt(sum(jnp.sum(g.reshape(4, -1) ** 2, 1) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(norms, expected, rtol=1e-12)


# --------------------------------------------------------------------------------------
# An Equinox GRU/LSTM sequence model.


class Sequence(eqx.Module):
    """``(T, 2) -> (T, 2)`` per example: a GRU, an LSTM on its states, a Linear head."""

    gru: eqx.nn.GRUCell
    lstm: eqx.nn.LSTMCell
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.gru = eqx.nn.GRUCell(2, 3, key=k1, dtype=jnp.float64)
        self.lstm = eqx.nn.LSTMCell(3, 3, key=k2, dtype=jnp.float64)
        self.head = eqx.nn.Linear(3, 2, key=k3, dtype=jnp.float64)

    def __call__(self, xs):
        def step(carry, x):
            h, lstm_state = carry
            h = self.gru(x, h)
            lstm_state = self.lstm(h, lstm_state)
            return (h, lstm_state), self.head(lstm_state[0])

        zeros = jnp.zeros(3, jnp.float64)
        return jax.lax.scan(step, (zeros, (zeros, zeros)), xs)[1]


def _eqx_loss(model, xs):
    return jnp.sum(jnp.sin(jax.vmap(model)(xs)))


def _eqx_trained(model, xs):
    state = _TX.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, state, xs):
        loss, grads = eqx.filter_value_and_grad(_eqx_loss)(model, xs)
        updates, state = _TX.update(grads, state, eqx.filter(model, eqx.is_array))
        return loss, grads, eqx.apply_updates(model, updates), state

    out = step(model, state, xs)
    return jax.tree.leaves(eqx.filter(out, eqx.is_array))


_EQX_ORIGINAL = {}


@pytest.mark.parametrize("binding", BINDINGS)
def test_equinox_rnn_trains_like_the_original(binding):
    xs = _seq()
    original = Sequence(jax.random.key(0))
    if "seq" not in _EQX_ORIGINAL:
        _EQX_ORIGINAL["seq"] = _eqx_trained(original, xs)
    model = jleqx.explicit(original, binding=binding)
    report = jleqx.report(model)
    assert [r.path for r in report.rows] == [".gru", ".lstm", ".head"]
    assert not report.untouched
    assert_trees_close(_eqx_trained(model, xs), _EQX_ORIGINAL["seq"])
    if binding == "dual":
        # GRU: W_ih, W_hh; LSTM: W_ih, W_hh; head: one each, in the scanned body
        assert jaxlinear_primitives(jax.vmap(model), xs) == {"affine": 5}
        tangent = jnp.cos(xs)
        assert_trees_close(
            jax.jvp(lambda x: _eqx_loss(model, x), (xs,), (tangent,)),
            jax.jvp(lambda x: _eqx_loss(original, x), (xs,), (tangent,)),
        )


# --------------------------------------------------------------------------------------
# The shared subclass rule, and from_torch on a whole model's state dict.


def test_subclass_rule():
    class Base:
        def __call__(self, x):
            return x

        def attend(self, q):
            return q

    class Reaches(Base):
        def __call__(self, x):
            return super().__call__(x) * 2

    class Named(Base):
        def __call__(self, x):
            return Base.__call__(self, x) + 1

    class Inherits(Reaches):
        pass

    class Replaces(Reaches):
        def attend(self, q):
            return -q

    for cls in (Base, Reaches, Named, Inherits):
        assert adapt.replaced_by(cls, Base, ("__call__", "attend")) is None, cls
    assert adapt.replaced_by(Replaces, Base, ("__call__", "attend")) == (
        "Replaces.attend replaces Base.attend (never calls it)"
    )
    assert adapt.replaced_by(Replaces, Base, ("__call__",)) is None

    class InheritsReplaces(Replaces):  # the replacing override is a parent's
        pass

    class CallsAnother(Base):  # reaches the parent, but not its own method
        def attend(self, q):
            return super().__call__(q)

    assert adapt.replaced_by(InheritsReplaces, Base, ("__call__", "attend")) == (
        "Replaces.attend replaces Base.attend (never calls it)"
    )
    assert adapt.replaced_by(CallsAnother, Base, ("attend",)) == (
        "CallsAnother.attend replaces Base.attend (never calls it)"
    )


def test_from_torch_names_prefix_and_lists_the_prefixes():
    W1, W2 = np.ones((3, 2)), np.arange(12.0).reshape(4, 3)
    sd = {"fc1.weight": W1, "fc1.bias": np.zeros(3), "fc2.weight": W2, "act.scale": np.ones(1)}
    with pytest.raises(KeyError, match=r"has no 'weight'; pass `prefix=`, one of \['fc1', 'fc2'\]"):
        jaxlinear.from_torch(sd)
    for prefix in ("fc2", "fc2."):
        p = jaxlinear.from_torch(sd, prefix=prefix)
        np.testing.assert_array_equal(p.W, W2.T)
        assert p.b is None
