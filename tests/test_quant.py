"""Quantized products (``quant=``): every op × every named recipe, both bindings.

References are independent of the code under test: operands are quantized here in
NumPy (``ml_dtypes`` rounds to the fp8 formats, ``np.round`` to int8) with the scales
the recipes document, and the products are JAX's plain ``lax``/``jnp`` ops in float64,
differentiated by JAX's own AD. Two checks per case:

1. *quantize–dequantize reference*: the result equals the plain op on the dequantized
   operands up to float32 accumulation (``1e-5`` of ``B(|a|, |b|)``); int8 dense is
   checked bit for bit.
2. *error bound*: the result is within the recipe's bound of the exact float64 value:
   ``|P(a, b) − P̂| ≤ P(E_a, |b|) + P(|a|, E_b) + P(E_a, E_b)`` with the per-element
   quantization error ``E = u·|a| + δ·s`` (``u``: 2⁻⁴ for e4m3, 2⁻³ for e5m2, 0 for int8;
   ``δ``: half the format's smallest step: 2⁻¹⁰, 2⁻¹⁷, ½).

Cotangents are fixed arrays (the loss is ``⟨y, c⟩``), so each gradient is one product.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax

import jaxlinear
from jaxlinear._src import quant

F32 = np.float32
FMAX = {"e4m3": 448.0, "e5m2": 57344.0, "int8": 127.0}
NP_FORMAT = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}
U = {"e4m3": 2.0**-4, "e5m2": 2.0**-3, "int8": 0.0}  # relative rounding error (normal range)
DELTA = {"e4m3": 2.0**-10, "e5m2": 2.0**-17, "int8": 0.5}  # absolute, in units of the scale

# The named recipes as documented: product -> ((lhs format, per-axis?), (rhs format, per-axis?)).
RECIPES = {
    "fp8_hybrid": {
        "forward": (("e4m3", False), ("e4m3", False)),
        "grad_x": (("e5m2", False), ("e4m3", False)),
        "grad_w": (("e5m2", False), ("e4m3", False)),
    },
    "fp8_rowwise": {
        "forward": (("e4m3", True), ("e4m3", True)),
        "grad_x": (("e5m2", True), ("e4m3", True)),
        "grad_w": (("e5m2", True), ("e4m3", True)),
    },
    "int8": {p: (("int8", True), ("int8", True)) for p in ("forward", "grad_x", "grad_w")},
}


def ref_quantize(a, fmt, kept):
    """``(q, s)`` in float32 NumPy: ``s = max|a| · f32(1 / F.max)`` over the axes not in
    ``kept`` (1 where 0), ``q = rne(clip(a / s))``."""
    a = np.asarray(a, F32)
    axes = tuple(i for i in range(a.ndim) if i not in kept)
    amax = np.max(np.abs(a), axis=axes, keepdims=True) if axes else np.abs(a)
    s = (amax * F32(1 / FMAX[fmt])).astype(F32)
    s = np.where(np.isfinite(s) & (s > 0), s, F32(1)).astype(F32)
    v = np.clip(a / s, -FMAX[fmt], FMAX[fmt]).astype(F32)
    q = np.round(v) if fmt == "int8" else v.astype(NP_FORMAT[fmt]).astype(F32)
    return q.astype(F32), s


class Case(NamedTuple):
    """One op: shapes, the jaxlinear call, the plain op, the axes each product keeps."""

    x_shape: tuple
    w_shape: tuple
    call: object  # (x, w, quant, dual) -> y
    plain: object  # (x, w) -> y, plain lax/jnp
    kept: dict  # product -> (lhs kept axes, rhs kept axes), as the docs state them


def _corr(x, w, *, preferred_element_type=None):  # a bilinear_op of the user's (no scale_axes)
    n, t = x.shape[0] - w.shape[0] + 1, preferred_element_type
    return sum(x[k : k + n].astype(t) * w[k].astype(t) for k in range(w.shape[0]))


def _corr_tx(g, w, x_aval, *, preferred_element_type=None):
    return jnp.convolve(g, w, mode="full", preferred_element_type=preferred_element_type)


def _corr_tw(g, x, w_aval, *, preferred_element_type=None):
    return jnp.correlate(x, g, mode="valid", preferred_element_type=preferred_element_type)


CORR = jaxlinear.bilinear_op("test_quant_corr", _corr, _corr_tx, _corr_tw)
NHWC = ("NHWC", "HWIO", "NHWC")
DG = (((2,), (1,)), ((0,), (0,)))


def _conv_call(**kw):
    def call(x, w, q, dual):
        f = jaxlinear.dual_conv if dual else jaxlinear.conv
        return f(jaxlinear.Params(w, None), x, quant=q, **kw)

    return call


CASES = {
    "dense": Case(
        (4, 3, 8),
        (8, 5),
        lambda x, w, q, dual: (jaxlinear.dual_linear if dual else jaxlinear.linear)(
            jaxlinear.Params(w, None), x, quant=q
        ),
        lambda x, w: x @ w,
        {"forward": ((0, 1), (1,)), "grad_x": ((0, 1), (0,)), "grad_w": ((2,), (2,))},
    ),
    "dot_general_batch": Case(
        (2, 4, 6),
        (2, 6, 3),
        lambda x, w, q, dual: (jaxlinear.dual_dot_general if dual else jaxlinear.dot_general)(
            x, w, DG, quant=q
        ),
        lambda x, w: lax.dot_general(x, w, DG),
        {"forward": ((0, 1), (0, 2)), "grad_x": ((0, 1), (0, 1)), "grad_w": ((0, 2), (0, 2))},
    ),
    "einsum": Case(
        (2, 3, 8),
        (8, 2, 4),
        lambda x, w, q, dual: (jaxlinear.dual_einsum if dual else jaxlinear.einsum)(
            "btd,dhk->bthk", x, w, quant=q
        ),
        lambda x, w: jnp.einsum("btd,dhk->bthk", x, w),
        {"forward": ((0, 1), (1, 2)), "grad_x": ((0, 1), (0,)), "grad_w": ((2, 3), (2,))},
    ),
    "conv_strided_dilated": Case(
        (2, 9, 9, 4),
        (3, 3, 4, 6),
        _conv_call(strides=2, dilation=(1, 2), padding=((1, 2), (2, 1))),
        lambda x, w: lax.conv_general_dilated(
            x, w, (2, 2), ((1, 2), (2, 1)), rhs_dilation=(1, 2), dimension_numbers=NHWC
        ),
        {"forward": ((0,), (3,)), "grad_x": ((0,), (2,)), "grad_w": ((3,), (3,))},
    ),
    "conv_groups": Case(
        (2, 6, 6, 4),
        (3, 3, 2, 6),
        _conv_call(padding="VALID"),
        lambda x, w: lax.conv_general_dilated(
            x, w, (1, 1), "VALID", dimension_numbers=NHWC, feature_group_count=2
        ),
        # the grouped in-feature axis is per tensor
        {"forward": ((0,), (3,)), "grad_x": ((0,), ()), "grad_w": ((3,), ())},
    ),
    "conv_transpose": Case(
        (2, 4, 4, 3),
        (3, 3, 3, 4),
        lambda x, w, q, dual: (jaxlinear.dual_conv_transpose if dual else jaxlinear.conv_transpose)(
            x, w, (2, 2), "SAME", quant=q
        ),
        lambda x, w: lax.conv_transpose(x, w, (2, 2), "SAME", dimension_numbers=NHWC),
        {"forward": ((0,), (3,)), "grad_x": ((0,), (2,)), "grad_w": ((3,), (3,))},
    ),
    "conv_transpose_kernel": Case(  # transpose_kernel: w read as (kH, kW, O, I), flipped
        (2, 4, 4, 3),
        (3, 3, 4, 3),
        lambda x, w, q, dual: jaxlinear.conv_transpose(
            x, w, (2, 1), "VALID", transpose_kernel=True, quant=q
        ),
        lambda x, w: lax.conv_transpose(
            x, w, (2, 1), "VALID", dimension_numbers=NHWC, transpose_kernel=True
        ),
        {"forward": ((0,), (2,)), "grad_x": ((0,), (3,)), "grad_w": ((3,), (3,))},
    ),
    "bilinear_op_user": Case(  # no scale_axes rule: every scale per tensor
        (12,),
        (3,),
        lambda x, w, q, dual: (CORR.dual if dual else CORR.custom_vjp)(x, w, quant=q),
        lambda x, w: jnp.correlate(x, w, mode="valid"),
        {"forward": ((), ()), "grad_x": ((), ()), "grad_w": ((), ())},
    ),
}


def _operands(case, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    x = np.asarray(jax.random.normal(k[0], case.x_shape), F32)
    w = np.asarray(jax.random.normal(k[1], case.w_shape), F32)
    y_shape = jax.eval_shape(case.plain, x, w).shape
    c = np.asarray(jax.random.normal(k[2], y_shape), F32)
    return x, w, c


@functools.cache
def _under_test(name, recipe, dual):
    case = CASES[name]

    @jax.jit
    def run(x, w, c):
        y, vjp = jax.vjp(lambda x, w: case.call(x, w, recipe, dual), x, w)
        return (y, *vjp(c))

    return run


@functools.cache
def _plain_products(name):
    """The three products of the plain op in float64, each ``(a, b) -> result`` jitted
    (one compilation per product and case): ``y = B(x, w)``, and ``x̄``, ``w̄`` from JAX's
    own AD of the plain op (``grad_x(g, w)``, ``grad_w(g, x)``)."""
    case = CASES[name]
    x_aval = jax.ShapeDtypeStruct(case.x_shape, jnp.float64)
    w_aval = jax.ShapeDtypeStruct(case.w_shape, jnp.float64)

    def grad_x(g, w):
        return jax.linear_transpose(lambda x: case.plain(x, w), x_aval)(g)[0]

    def grad_w(g, x):
        return jax.linear_transpose(lambda w: case.plain(x, w), w_aval)(g)[0]

    return {"forward": jax.jit(case.plain), "grad_x": jax.jit(grad_x), "grad_w": jax.jit(grad_w)}


def _products(name, x, w, c):
    """``product -> (f64 function, lhs, rhs)`` at this case's operands."""
    fns, args = _plain_products(name), {"forward": (x, w), "grad_x": (c, w), "grad_w": (c, x)}
    return {k: (fns[k], *(np.asarray(a, np.float64) for a in args[k])) for k in fns}


