"""``jaxlinear.equinox.explicit``: Equinox models on explicit rules, checked against Equinox.

The reference is the unconverted Equinox model under JAX's own autodiff (float64). That
jaxlinear's rules are what runs is counted: every transpose the ops call is recorded at
trace time while ``jax.grad`` of the vmapped model is traced.
"""

import functools
import importlib
import io
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

eqx = pytest.importorskip("equinox")
optax = pytest.importorskip("optax")

import jaxlinear.equinox as je  # noqa: E402
from jaxlinear._src.linear import AFFINE  # noqa: E402
from jaxlinear._src.ops import embed as embed_module  # noqa: E402
from jaxlinear._src.ops.conv import CONV  # noqa: E402

F64 = dict(dtype=jnp.float64)
BINDINGS = ["custom_vjp", "dual"]


class CNN(eqx.Module):
    """Every conv option Equinox has: 1-D, 2-D and 3-D; strides; padding as a string, an
    int, pairs; dilation; groups; the three non-zero padding modes; transposed convs with
    output padding and with circular padding; no bias; a scalar head."""

    layers: list

    def __init__(self, key):
        k = jax.random.split(key, 8)
        self.layers = [
            eqx.nn.Conv2d(2, 4, 3, stride=2, padding="SAME", key=k[0], **F64),
            eqx.nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, padding_mode="REFLECT",
                          key=k[1], **F64),
            eqx.nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1, key=k[2],
                                   **F64),
            eqx.nn.Conv1d(3, 2, 2, padding=((1, 0),), key=k[3], **F64),
            eqx.nn.Linear(2 * 8 * 8, "scalar", key=k[4], **F64),
            eqx.nn.Conv1d(2, 2, 3, stride=2, padding="SAME_LOWER", padding_mode="REPLICATE",
                          key=k[5], **F64),
            eqx.nn.ConvTranspose1d(2, 3, 3, stride=2, padding="SAME", padding_mode="CIRCULAR",
                                   key=k[6], **F64),
            eqx.nn.Conv3d(2, 2, (2, 1, 2), padding=((0, 1), (1, 1), (1, 0)), groups=2,
                          padding_mode="CIRCULAR", use_bias=False, key=k[7], **F64),
        ]  # fmt: skip

    def __call__(self, x):  # (2, 8, 8) -> ()
        c1, c2, ct, c3, head, c1d, ct1d, c3d = self.layers
        h = ct(jnp.tanh(c2(jnp.tanh(c1(x)))))  # (3, 8, 8)
        h = jax.vmap(c3, in_axes=1, out_axes=1)(h)  # a 1-D conv along the last axis
        side = ct1d(jnp.tanh(c1d(x[:, 0])))  # (2, 8) -> (2, 4) -> (3, 8)
        cube = c3d(x.reshape(2, 4, 2, 8))  # (2, 5, 4, 8)
        return head(jnp.sin(h).reshape(-1)) + jnp.sum(side**2) + jnp.sum(jnp.cos(cube))


class Block(eqx.Module):
    """A transformer block: embedding, attention, layer norm (untouched), MLP, scalar head."""

    emb: eqx.nn.Embedding
    attn: eqx.nn.MultiheadAttention
    norm: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP
    head: eqx.nn.Linear

    def __init__(self, key):
        k = jax.random.split(key, 4)
        self.emb = eqx.nn.Embedding(7, 8, key=k[0], **F64)
        self.attn = eqx.nn.MultiheadAttention(2, 8, key=k[1], **F64)
        self.norm = eqx.nn.LayerNorm(8, **F64)
        self.mlp = eqx.nn.MLP(8, 8, 16, 1, activation=jnp.tanh, key=k[2], **F64)
        self.head = eqx.nn.Linear(8, 1, key=k[3], **F64)

    def __call__(self, ids):  # (T,) int -> ()
        h = jax.vmap(self.emb)(ids)  # (T, 8)
        h = h + self.attn(h, h, h)
        h = h + jax.vmap(self.mlp)(jax.vmap(self.norm)(h))
        return jnp.sum(jax.vmap(self.head)(h) ** 2)


KEY = jax.random.key(0)
MODELS = {
    "cnn": (CNN(KEY), jax.random.normal(jax.random.key(1), (3, 2, 8, 8), jnp.float64)),
    "transformer": (Block(KEY), jnp.array([[1, 2, 3, 6], [0, 6, 6, 1], [5, 5, 2, 4]])),
}
# module class -> how many of its layers each model has
LAYERS = {"cnn": {"conv": 7, "linear": 1}, "transformer": {"embed": 1, "linear": 7}}


def batch_loss(model, x):
    """The per-example model vmapped over the batch, as Equinox models are run."""
    return jnp.sum(jnp.cos(jax.vmap(model)(x)))


