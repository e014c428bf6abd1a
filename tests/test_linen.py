"""``jaxlinear.linen``: whole Flax linen models on explicit rules.

Four small models written here in the style of Flax's linen examples (not copied): a
decoder-only LM (pre-LayerNorm, causal self-attention, a positional table, an
``nn.Embed`` subclass scaling its lookup, logits through ``Embed.attend``), a ResNet block
with BatchNorm, a stack of layers under ``nn.scan(nn.remat(...))`` with an ``nn.vmap``
ensemble head, and the RNN cells (``LSTMCell``, ``GRUCell``, ``OptimizedLSTMCell``,
``ConvLSTMCell``) stacked in one step scanned over time (``nn.scan``). For each, in both
bindings: ``init`` gives exactly the original's variables; loss, gradients and one jitted
optax step equal the original's (float64, Flax's own ops under JAX's AD are the
reference); the forward program with ``binding="dual"`` binds one jaxlinear primitive per
weight contraction; ``dual`` conversions pass ``jax.jvp`` against the original (in the
same jitted program as the step: compiling is what costs here); the report lists every
module.
"""

from __future__ import annotations

import functools
import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.adapter_checks import draw, jaxlinear_primitives
from tests.helpers import assert_trees_close

nn = pytest.importorskip("flax.linen")
optax = pytest.importorskip("optax")
jllinen = pytest.importorskip("jaxlinear.linen")

BINDINGS = ("custom_vjp", "dual")
F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
INIT = dict(kernel_init=draw, bias_init=draw, **F64)


# --------------------------------------------------------------------------------------
# Models.


class ScaledEmbed(nn.Embed):
    """Gemma-style: the parent's lookup, scaled by √features (reaches ``Embed.__call__``)."""

    def __call__(self, ids):
        return super().__call__(ids) * jnp.sqrt(self.features).astype(self.param_dtype)


class DecoderBlock(nn.Module):
    @nn.compact
    def __call__(self, h):  # (B, T, 4) -> (B, T, 4)
        mask = nn.make_causal_mask(jnp.ones(h.shape[:2]))
        y = nn.LayerNorm(**F64)(h)
        h = h + nn.MultiHeadDotProductAttention(num_heads=2, **INIT)(y, mask=mask)
        y = nn.LayerNorm(**F64)(h)
        return h + nn.Dense(4, **INIT)(nn.gelu(nn.Dense(8, **INIT)(y)))


class DecoderLM(nn.Module):
    """ids ``(B, T)`` -> logits ``(B, T, 7)``; the logits share the token table."""

    @nn.compact
    def __call__(self, ids):
        tok = ScaledEmbed(7, 4, embedding_init=draw, **F64)
        pos = self.param("pos_table", draw, (6, 4), jnp.float64)  # (max_len, d)
        h = tok(ids) + pos[None, : ids.shape[1]]
        h = DecoderBlock()(h)
        return tok.attend(nn.LayerNorm(**F64)(h))


class ResBlock(nn.Module):
    """``(B, 4, 4, 2) -> (B, 3)``: conv-BN-relu-conv-BN + projected shortcut, a Dense head."""

    train: bool = True

    @nn.compact
    def __call__(self, x):
        norm = functools.partial(nn.BatchNorm, use_running_average=not self.train, **F64)
        conv = functools.partial(nn.Conv, use_bias=False, kernel_init=draw, **F64)
        y = nn.relu(norm()(conv(4, (3, 3))(x)))
        y = norm()(conv(4, (3, 3), strides=2)(y))
        shortcut = conv(4, (1, 1), strides=2, name="proj")(x)
        h = nn.relu(shortcut + y)
        return nn.Dense(3, **INIT)(h.mean(axis=(1, 2)))


class Layer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + nn.Dense(4, **INIT)(jnp.tanh(nn.LayerNorm(**F64)(h))), None