ALL = [(n, r) for n in CASES if n != "conv_transpose_kernel" for r in RECIPES]


@pytest.mark.parametrize(("name", "recipe"), [*ALL, ("conv_transpose_kernel", "int8")])
def test_products_match_reference_and_bound(name, recipe):
    """Forward, x̄ and w̄ of ``op(..., quant=recipe)`` against (1) the plain op on the
    operands quantized here and (2) the recipe's error bound around float64 AD."""
    case = CASES[name]
    x, w, c = _operands(case)
    products = ("forward", "grad_x", "grad_w")
    got = dict(zip(products, _under_test(name, recipe, False)(x, w, c), strict=True))
    for product, (fn, a, b) in _products(name, x, w, c).items():
        (fa, axis_a), (fb, axis_b) = RECIPES[recipe][product]
        ka, kb = case.kept[product]
        qa, sa = ref_quantize(a, fa, ka if axis_a else ())
        qb, sb = ref_quantize(b, fb, kb if axis_b else ())
        da, db = qa.astype(np.float64) * sa, qb.astype(np.float64) * sb  # dequantized
        value = np.asarray(got[product], np.float64)
        assert got[product].dtype == np.float32, product
        # (1) the quantize-dequantize reference, up to float32 accumulation
        ref, size = np.asarray(fn(da, db)), np.asarray(fn(np.abs(da), np.abs(db)))
        np.testing.assert_array_less(np.abs(value - ref), 1e-5 * size + 1e-30, err_msg=product)
        # (2) within the recipe's bound of the exact product
        ea = U[fa] * np.abs(a) + DELTA[fa] * sa
        eb = U[fb] * np.abs(b) + DELTA[fb] * sb
        bound = np.asarray(fn(ea, np.abs(b)) + fn(np.abs(a), eb) + fn(ea, eb))
        exact = np.asarray(fn(a, b))
        np.testing.assert_array_less(
            np.abs(value - exact), bound + 1e-5 * size + 1e-30, err_msg=product
        )