@eqx.filter_jit
def value_grads_jvp(model, x, forward_mode):
    """The batch loss, its gradient in the params, and (``forward_mode``) ``jax.jvp`` of
    the model on one example in the params (forward mode: the dual binding only)."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    value, grads = jax.value_and_grad(lambda p: batch_loss(eqx.combine(p, static), x))(params)
    jvp = None
    if forward_mode:  # in the params, on one example
        one = lambda p: eqx.combine(p, static)(x[0])  # noqa: E731
        jvp = jax.jvp(one, (params,), (jax.tree.map(jnp.cos, params),))[1]
    return value, grads, jvp


FORWARD_MODE = ("transformer",)  # jvp checked here (the convs' forward mode: test_conv.py)


@functools.cache
def reference(name):
    """The unconverted model's results, computed once per model."""
    model, x = MODELS[name]
    return value_grads_jvp(model, x, name in FORWARD_MODE)


@pytest.fixture
def counted(monkeypatch):
    """Record, at trace time, each pullback / transpose the converted layers' ops run."""
    calls = []

    def wrap(obj, name, tag):
        original = getattr(obj, name)

        def wrapper(*a, **k):
            calls.append(tag)
            return original(*a, **k)

        monkeypatch.setattr(obj, name, wrapper)

    wrap(AFFINE, "_pullback_fn", "linear")
    wrap(CONV, "transpose_w", "conv")
    wrap(embed_module, "scatter_add", "embed")
    return calls


def leaves_with_paths(tree):
    """``[(path, shape, dtype)]`` of every array leaf: what serialisation and optax see."""
    flat, _ = jax.tree_util.tree_flatten_with_path(eqx.filter(tree, eqx.is_array))
    return [(jax.tree_util.keystr(p), a.shape, a.dtype) for p, a in flat]


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize("name", MODELS)
def test_values_grads_and_state_equal_the_original(name, binding, counted):
    model, x = MODELS[name]
    new = je.explicit(model, binding=binding)
    assert leaves_with_paths(new) == leaves_with_paths(model)  # same paths, shapes, dtypes
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(model), strict=True):
        assert a is b  # the very same arrays, shared

    value, grads, jvp = value_grads_jvp(new, x, binding == "dual" and name in FORWARD_MODE)
    ref_value, ref_grads, ref_jvp = reference(name)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    if jvp is not None:  # forward mode through the dual binding
        np.testing.assert_allclose(jvp, ref_jvp, rtol=1e-11)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        assert g.shape == r.shape and g.dtype == r.dtype
        np.testing.assert_allclose(g, r, rtol=1e-11, atol=1e-12)
    # Every converted layer's transpose ran in the backward pass (at least once per layer).
    for kind, n in LAYERS[name].items():
        assert counted.count(kind) >= n, (kind, counted)


@pytest.mark.parametrize("binding", BINDINGS)
def test_grad_of_vmapped_model_keeps_jaxlinears_operations(binding):
    """The jaxprs: each binding's primitives survive ``vmap`` (a batching rule binds them
    again on the batched shapes); the custom_vjp's backward is its transposes, traced in."""
    model, x = MODELS["transformer"]
    params, static = eqx.partition(je.explicit(model, binding=binding), eqx.is_inexact_array)
    loss = lambda p: batch_loss(eqx.combine(p, static), x)  # noqa: E731
    text = str(jax.make_jaxpr(jax.grad(loss))(params))
    forward = str(jax.make_jaxpr(loss)(params))
    if binding == "dual":
        assert text.count("jaxlinear_affine") >= 7 and "jaxlinear_embed" in text
    else:  # 7 linear layers and the embedding, each bound once for the whole batch
        assert forward.count("jaxlinear_affine_custom_vjp") == 7, forward
        assert forward.count("jaxlinear_embed_custom_vjp") == 1, forward


def test_serialisation_round_trip_and_tree_at():
    model, x = MODELS["cnn"]
    new = je.explicit(model)
    # Converted -> bytes -> original class, and original -> bytes -> converted class.
    for source, like in ((new, model), (model, new)):
        buffer = io.BytesIO()
        eqx.tree_serialise_leaves(buffer, source)
        buffer.seek(0)
        loaded = eqx.tree_deserialise_leaves(buffer, like)
        assert type(loaded) is type(like)
        assert all(type(a) is type(b) for a, b in zip(loaded.layers, like.layers, strict=True))
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(source), strict=True):
            np.testing.assert_array_equal(a, b)
    # tree_at replaces a weight; the layer stays converted.
    zero = eqx.tree_at(lambda m: m.layers[0].weight, new, jnp.zeros_like(new.layers[0].weight))
    assert type(zero.layers[0]) is type(new.layers[0])
    np.testing.assert_array_equal(
        zero.layers[0](x[0]), jnp.broadcast_to(new.layers[0].bias, (4, 4, 4))
    )