class Stack(nn.Module):
    """``(B, 3) -> (2, B, 2)``: a Dense, 3 scanned rematerialized layers, 2 vmapped heads."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4, **INIT)(x)
        layers = nn.scan(
            nn.remat(Layer),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=3,
        )
        h, _ = layers(name="layers")(h, None)
        heads = nn.vmap(
            nn.Dense,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=None,
            axis_size=2,
        )
        return heads(2, **INIT, name="heads")(h)


class Cells(nn.Module):
    """One time step of four stacked cells: LSTM, GRU, optimized LSTM, ConvLSTM."""

    @nn.compact
    def __call__(self, carry, x):  # x: (B, 2)
        cell = dict(kernel_init=draw, recurrent_kernel_init=draw, bias_init=draw, **F64)
        lstm, gru, opt, conv = carry
        lstm, h = nn.LSTMCell(3, **cell, name="lstm")(lstm, x)
        gru, h = nn.GRUCell(3, **cell, name="gru")(gru, h)
        opt, h = nn.OptimizedLSTMCell(4, **cell, name="opt")(opt, h)
        grid = h.reshape((h.shape[0], 2, 2, 1))
        conv, g = nn.ConvLSTMCell(1, (2, 2), **F64, name="conv")(conv, grid)
        return (lstm, gru, opt, conv), h + g.reshape(h.shape)


class Recurrent(nn.Module):
    """``(B, T, 2) -> (B, T, 4)``: the cells scanned over time (one ``nn.scan``)."""

    @nn.compact
    def __call__(self, x):
        B = x.shape[0]
        zeros = lambda *shape: jnp.zeros((B, *shape), jnp.float64)  # noqa: E731
        carry = ((zeros(3), zeros(3)), zeros(3), (zeros(4), zeros(4)), (zeros(2, 2, 1),) * 2)
        scan = nn.scan(Cells, variable_broadcast="params", split_rngs={"params": False},
                       in_axes=1, out_axes=1)  # fmt: skip
        return scan(name="cells")(carry, x)[1]


def _ids():
    return jnp.asarray(np.random.default_rng(0).integers(0, 7, (2, 5)))


def _x(shape):
    return jnp.asarray(np.random.default_rng(1).standard_normal(shape))


MODELS = {
    "lm": (DecoderLM, _ids),
    "resnet": (ResBlock, lambda: _x((2, 4, 4, 2))),
    "scan": (Stack, lambda: _x((2, 3))),
    "rnn": (Recurrent, lambda: _x((2, 3, 2))),
}

# Weight contractions in each model's forward program (a scanned body counts once).
CONTRACTIONS = {
    "lm": {"embed": 1, "dot_general": 7},  # lookup; q, k, v, out, 2 Dense, attend
    "resnet": {"conv": 3, "dot_general": 1},
    "scan": {"dot_general": 3},  # in, the scanned layer, the vmapped head
    "rnn": {"dot_general": 8 + 6 + 2, "conv": 2},
}

# Every module with parameters, and what the report must say of it.
REPORTED = {
    "lm": {
        "": "untouched",  # the positional table: a param used directly
        "ScaledEmbed_0": "explicit",
        "DecoderBlock_0.LayerNorm_0": "untouched",
        "DecoderBlock_0.MultiHeadDotProductAttention_0": "note",
        "DecoderBlock_0.MultiHeadDotProductAttention_0.query": "explicit",
        "DecoderBlock_0.MultiHeadDotProductAttention_0.key": "explicit",
        "DecoderBlock_0.MultiHeadDotProductAttention_0.value": "explicit",
        "DecoderBlock_0.MultiHeadDotProductAttention_0.out": "explicit",
        "DecoderBlock_0.LayerNorm_1": "untouched",
        "DecoderBlock_0.Dense_0": "explicit",
        "DecoderBlock_0.Dense_1": "explicit",
        "LayerNorm_0": "untouched",
    },
    "resnet": {
        "Conv_0": "explicit",
        "BatchNorm_0": "untouched",
        "Conv_1": "explicit",
        "BatchNorm_1": "untouched",
        "proj": "explicit",
        "Dense_0": "explicit",
    },
    "scan": {
        "Dense_0": "explicit",
        "layers.Dense_0": "explicit",
        "layers.LayerNorm_0": "untouched",
        "heads": "explicit",
    },
    "rnn": {
        **{f"cells.lstm.{g}": "explicit" for g in ("ii", "if", "ig", "io", "hi", "hf", "hg", "ho")},
        **{f"cells.gru.{g}": "explicit" for g in ("ir", "iz", "in", "hr", "hz", "hn")},
        "cells.opt": "explicit",  # its DenseParams hold the kernels it contracts
        **{f"cells.opt.{g}": "explicit" for g in ("ii", "if", "ig", "io")},
        **{f"cells.opt.{g}": "explicit" for g in ("hi", "hf", "hg", "ho")},
        "cells.conv.ih": "explicit",
        "cells.conv.hh": "explicit",
    },
}


def _init(module, x):
    return jax.jit(module.init)(jax.random.key(0), x)  # one program, not op by op


def _loss(module, params, rest, x):
    """``(Σ sin(model(x)), updated non-parameter collections)``."""
    y, updates = module.apply({**rest, "params": params}, x, mutable=list(rest))
    return jnp.sum(jnp.sin(y)), updates


_TX = optax.sgd(0.1, momentum=0.9)


def _tangent(params):
    return jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape),
                        params)  # fmt: skip


def _trained(module, variables, x, *, jvp=True):
    """Loss, gradients, new parameters and optimizer state of one jitted step, and (``jvp``)
    the loss's ``jax.jvp`` in the parameters: one program (compiling is the cost here)."""
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}

    @jax.jit
    def step(params, opt_state, x):
        loss_fn = lambda p: _loss(module, p, rest, x)  # noqa: E731
        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        moves, opt_state = _TX.update(grads, opt_state, params)
        out = loss, updates, grads, optax.apply_updates(params, moves), opt_state
        if jvp:
            out += (jax.jvp(lambda p: loss_fn(p)[0], (params,), (_tangent(params),)),)
        return out

    return step(params, _TX.init(params), x)