DUAL = [  # every recipe on dense; one per op elsewhere (the code path is shared)
    *(("dense", r) for r in RECIPES),
    ("conv_strided_dilated", "int8"),
    ("einsum", "fp8_rowwise"),
    ("dot_general_batch", "int8"),
    ("conv_transpose", "fp8_rowwise"),
    ("bilinear_op_user", "fp8_hybrid"),
]


@pytest.mark.parametrize(("name", "recipe"), DUAL)
def test_dual_binding_follows_the_recipe(name, recipe):
    """``dual``: the same y, x̄, w̄ as ``custom_vjp`` (bit for bit); its JVP is the recipe's
    forward product of each tangent (``jvp(f)(x; ẋ) = f(ẋ, w)`` for a bilinear f)."""
    case = CASES[name]
    x, w, c = _operands(case)
    a = _under_test(name, recipe, False)(x, w, c)
    b = _under_test(name, recipe, True)(x, w, c)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    dx = np.asarray(jax.random.normal(jax.random.key(7), x.shape), F32)

    @jax.jit
    def jvp(x, w, dx):  # (y, ẏ) and the forward product of the tangent, B(ẋ, w)
        f = functools.partial(case.call, w=w, q=recipe, dual=True)
        return (*jax.jvp(f, (x,), (dx,)), f(dx))

    y, ydot, b_dx = jvp(x, w, dx)
    np.testing.assert_array_equal(y, a[0])
    np.testing.assert_array_equal(ydot, b_dx)


