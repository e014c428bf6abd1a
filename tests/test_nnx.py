"""``jaxlinear.nnx``: whole Flax NNX models on explicit rules.

A small CNN and a transformer block, converted with each binding, must give the original
model's values and gradients (float64: Flax's default ops under JAX's AD are the
reference), run jaxlinear's transposes (counted at trace time), keep ``nnx.state``
exactly (paths, Variable types, shapes, dtypes, arrays) and train identically under a
jitted optax step. The report must list every module with parameters, untouched ones
included.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlinear
from jaxlinear._src.ops import embed as embed_module
from jaxlinear._src.ops.conv import CONV
from jaxlinear._src.ops.conv_transpose import CONV_TRANSPOSE
from jaxlinear._src.ops.dot_general import DOT_GENERAL
from jaxlinear._src.ops.einsum import EINSUM
from tests.helpers import assert_trees_close

nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")
jlnnx = pytest.importorskip("jaxlinear.nnx")

BINDINGS = ("custom_vjp", "dual")


def _draw(key, shape, dtype=jnp.float64):
    """A Flax initializer drawing with NumPy, seeded by the shape: nothing to compile."""
    del key
    scale = 1 / np.sqrt(max(1, int(np.prod(shape[:-1]))))
    return jnp.asarray(np.random.default_rng(list(shape)).standard_normal(shape) * scale, dtype)


F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
INIT = dict(kernel_init=_draw, bias_init=_draw, **F64)  # every layer with a kernel


# --------------------------------------------------------------------------------------
# Models.


class CNN(nnx.Module):
    """ConvTranspose, Conv (strided, grouped), a Linear head: ``(N, 3, 3, 2) -> (N, 3)``."""

    def __init__(self, rngs):
        self.up = nnx.ConvTranspose(2, 4, (2, 2), strides=2, rngs=rngs, **INIT)
        self.conv = nnx.Conv(4, 4, (3, 3), strides=2, feature_group_count=2, rngs=rngs, **INIT)
        self.head = nnx.Linear(4 * 3 * 3, 3, rngs=rngs, **INIT)

    def __call__(self, x):
        h = jnp.tanh(self.up(x))  # (N, 6, 6, 4)
        h = jnp.tanh(self.conv(h))  # (N, 3, 3, 4)
        return self.head(h.reshape(h.shape[0], -1))


class Block(nnx.Module):
    """Embed, self-attention, LayerNorm, an MLP of LinearGeneral + Einsum, tied logits."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(7, 4, rngs=rngs, embedding_init=_draw, **F64)
        self.attn = nnx.MultiHeadAttention(2, 4, decode=False, rngs=rngs, **INIT)
        self.norm = nnx.LayerNorm(4, rngs=rngs, scale_init=_draw, bias_init=_draw, **F64)
        self.up = nnx.LinearGeneral(4, (2, 3), rngs=rngs, **INIT)
        self.down = nnx.Einsum("bthk,hkd->btd", (2, 3, 4), (4,), rngs=rngs, **INIT)

    def __call__(self, ids):
        h = self.embed(ids)  # (B, T, 4)
        h = h + self.attn(h)
        h = h + self.down(jnp.tanh(self.up(self.norm(h))))
        return self.embed.attend(h)  # (B, T, 7)


def _cnn():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 3, 2)))
    return CNN(nnx.Rngs(0)), x


def _block():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 7, (2, 5)))
    return Block(nnx.Rngs(0)), ids


MODELS = {"cnn": _cnn, "block": _block}

# The transposes each model's backward pass must run: (op, operand) -> how many times.
EXPECTED = {
    # The input's x̄ is not needed: the dual binding's transpose skips it; the custom_vjp's
    # backward rule computes it (then XLA drops it as dead code).
    "cnn": {
        ("conv", "x"): 1,
        ("conv", "w"): 1,
        ("conv_transpose", "w"): 1,
        ("dot_general", "x"): 1,
        ("dot_general", "w"): 1,
    },
    "block": {
        ("dot_general", "x"): 6,  # query, key, value, out, up, attend
        ("dot_general", "w"): 6,
        ("einsum", "x"): 1,
        ("einsum", "w"): 1,
        ("embed", "w"): 1,
    },
}