_ORIGINAL = {}  # model name -> (variables, step): the original's, once per session


def _original(name):
    if name not in _ORIGINAL:
        cls, data = MODELS[name]
        module, x = cls(), data()
        variables = _init(module, x)
        assert not jaxlinear_primitives(lambda v: module.apply(v, x, mutable=True), variables)
        _ORIGINAL[name] = variables, _trained(module, variables, x)
    return _ORIGINAL[name]


# --------------------------------------------------------------------------------------
# Values, gradients, a jitted optax step, the primitives that run, the report.


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize("name", MODELS)
def test_converted_model_trains_like_the_original(name, binding):
    variables, expected = _original(name)
    cls, data = MODELS[name]
    x = data()
    model = jllinen.explicit(cls(), binding=binding)
    assert isinstance(model, cls)

    # init: exactly the original's variables (same tree, shapes, dtypes, values)
    assert_trees_close(_init(model, x), variables, atol=0, rtol=0)
    dual = binding == "dual"  # forward mode too: jax.jvp equals the original's
    assert_trees_close(_trained(model, variables, x, jvp=dual), expected if dual else expected[:-1])

    rows = {r.path: r.status for r in jllinen.report(model, x)}
    assert rows == REPORTED[name]
    if binding == "dual":  # one jaxlinear primitive per weight contraction
        forward = lambda v: model.apply(v, x, mutable=True)  # noqa: E731
        assert jaxlinear_primitives(forward, variables) == CONTRACTIONS[name]


def test_report_before_conversion_and_what_stays_untouched():
    """Unconverted: ``jax-ad``. Own ops and replacing subclasses stay; ConvLocal converts."""

    class Replaced(nn.Dense):  # replaces Dense's computation: not converted
        @nn.compact
        def __call__(self, x):
            w = self.param("kernel", draw, (x.shape[-1], self.features), jnp.float64)
            return x @ w

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):  # (B, 4, 1)
            h = nn.Dense(2, dot_general=jax.lax.dot_general, **INIT)(x)  # its own op
            h = h + nn.ConvLocal(2, (2,), **INIT)(x)  # unshared weights: (4, 2, 2)
            h = h + Replaced(2)(x)
            return nn.Einsum((2, 3), "btc,cd->btd", **INIT)(h)

    x = _x((2, 4, 1))
    before = jllinen.report(Model(), x)
    assert {r.path: r.status for r in before} == {
        "Dense_0": "untouched",
        "ConvLocal_0": "jax-ad",
        "Replaced_0": "untouched",
        "Einsum_0": "jax-ad",
    }
    assert before["ConvLocal_0"].runs == "lax.conv_general_dilated_local (JAX's AD)"
    model = jllinen.explicit(Model(), binding="dual")
    after = jllinen.report(model, x)
    assert after.explicit == ("ConvLocal_0", "Einsum_0")
    assert "its own dot_general jax._src.lax.lax.dot_general" in after["Dense_0"].runs
    assert after["ConvLocal_0"].runs == "jaxlinear.dual_dot_general"  # patches · kernel
    assert "Replaced.__call__ replaces Dense.__call__" in after["Replaced_0"].runs
    assert after["Einsum_0"].runs == "jaxlinear.dual_einsum"

    variables = _init(Model(), x)
    forward = lambda v: model.apply(v, x)  # noqa: E731
    assert jaxlinear_primitives(forward, variables) == {"dot_general": 1, "einsum": 1}
    loss = lambda m: jax.jit(jax.value_and_grad(lambda v: jnp.sum(jnp.sin(m.apply(v, x)))))  # noqa: E731
    assert_trees_close(loss(model)(variables), loss(Model())(variables))