def test_int8_dense_bit_for_bit():
    """int8 × int8 → int32 is exact, so the forward is the float32 reference bit for bit:
    ``f32(q_x q_w) · (s_x ⊗ s_w)``."""
    case = CASES["dense"]
    x, w, c = _operands(case)
    y = np.asarray(_under_test("dense", "int8", False)(x, w, c)[0])
    qx, sx = ref_quantize(x, "int8", (0, 1))  # per row
    qw, sw = ref_quantize(w, "int8", (1,))  # per output channel
    exact = np.einsum("btd,dk->btk", qx.astype(np.int64), qw.astype(np.int64)).astype(F32)
    np.testing.assert_array_equal(y, exact * (sx * sw))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "int8"])
def test_quantize_matches_numpy_rounding(fmt):
    """The quantizer itself, bit for bit against ml_dtypes / np.round (ties to even),
    including values at ties, at the top of the range and in the subnormals."""
    a = np.concatenate(
        [
            np.asarray(jax.random.normal(jax.random.key(1), (64,)), F32) * 3,
            np.array([0.0, -0.0, 2.5, -3.5, 1e-7, -1e-12, 100.0], F32),
        ]
    ).reshape(1, -1)
    q, s = jax.jit(lambda a: quant.quantize_operand(a, quant.Operand(fmt, "axis"), (0,)))(a)
    qr, sr = ref_quantize(a, fmt, (0,))
    np.testing.assert_array_equal(np.asarray(s), sr)
    np.testing.assert_array_equal(np.asarray(q, F32), qr)
    assert q.dtype == quant.FORMATS[fmt]


def test_scales_never_zero_or_inf():
    """All-zero operands (per tensor and per row), inf and tiny values: scales stay finite
    and positive; an all-zero layer gives zeros, with zero gradients, in every recipe."""
    z = jnp.zeros((3, 4), jnp.float32)
    odd = jnp.array([[0.0, 0.0], [jnp.inf, 1.0], [1e-44, 0.0]], jnp.float32)
    for fmt in ("e4m3", "e5m2", "int8"):
        for a in (z, odd):
            for axes in (None, (1,)):
                s = np.asarray(quant.scale(a, fmt, axes))
                assert np.all(np.isfinite(s)) and np.all(s > 0), (fmt, s)

    @jax.jit
    def zero_grads(x, W, k):
        out = []
        for r in RECIPES:

            def f(x, W, r=r):
                return jnp.sum(jaxlinear.linear(jaxlinear.Params(W, None), x, quant=r))

            out += [f(x, W), *jax.grad(f, (0, 1))(x, W)]

        def h(x, k):  # the scales are the same code for every op: one convolution
            return jnp.sum(jaxlinear.conv(jaxlinear.Params(k, None), x, quant="fp8_rowwise"))

        return [*out, h(x[None, :, :, None], k), *jax.grad(h, (0, 1))(x[None, :, :, None], k)]

    for v in zero_grads(z, jnp.zeros((4, 2), jnp.float32), jnp.zeros((2, 2, 1, 3), jnp.float32)):
        assert np.all(np.asarray(v) == 0), v


