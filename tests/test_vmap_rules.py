"""The layers with a bias under ``vmap``: both bindings keep their explicit rules.

``linear``/``dual_linear`` and ``conv``/``dual_conv`` under ``jax.vmap`` over ``x``, over
the params (``W`` and ``b`` together, ``W`` alone, ``b`` alone) and over both, against
JAX's AD of the plain ``x @ W + b`` / ``lax.conv_general_dilated`` under ``vmap`` in
float64: values, ``grad`` in every operand, ``jvp`` (dual) with the tangents batched
apart from the primals, and ``vmap`` of ``vmap``. And the jaxprs: the family's
primitives are what runs (a batched ``W`` of the dense layer binds ``dot_general``), the
op's own pullback is what ``grad`` calls, once, on the batched shapes. The ops without a
bias (``dot_general``, ``einsum``, ``conv_general_dilated`` with feature or batch
groups, ``conv_transpose``, ``embed``): ``test_family.py::test_vmap*``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxlinear
from jaxlinear._src.linear import AFFINE
from jaxlinear._src.ops.conv import CONV
from jaxlinear._src.ops.dot_general import DOT_GENERAL
from tests.helpers import assert_trees_close, eqns

P = jaxlinear.Params
B = 2  # the vmapped size

# (in_axes of (params, x), the primitive the dense layer binds)
LAYOUTS = [
    pytest.param((None, 0), "affine", id="x"),
    pytest.param((P(0, 0), None), "dot_general", id="W_b"),
    pytest.param((P(0, None), None), "dot_general", id="W"),
    pytest.param((P(None, 0), None), "affine", id="b"),
    pytest.param((P(0, 0), 0), "dot_general", id="W_b_x"),
    pytest.param((P(0, None), 0), "dot_general", id="W_x_no_bias"),
]


def _conv_ref(p, x):  # 1-D, channels last, stride 2, 2 groups
    y = lax.conv_general_dilated(
        x, p.W, (2,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=2
    )
    return y if p.b is None else y + jnp.broadcast_to(p.b, y.shape)


def _dense_ref(p, x):
    y = x @ p.W
    return y if p.b is None else y + jnp.broadcast_to(p.b, y.shape)


LAYERS = {
    # name: (layer, reference, W shape, x shape (one example of the vmap)); the custom_vjp
    # bindings ("..._vjp") have no forward mode.
    "dense": (jaxlinear.dual_linear, _dense_ref, (3, 4), (2, 3)),
    "conv": (lambda p, x: jaxlinear.dual_conv(p, x, strides=2, groups=2), _conv_ref,
             (3, 2, 4), (2, 5, 4)),
    "dense_vjp": (jaxlinear.linear, _dense_ref, (3, 4), (2, 3)),
    "conv_vjp": (lambda p, x: jaxlinear.conv(p, x, strides=2, groups=2), _conv_ref,
                 (3, 2, 4), (2, 5, 4)),
}  # fmt: skip


def _inputs(layer, axes, seed=0):
    """Params and x, with a leading axis of size B where ``axes`` says."""
    _, _, w_shape, x_shape = LAYERS[layer]
    (p_axes, x_axis), rng = axes, np.random.default_rng(seed)
    W_axis, b_axis = (p_axes, p_axes) if p_axes is None or isinstance(p_axes, int) else p_axes
    no_bias = isinstance(p_axes, P) and p_axes.b is None and x_axis is not None

    def draw(shape, axis):
        return jnp.asarray(rng.standard_normal(shape if axis is None else (B, *shape)))

    p = P(draw(w_shape, W_axis), None if no_bias else draw(w_shape[-1:], b_axis))
    return p, draw(x_shape, x_axis)


def _loss(f):
    return lambda *a: jnp.sum(jnp.sin(f(*a)))


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_values_and_derivatives_match_jax_ad(layer):
    # Every layout in one jit: y, grad in (params, x), jvp with the tangents batched and
    # the primals not, vmap of vmap (params batched twice over, x once).
    f, ref, *_ = LAYERS[layer]
    # conv: two layouts, its bias shared and batched (added after the batched result: its
    # folds move the vmapped axis; every fold: test_family.py::test_vmap), for a small
    # compile.
    dense, dual = layer.startswith("dense"), not layer.endswith("_vjp")
    layouts = [p.values for p in LAYOUTS if dense or p.id in ("W", "W_b_x")]
    inputs = [_inputs(layer, axes) for axes, _ in layouts]
    p1, x1 = _inputs(layer, ((None, None)), seed=1)
    tangents = _inputs(layer, (0, 0), seed=2)
    twice = _inputs(layer, (0, 0), seed=3)

    def run(g, inputs, p1, x1, tangents, twice):
        out = []
        for (axes, _), (p, x) in zip(layouts, inputs, strict=True):
            out.append(jax.vmap(g, axes)(p, x))
            out.append(jax.grad(_loss(jax.vmap(g, axes)), (0, 1))(p, x))
        if dual:  # forward mode
            out.append(jax.vmap(lambda dp, dx: jax.jvp(g, (p1, x1), (dp, dx))[1])(*tangents))
        p2 = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), twice[0])  # (2, B, ...)
        out.append(jax.vmap(jax.vmap(g, (0, 0)), (0, None))(p2, twice[1]))
        return out

    ours, refs = jax.jit(lambda *a: (run(f, *a), run(ref, *a)))(inputs, p1, x1, tangents, twice)
    assert_trees_close(ours, refs)


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("axes, bound", LAYOUTS)
def test_the_family_primitives_run(layer, axes, bound, monkeypatch):
    # Trace only. The forward pass and forward mode bind the family's primitives and no
    # lax contraction outside them; grad of vmap runs the bound op's own pullback.
    # The custom_vjp binding binds its own primitive the same way; its grad runs the
    # custom_vjp's backward pass, which calls the same pullback.
    f = LAYERS[layer][0]
    dense, dual = layer.startswith("dense"), not layer.endswith("_vjp")
    op = {"affine": AFFINE, "dot_general": DOT_GENERAL}[bound] if dense else CONV
    prim = f"jaxlinear_{op.name}" + ("" if dual else "_custom_vjp")
    p, x = _inputs(layer, axes)
    g = jax.vmap(f, axes)
    raw = {"dot_general", "conv_general_dilated"}
    names = {e.primitive.name for e in eqns(jax.make_jaxpr(g)(p, x))}
    assert prim in names and not raw & names, names
    if dual:
        jvp = jax.make_jaxpr(lambda p, x: jax.jvp(g, (p, x), (p, x)))(p, x)
        names = {e.primitive.name for e in eqns(jvp)}
        assert f"{prim}_pushforward" in names and not raw & names, names
    calls, pullback = [], op._pullback_fn

    def counted(*a, **k):
        calls.append((k["wrt"], np.size(a[2])))  # (wrt, the size of the cotangent it sees)
        return pullback(*a, **k)

    monkeypatch.setattr(op, "_pullback_fn", counted)
    jax.make_jaxpr(jax.grad(_loss(g), (0, 1)))(p, x)
    assert calls and set(calls[0][0]) >= {"x", "w"}, calls
    # Once, on every example at once (the batched shapes), not under vmap per example;
    # with only b batched, the product is the same for every example and bound once.
    size = jax.eval_shape(g, p, x).size // (B if axes == (P(None, 0), None) else 1)
    assert [size for _, size in calls] == [size], calls


def test_mixed_precision_under_vmap():
    # compute_dtype survives the batching rule: y in bfloat16 (bias added in float32 and
    # rounded once), cotangents in the primals' dtypes; shapes only.
    p, x = _inputs("conv", (P(0, 0), 0))
    p, x = jax.tree.map(lambda a: a.astype(jnp.float32), (p, x))
    f = jax.vmap(lambda p, x: jaxlinear.dual_conv(p, x, groups=2, compute_dtype=jnp.bfloat16))
    y, grads = jax.eval_shape(lambda p, x: (f(p, x), jax.grad(_loss(f), (0, 1))(p, x)), p, x)
    assert y.dtype == jnp.bfloat16
    assert {a.dtype for a in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_custom_vjp_binding_under_vmap_composes():
    # The custom_vjp binding's primitive (batching rule + a JVP that is the custom_vjp
    # call) with the transforms around and inside vmap, in one jit, against JAX's AD.
    p, x = _inputs("dense", (None, 0))

    def run(layer):
        f = lambda p, x: jnp.sin(layer(p, x))  # noqa: E731
        batched = lambda p: jnp.sum(jax.vmap(f, (None, 0))(p, x))  # noqa: E731
        hessian_W = jax.hessian(lambda W: batched(P(W, p.b)))  # forward over reverse
        scan = lambda p: jax.lax.scan(  # noqa: E731
            lambda c, r: (c + jnp.sum(jax.vmap(f, (None, 0))(p, r)), None), 0.0, x[:, None]
        )[0]
        return [
            jax.vmap(jax.grad(lambda p, x: jnp.sum(f(p, x))), (None, 0))(p, x),
            jax.grad(lambda p: jnp.sum(jax.vmap(jax.checkpoint(f), (None, 0))(p, x)))(p),
            jax.grad(scan)(p),
            hessian_W(p.W),
            jax.grad(lambda W: jnp.sum(jax.grad(lambda W: batched(P(W, p.b)))(W) ** 2))(p.W),
        ]

    ours, refs = jax.jit(lambda: (run(jaxlinear.linear), run(_dense_ref)))()
    assert_trees_close(ours, refs)