def _loss(model, x):
    return jnp.sum(jnp.sin(model(x)))


def _step(model, optimizer, x):
    """One training step: ``(loss, ∂loss/∂params)``; the model and optimizer are updated."""
    loss, grads = nnx.value_and_grad(_loss)(model, x)
    optimizer.update(model, grads)
    return loss, grads


def _trained(model, optimizer, x):
    """Everything one jitted step gives: loss, gradients, new parameters and optimizer state.

    Jitted afresh each time, so that it is traced (the transposes are counted at trace time).
    """
    loss, grads = nnx.jit(_step)(model, optimizer, x)
    return loss, grads, nnx.state(model), nnx.state(optimizer)


_TX = optax.sgd(0.1, momentum=0.9)  # a state per parameter, like Adam, fewer ops
_ORIGINAL_STEP = {}  # model name -> _trained(original): computed once per session


@pytest.fixture
def counted(monkeypatch):
    """Count each call of jaxlinear's transposes (at trace time), per op and operand."""
    calls = collections.Counter()
    for op in (DOT_GENERAL, EINSUM, CONV, CONV_TRANSPOSE):
        for operand in "xw":
            original = getattr(op, f"transpose_{operand}")

            def wrapper(*a, _original=original, _key=(op.name, operand), **k):
                calls[_key] += 1
                return _original(*a, **k)

            monkeypatch.setattr(op, f"transpose_{operand}", wrapper)
    original_scatter = embed_module.scatter_add

    def scatter(*a, **k):
        calls["embed", "w"] += 1
        return original_scatter(*a, **k)

    monkeypatch.setattr(embed_module, "scatter_add", scatter)
    return calls


def _state_signature(model):
    """``[(path, Variable type, shape, dtype)]`` of ``nnx.state(model)``."""
    return [
        (path, type(var), var.shape, var.dtype) for path, var in nnx.to_flat_state(nnx.state(model))
    ]


# --------------------------------------------------------------------------------------
# Values, gradients, a jitted optax step, the rules that run, the state.


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize("name", MODELS)
def test_converted_model_trains_like_the_original(name, binding, counted):
    """Loss, gradients and one jitted optax step (SGD with momentum) equal the original model's.

    The optimizer is made *before* the conversion: its state stays valid, because the
    conversion changes no Variable.
    """
    if name not in _ORIGINAL_STEP:
        original, x = MODELS[name]()
        _ORIGINAL_STEP[name] = _trained(original, nnx.Optimizer(original, _TX, wrt=nnx.Param), x)
        assert not counted  # Flax's own ops: none of jaxlinear's transposes ran
    model, x = MODELS[name]()
    optimizer = nnx.Optimizer(model, _TX, wrt=nnx.Param)
    signature, arrays = _state_signature(model), jax.tree.leaves(nnx.state(model))

    assert jlnnx.explicit(model, binding=binding) is model
    assert _state_signature(model) == signature  # the same paths, types, shapes, dtypes
    assert all(a is b for a, b in zip(jax.tree.leaves(nnx.state(model)), arrays, strict=True))

    got = _trained(model, optimizer, x)
    expected = dict(EXPECTED[name])
    if name == "cnn" and binding == "custom_vjp":
        expected["conv_transpose", "x"] = 1
    assert dict(counted) == expected  # the explicit rules are what ran
    assert_trees_close(got, _ORIGINAL_STEP[name])


def test_in_place_by_default_copy_on_request():
    model = nnx.eval_shape(lambda: _block()[0])  # no arrays: nothing computed
    copied = jlnnx.explicit(model, copy=True)
    assert copied is not model and type(model.embed) is nnx.Embed  # the original as it was
    assert jlnnx.report(model).explicit == ()
    assert type(copied.embed) is jlnnx.Embed and copied.up.dot_general is not None

    embed = model.embed
    assert jlnnx.explicit(model, binding="dual") is model
    assert model.embed is embed and type(embed) is jlnnx.Embed  # same object, class swapped
    assert embed.binding == "dual" and model.attn.query.dot_general.__name__ == "dual_dot_general"
    # Converting again switches the binding of the layers already on jaxlinear's ops.
    jlnnx.explicit(model)
    assert embed.binding == "custom_vjp" and model.attn.query.dot_general.__name__ == (
        "dot_general"
    )