def test_vmap_keeps_rows():
    """Under ``vmap`` (the vmapped axis folds into the rows), per-row scales are those of
    the stacked call: ``vmap(linear)(xs)`` equals ``linear`` on the stacked rows."""
    x, w, _ = _operands(CASES["dense"])
    p = jaxlinear.Params(w, None)
    f = functools.partial(jaxlinear.dual_linear, quant="int8")
    got = jax.jit(jax.vmap(lambda x: f(p, x)))(x)
    np.testing.assert_array_equal(got, jax.jit(lambda x: f(p, x))(x))


def test_training_step_traces_once():
    """A jitted step of a conv + dense model with ``quant="int8"`` traces once."""
    traces = []
    k = jax.random.split(jax.random.key(0), 2)
    params = {
        "conv": jaxlinear.init_conv(k[0], (3, 3), 1, 4),
        "dense": jaxlinear.init(k[1], 4 * 6 * 6, 3),
    }

    @jax.jit
    def step(params, x, y):
        traces.append(1)

        def loss(p):
            h = jax.nn.relu(jaxlinear.conv(p["conv"], x, strides=1, quant="int8"))
            out = jaxlinear.linear(p["dense"], h.reshape(x.shape[0], -1), quant="int8")
            return jnp.mean((out - y) ** 2)

        l, g = jax.value_and_grad(loss)(params)
        return l, jax.tree.map(lambda p, g: p - 0.1 * g, params, g)

    x = jnp.ones((2, 6, 6, 1), jnp.float32)
    y = jnp.zeros((2, 3), jnp.float32)
    losses = []
    for _ in range(3):
        l, params = step(params, x, y)
        losses.append(float(l))
    assert len(traces) == 1
    assert losses[-1] < losses[0]


def test_recipe_errors():
    x, w = jnp.ones((2, 3), jnp.float32), jnp.ones((3, 4), jnp.float32)
    with pytest.raises(ValueError, match=r"linear: `quant` must be None, a jaxlinear.Recipe"):
        jaxlinear.linear(jaxlinear.Params(w, None), x, quant="fp4")
    with pytest.raises(ValueError, match=r"Recipe: `forward.lhs.format` must be one of"):
        jaxlinear.Recipe.make(
            forward=("e3m4", "e4m3"), grad_x=("e4m3", "e4m3"), grad_w=("e4m3", "e4m3")
        )
    with pytest.raises(ValueError, match=r"`grad_w.accumulation` 'int32' needs two int8"):
        jaxlinear.Recipe.make(
            forward=("int8", "int8"), grad_x=("int8", "int8"), grad_w=("e4m3", "int8", "int32")
        )


def test_custom_recipe_mixed_formats():
    """A custom recipe: e4m3 × e5m2 on a convolution (``lax`` refuses two dtypes; both go
    through bfloat16, exactly) and a bfloat16 weight gradient (no scale)."""
    r = jaxlinear.Recipe.make(
        forward=(("e4m3", "axis"), ("e5m2", "axis")),
        grad_x=("e5m2", "e4m3"),
        grad_w=("bfloat16", "bfloat16"),
    )
    case = CASES["conv_strided_dilated"]
    x, w, c = _operands(case)
    y, _, dw = _under_test("conv_strided_dilated", r, False)(x, w, c)
    qx, sx = ref_quantize(x, "e4m3", (0,))
    qw, sw = ref_quantize(w, "e5m2", (3,))
    dx, dw_ = qx.astype(np.float64) * sx, qw.astype(np.float64) * sw  # dequantized
    fwd = _plain_products("conv_strided_dilated")["forward"]
    ref, size = np.asarray(fwd(dx, dw_)), np.asarray(fwd(np.abs(dx), np.abs(dw_)))
    np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - ref), 1e-5 * size + 1e-30)
    exact_dw = _plain_products("conv_strided_dilated")["grad_w"](*(np.float64(a) for a in (c, x)))
    np.testing.assert_allclose(dw, exact_dw, rtol=0.05, atol=0.05 * np.abs(exact_dw).max())