def test_jitted_optax_step_equals_the_originals():
    model = eqx.nn.MLP(3, "scalar", 4, 1, activation=jnp.tanh, key=KEY, **F64)
    x = jax.random.normal(jax.random.key(1), (5, 3), jnp.float64)
    targets = jnp.arange(5.0)
    opt = optax.adam(1e-2)

    def loss(model, x):
        return jnp.sum((jax.vmap(model)(x) - targets) ** 2)

    @eqx.filter_jit
    def step(model, state, x):
        value, grads = eqx.filter_value_and_grad(loss)(model, x)
        updates, state = opt.update(grads, state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state, value

    state = opt.init(eqx.filter(model, eqx.is_array))
    new = je.explicit(model, binding="dual")
    # The optimizer state mirrors the model: the same call converts it.
    new_model, new_state, new_value = step(new, je.explicit(state, binding="dual"), x)
    ref_model, ref_state, ref_value = step(model, state, x)
    np.testing.assert_allclose(new_value, ref_value, rtol=1e-12)
    assert type(new_model.layers[0]) is type(new.layers[0])
    arrays = lambda tree: jax.tree.leaves(eqx.filter(tree, eqx.is_array))  # noqa: E731
    got, want = arrays((new_model, new_state)), arrays((ref_model, ref_state))
    assert len(got) == len(want) == 3 * 4 + 1  # W, b of 2 layers; adam's 2 moments; count
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_report_lists_converted_attention_and_untouched_modules():
    class MyLinear(eqx.nn.Linear):  # a subclass replacing the computation: left alone
        def __call__(self, x, *, key=None):
            return self.weight @ x

    class Reaching(eqx.nn.Linear):  # a subclass reaching the parent's: converted
        pass

    model = (
        Block(KEY),
        MyLinear(2, 2, key=KEY),
        eqx.nn.GRUCell(2, 2, key=KEY),
        Reaching(2, 2, key=KEY),
    )
    new = je.explicit(model, binding="dual")
    rows = {r.path: r for r in je.report(new).rows}
    assert rows["[0].attn.query_proj"].runs == "jaxlinear.dual_linear (dual) on weight.T"
    assert rows["[0].emb"].runs == "jaxlinear.dual_embed (dual)"
    assert "q·kᵀ and softmax·v stay JAX's" in rows["[0].attn"].runs
    assert {r.path for r in je.report(new).untouched} == {"[0].norm", "[1]"}
    assert "subclass of eqx.nn.Linear: MyLinear.__call__ replaces" in rows["[1]"].runs
    assert type(new[1]) is MyLinear
    assert rows["[2]"].runs == "jaxlinear.dual_linear (dual) on weight_ih.T, weight_hh.T"
    assert rows["[3]"].runs == "jaxlinear.dual_linear (dual) on weight.T"
    assert isinstance(new[3], Reaching) and type(new[3]) is not Reaching
    text = str(je.report(new))
    assert text.splitlines()[0].split() == ["path", "module", "runs"]
    assert rows["[0].mlp.layers[1]"].module == "DualLinear"
    # The original model: every known layer still runs JAX's own rules.
    assert je.report(model[0]).rows[0].runs == "JAX's own rules (not converted)"
    # Converting again switches the binding.
    again = je.explicit(new, binding="custom_vjp")
    assert type(again[0].head).__name__ == "ExplicitLinear"
    assert isinstance(again[0].head, eqx.nn.Linear)


def test_errors():
    with pytest.raises(ValueError, match=r"explicit: `binding` must be one of .*got 'jvp'"):
        je.explicit(MODELS["cnn"][0], binding="jvp")
    new = je.explicit(MODELS["cnn"][0])
    with pytest.raises(ValueError, match=r"`Conv` needs to have rank 3, but input has shape"):
        new.layers[0](jnp.ones((1, 2, 8, 8)))
    with pytest.raises(ValueError, match="x must have scalar shape"):
        je.explicit(eqx.nn.Linear("scalar", 2, key=KEY))(jnp.ones(2))
    with pytest.raises(ValueError, match=r"called with a scalar index `x`. Use `jax.vmap`"):
        je.explicit(eqx.nn.Embedding(3, 2, key=KEY))(jnp.array([0, 1]))
    with pytest.raises(TypeError, match=r"linear: `x` has dtype int"):
        je.explicit(eqx.nn.Linear(2, 2, key=KEY))(jnp.ones(2, int))


def test_scalar_features_and_python_int_index():
    lin = eqx.nn.Linear("scalar", "scalar", key=KEY, **F64)
    new = je.explicit(lin)
    np.testing.assert_allclose(new(jnp.float64(2.0)), lin(jnp.float64(2.0)), rtol=1e-15)
    assert new(jnp.float64(2.0)).shape == ()
    emb = eqx.nn.Embedding(3, 2, key=KEY, **F64)
    np.testing.assert_array_equal(je.explicit(emb)(2), emb(2))


def test_missing_equinox_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "equinox", None)  # `import equinox` now fails
    monkeypatch.delitem(sys.modules, "jaxlinear.equinox")
    with pytest.raises(ImportError, match=r"needs Equinox.*pip install equinox"):
        importlib.import_module("jaxlinear.equinox")