def test_mixed_precision_keywords_pass_through():
    """``dtype`` casts (``promote_dtype``), ``precision`` and ``preferred_element_type``."""
    kw = dict(
        param_dtype=jnp.float64,
        dtype=jnp.float32,
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
        kernel_init=_draw,
        bias_init=_draw,
    )

    class Mixed(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 3, (2, 2), rngs=rngs, **kw)
            self.dense = nnx.Linear(3, 4, rngs=rngs, **kw)
            self.heads = nnx.Einsum("btd,dk->btk", (4, 2), rngs=rngs, **kw)

        def __call__(self, x):
            h = self.conv(x)  # (N, 3, 3, 3)
            return self.heads(self.dense(h.reshape(h.shape[0], 9, 3)))

    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 3, 2)))
    original = Mixed(nnx.Rngs(0))
    converted = jlnnx.explicit(original, copy=True)

    @nnx.jit
    def both(original, converted, x):
        run = nnx.value_and_grad(_loss, argnums=(0, 1))
        return converted(x), run(original, x), run(converted, x)

    y, expected, got = both(original, converted, x)
    assert y.dtype == jnp.float32
    # float32 products in another order at most: within float32 rounding.
    assert_trees_close(got, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# The replacement modules against Flax's.


def test_embed_matches_flax_embed():
    ids = jnp.array([[0, 3, 3], [-1, 2, 0]])  # repeated and negative ids
    query = jnp.asarray(np.random.default_rng(2).standard_normal((2, 4)))

    def loss(m):  # the lookup and `attend`, each in its own term
        return jnp.sum(jnp.sin(m(ids))) + jnp.sum(jnp.cos(m.attend(query)))

    pairs = [  # (ours, Flax's); with one row, nnx.Embed gives that row for every id
        (
            jlnnx.Embed(v, 4, rngs=nnx.Rngs(0), binding=b, embedding_init=_draw, **F64),
            nnx.Embed(v, 4, rngs=nnx.Rngs(0), embedding_init=_draw, **F64),
        )
        for v, b in ((5, "custom_vjp"), (5, "dual"), (1, "custom_vjp"))
    ]
    for ours, flax_embed in pairs:
        assert _state_signature(ours) == _state_signature(flax_embed)
    results = nnx.jit(lambda ps: [[nnx.value_and_grad(loss)(m) for m in p] for p in ps])(pairs)
    for got, expected in results:
        assert_trees_close(got, expected)
    # The dual binding gives forward mode in the table.
    graphdef, state = nnx.split(pairs[1][0])
    tangent = jax.tree.map(jnp.ones_like, state)
    _, dy = jax.jvp(lambda s: nnx.merge(graphdef, s)(ids), (state,), (tangent,))
    assert_trees_close(dy, jnp.ones((2, 3, 4)))


def test_conv_transpose_matches_flax_conv_transpose():
    """Strides, kernel dilation, ``transpose_kernel``, Flax's padding modes, batch axes."""
    cases = [  # (constructor keywords, input shape)
        (dict(kernel_size=(3, 2), strides=2, padding="SAME"), (1, 2, 3, 4, 2)),  # 2 batch axes
        (
            dict(kernel_size=(3,), strides=2, padding=1, kernel_dilation=2, use_bias=False),
            (2, 4, 2),
        ),
        (dict(kernel_size=(3,), strides=2, padding="CIRCULAR", transpose_kernel=True), (4, 2)),
    ]
    rng = np.random.default_rng(3)
    xs = [jnp.asarray(rng.standard_normal(shape)) for _, shape in cases]
    pairs = []
    for (kw, _), binding in zip(cases, ("custom_vjp", "dual", "custom_vjp"), strict=True):
        ours = jlnnx.ConvTranspose(2, 3, rngs=nnx.Rngs(0), binding=binding, **kw, **INIT)
        flax_layer = nnx.ConvTranspose(2, 3, rngs=nnx.Rngs(0), **kw, **INIT)
        assert _state_signature(ours) == _state_signature(flax_layer)
        pairs.append((ours, flax_layer))

    @nnx.jit
    def run(pairs, xs):
        grads = nnx.value_and_grad(_loss, argnums=(0, 1))
        return [[grads(m, x) for m in pair] for pair, x in zip(pairs, xs, strict=True)]

    for got, expected in run(pairs, xs):
        assert_trees_close(got, expected)


# --------------------------------------------------------------------------------------
# The report.


def test_report_lists_every_module():
    model = nnx.eval_shape(lambda: _block()[0])
    before = jlnnx.report(model)
    assert before.explicit == ()
    assert before.paths("jax-ad") == (
        "attn.key", "attn.out", "attn.query", "attn.value", "down", "embed", "up"
    )  # fmt: skip
    after = jlnnx.report(jlnnx.explicit(model))
    assert [(r.path, r.module, r.status) for r in after] == [
        ("attn", "MultiHeadAttention", "note"),
        ("attn.key", "LinearGeneral", "explicit"),
        ("attn.out", "LinearGeneral", "explicit"),
        ("attn.query", "LinearGeneral", "explicit"),
        ("attn.value", "LinearGeneral", "explicit"),
        ("down", "Einsum", "explicit"),
        ("embed", "Embed", "explicit"),
        ("norm", "LayerNorm", "untouched"),
        ("up", "LinearGeneral", "explicit"),
    ]
    assert after["embed"].runs == "jaxlinear.embed; attend: jaxlinear.dot_general"
    assert after["down"].runs == "jaxlinear.einsum"
    assert "activations" in after["attn"].runs
    assert after.untouched == ("norm",)
    assert "params bias, scale" in after["norm"].runs
    table = str(after).splitlines()
    assert table[0].split() == ["path", "module", "status", "runs"]
    assert len(table) == 2 + len(after) and table[-1].startswith("up ")
    assert "(model)" not in str(after)


def test_report_and_explicit_leave_what_they_do_not_know():
    class Custom(nnx.Module):  # parameters used directly, in a list
        def __init__(self):
            self.scale = nnx.Param(jnp.ones(3))
            self.extra = nnx.List([nnx.Param(jnp.zeros(3))])

    class MyLinear(nnx.Linear):  # a subclass replacing the computation: not converted
        def __call__(self, x):
            return x @ self.kernel[...]

    class Reaching(nnx.Linear):  # a subclass not overriding __call__: converted
        pass

    def my_dot_general(*args, **kwargs):
        return jax.lax.dot_general(*args, **kwargs)

    class Owner(nnx.Module):
        def __init__(self, rngs):
            self.custom = Custom()
            self.sub = MyLinear(3, 3, rngs=rngs)
            self.third_party = nnx.Linear(3, 3, dot_general=my_dot_general, rngs=rngs)
            self.reaching = Reaching(3, 3, rngs=rngs)
            self.ellipsis = nnx.Einsum("...d,dk->...k", (3, 2), rngs=rngs)  # converted
            self.with_cls = nnx.LinearGeneral(3, 2, dot_general_cls=lambda: my_dot_general,
                                              rngs=rngs)  # fmt: skip
            self.bias = nnx.Param(jnp.zeros(2))  # the model's own parameter

    model = jlnnx.explicit(nnx.eval_shape(lambda: Owner(nnx.Rngs(0))))
    report = jlnnx.report(model)
    assert report.untouched == (
        "", "custom", "sub", "third_party", "with_cls"
    )  # fmt: skip
    assert report.explicit == ("ellipsis", "reaching")
    assert "params bias" in report[""].runs and str(report).splitlines()[2].startswith("(model)")
    assert "params extra.0, scale" in report["custom"].runs
    assert "subclass of nnx.Linear: MyLinear.__call__ replaces" in report["sub"].runs
    assert model.sub.dot_general is jax.lax.dot_general
    assert model.third_party.dot_general is my_dot_general
    assert "my_dot_general" in report["third_party"].runs
    assert report["ellipsis"].runs == "jaxlinear.einsum"  # '...' subscripts: converted
    assert report["reaching"].runs == "jaxlinear.dot_general"
    assert "dot_general_cls" in report["with_cls"].runs and model.with_cls.dot_general is None


# --------------------------------------------------------------------------------------
# Refusals.


def test_refusals():
    model = nnx.eval_shape(lambda: _cnn()[0])
    with pytest.raises(ValueError, match=r"explicit: `binding` must be 'custom_vjp' or 'dual'"):
        jlnnx.explicit(model, binding="primitive")
    with pytest.raises(TypeError, match=r"explicit: `model` must be a Flax NNX module .* dict"):
        jlnnx.explicit({"W": jnp.ones((2, 2))})
    with pytest.raises(TypeError, match=r"report: `model` must be a Flax NNX module"):
        jlnnx.report([model])
    with pytest.raises(ValueError, match=r"Embed: `binding` must be"):
        jlnnx.Embed(3, 2, rngs=nnx.Rngs(0), binding="jvp")
    embed = jlnnx.Embed(3, 2, rngs=nnx.Rngs(0), embedding_init=_draw)
    with pytest.raises(NotImplementedError, match=r"Embed: `out_sharding` must be None"):
        embed(jnp.array([1]), out_sharding=jax.sharding.PartitionSpec())
    with pytest.raises(ValueError, match=r"Input type must be an integer"):
        embed(jnp.array([1.0]))
    report = jlnnx.report(jlnnx.explicit(model))
    with pytest.raises(KeyError, match=r"no module at path 'conv3'"):
        report["conv3"]
    with pytest.raises(ValueError, match=r"paths: `status` must be one of"):
        report.paths("converted")


def test_jaxlinear_imports_without_flax():
    """``import jaxlinear`` never imports Flax; ``jaxlinear.nnx`` says how to install it."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["flax"] = None  # `import flax` now raises ImportError
        import jax.numpy as jnp
        import jaxlinear
        assert jaxlinear.embed(jnp.eye(2), jnp.array([1])).tolist() == [[0.0, 1.0]]
        try:
            import jaxlinear.nnx
        except ImportError as error:
            assert "pip install flax" in str(error), error
        else:
            raise AssertionError("jaxlinear.nnx imported without flax")
        print("ok")
        """
    )
    root = Path(__file__).resolve().parent.parent  # `import jaxlinear` finds this checkout
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