def test_nnx_explicit_quant_per_layer():
    """``jaxlinear.nnx.explicit(model, quant=...)``: a function of the path keeps the
    first layer in full precision; the quantized layer equals the functional op with the
    same recipe, bit for bit, under ``nnx.jit``; ``report`` names the recipe."""
    nnx = pytest.importorskip("flax.nnx")
    import jaxlinear.nnx

    rngs = nnx.Rngs(0)
    model = nnx.Sequential(
        nnx.Linear(8, 6, rngs=rngs, param_dtype=jnp.float32),
        nnx.Linear(6, 3, rngs=rngs, param_dtype=jnp.float32),
    )
    jaxlinear.nnx.explicit(model, quant=lambda path, m: None if path == "layers.0" else "int8")
    runs = {r.path: r.runs for r in jaxlinear.nnx.report(model)}
    assert runs == {
        "layers.0": "jaxlinear.dot_general",
        "layers.1": "jaxlinear.dot_general (quant=int8)",
    }
    x = np.asarray(jax.random.normal(jax.random.key(3), (5, 8)), F32)
    got = nnx.jit(lambda m, x: m(x))(model, x)
    a, b = model.layers[0], model.layers[1]

    @jax.jit
    def by_hand(x):
        h = x @ a.kernel[...] + a.bias[...][None]
        return jaxlinear.linear(jaxlinear.Params(b.kernel[...], b.bias[...]), h, quant="int8")

    np.testing.assert_array_equal(got, by_hand(x))


def test_equinox_explicit_quant_per_layer():
    """``jaxlinear.equinox.explicit(model, quant=...)`` under ``vmap`` (rows = examples):
    the last layer kept in full precision, the others as ``linear(..., quant)``."""
    eqx = pytest.importorskip("equinox")
    import jaxlinear.equinox

    mlp = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(0))
    new = jaxlinear.equinox.explicit(
        mlp, quant=lambda path, layer: None if path == ".layers[1]" else "fp8_rowwise"
    )
    runs = [r.runs for r in jaxlinear.equinox.report(new).rows]
    assert runs == [
        "jaxlinear.linear (custom_vjp, quant=fp8_rowwise) on weight.T",
        "jaxlinear.linear (custom_vjp) on weight.T",
    ]
    x = np.asarray(jax.random.normal(jax.random.key(3), (5, 4)), F32)
    got = jax.jit(jax.vmap(new))(x)
    l0, l1 = mlp.layers

    @jax.jit
    def by_hand(x):
        p0 = jaxlinear.Params(l0.weight.T, l0.bias)
        h = jax.nn.relu(jaxlinear.linear(p0, x, quant="fp8_rowwise"))
        return h @ l1.weight.T + l1.bias[None]

    np.testing.assert_allclose(got, by_hand(x), rtol=1e-6, atol=1e-6)


def test_int8_accumulates_in_float32_where_int32_could_overflow():
    """``w̄ = Xᵀ G`` over 140,000 rows could exceed int32 (``127² · 140000 > 2³¹``): that
    product accumulates in float32 (traced only, no array of that size is made)."""
    p = jaxlinear.Params(jnp.ones((2, 3), jnp.float32), None)

    def loss(p, x):
        return jaxlinear.linear(p, x, quant="int8").sum()

    x = jax.ShapeDtypeStruct((140_000, 2), jnp.float32)
    eqns = jax.make_jaxpr(jax.grad(loss, (0, 1)))(p, x).jaxpr.eqns
    accs = [str(e.params["preferred_element_type"]) for e in eqns if "dot" in str(e.primitive)]
    assert sorted(accs) == ["float32", "int32", "int32"], accs  # w̄; y and x̄ (d ≤ 3 terms)


def test_complex_operands_are_refused():
    p = jaxlinear.Params(jnp.ones((2, 3), jnp.complex64), None)
    with pytest.raises(TypeError, match="quant: a recipe quantizes real floating operands"):
        jaxlinear.linear(p, jnp.ones((1, 2), jnp.complex64), quant="int8")