def test_converted_module_inside_a_plain_one_and_as_a_submodule():
    """A converted module runs its rules wherever it is called; its binding can be switched."""
    dense = jllinen.explicit(nn.Dense(3, **INIT), binding="dual")
    x = _x((2, 2))
    variables = dense.init(jax.random.key(0), x)
    assert jaxlinear_primitives(lambda v: dense.apply(v, x), variables) == {"dot_general": 1}

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            converted = jllinen.explicit(nn.Dense(3, **INIT), binding="dual")
            return converted(x) + nn.Dense(3, **INIT)(x)

    outer_vars = Outer().init(jax.random.key(0), x)
    # only the converted submodule: the plain Dense beside it stays Flax's
    found = jaxlinear_primitives(lambda v: Outer().apply(v, x), outer_vars)
    assert found == {"dot_general": 1}
    again = jllinen.explicit(dense, binding="custom_vjp")
    assert type(again).__name__ == "ExplicitDense" and isinstance(again, nn.Dense)
    # the custom_vjp binding is bound through its own primitive (so vmap sees the op whole)
    assert jaxlinear_primitives(lambda v: again.apply(v, x), variables) == {
        "dot_general_custom_vjp": 1
    }


class Tied(nn.Module):
    """ids ``(B, T)`` -> logits ``(B, T, 7)``: a scaled lookup, a Dense, tied logits."""

    @nn.compact
    def __call__(self, ids):
        tok = ScaledEmbed(7, 4, embedding_init=draw, **F64)
        return tok.attend(jnp.tanh(nn.Dense(4, **INIT)(tok(ids))))


def test_per_example_loss_gives_per_example_norms():
    """DP in one line: per-example gradient norms of a converted model equal ``vmap(grad)``'s."""
    import jaxlinear

    ids = _ids()
    variables = _init(Tied(), ids)
    loss_fn, params = jllinen.per_example_loss(
        jllinen.explicit(Tied()), lambda logits: jnp.sum(jnp.sin(logits), axis=(1, 2)), variables
    )
    norms = jax.jit(lambda p, i: jaxlinear.per_example_grad_norms(loss_fn, p, i))(params, ids)

    def one(p, i):  # the plain model on one example
        return jnp.sum(jnp.sin(Tied().apply({"params": p}, i[None])))

    grads = jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0)))(params, ids)
    expected = jnp.sqrt(sum(jnp.sum(g.reshape(2, -1) ** 2, 1) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(norms, expected, rtol=1e-12)


def test_refusals():
    with pytest.raises(ValueError, match=r"jaxlinear.linen.explicit: `binding` must be"):
        jllinen.explicit(nn.Dense(2), binding="jvp")
    with pytest.raises(TypeError, match=r"jaxlinear.linen.explicit: `module` must be a Flax"):
        jllinen.explicit(lambda x: x)
    with pytest.raises(ValueError, match=r"`variables` must hold a 'params' collection"):
        jllinen.per_example_loss(nn.Dense(2), jnp.sum, {"batch_stats": {}})


def test_jaxlinear_linen_says_how_to_install_flax(monkeypatch):
    monkeypatch.setitem(sys.modules, "flax.linen", None)  # `import flax.linen` now fails
    monkeypatch.delitem(sys.modules, "jaxlinear.linen")
    with pytest.raises(ImportError, match=r"jaxlinear.linen needs Flax .*pip install flax"):
        importlib.import_module("jaxlinear.linen")