@pytest.mark.parametrize("kind", ["dropout", "batchnorm"])
def test_per_example_loss_with_dropout_or_batch_stats_as_documented(kind):
    """``per_example_loss``'s docstring: dropout in training mode runs (each example's
    gradient, mask included, equals the batched loss's Jacobian row); BatchNorm in training
    mode mixes the examples and is refused under ``fallback="raise"``, naming the leaf;
    evaluation mode runs (each example's loss depends on that example alone)."""
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 4, rngs=rngs, param_dtype=jnp.float32)
            self.mid = (
                nnx.Dropout(0.5, rngs=rngs)
                if kind == "dropout"
                else nnx.BatchNorm(4, rngs=rngs, param_dtype=jnp.float32)
            )

        def __call__(self, x):
            return self.mid(self.lin(x))

    model = jlnnx.explicit(Net(nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32)
    loss_fn, params = jlnnx.per_example_loss(model, lambda y: jnp.sum(y**2, axis=1))
    if kind == "dropout":
        norms = jaxlinear.per_example_grad_norms(loss_fn, params, x, fallback="raise")
        rows = jax.jacrev(loss_fn)(params, x)  # the same masks: drawn once per trace
        want = jnp.sqrt(
            sum(jnp.sum(a**2, axis=tuple(range(1, a.ndim))) for a in jax.tree.leaves(rows))
        )
        np.testing.assert_allclose(norms, want, rtol=1e-5)
    else:
        why = r"params\['mid'\].*no single axis.*BatchNorm.*model\.eval\(\)"
        with pytest.raises(ValueError, match=why):
            jaxlinear.per_example_grad_norms(loss_fn, params, x, fallback="raise")
    model.eval()
    loss_fn, params = jlnnx.per_example_loss(model, lambda y: jnp.sum(y**2, axis=1))
    norms = jaxlinear.per_example_grad_norms(loss_fn, params, x)
    one = lambda xi: jax.grad(lambda p: loss_fn(p, xi[None])[0])(params)  # noqa: E731
    want = jnp.sqrt(
        sum(jnp.sum(a**2, axis=tuple(range(1, a.ndim))) for a in jax.tree.leaves(jax.vmap(one)(x)))
    )
    np.testing.assert_allclose(norms, want, rtol=1e-5)
