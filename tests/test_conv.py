"""Convolutions: ``conv_general_dilated``/``conv`` against JAX's AD of ``lax.conv_general_dilated``.

The shared transform matrix (jvp, jacfwd, linear_transpose, vmap, jit, adjoint test, ...)
runs over the conv cases in ``tests/family_cases.py``; here: hypothesis over conv
configurations, the layer, mixed precision, Flax's ``nnx.Conv``, errors, ``init_conv``.
"""

from __future__ import annotations

import contextlib
import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlinear
from jaxlinear._src.ops import conv as conv_module
from tests.helpers import assert_trees_close

BINDINGS = [jaxlinear.conv_general_dilated, jaxlinear.dual_conv_general_dilated]
NHWC = ("NHWC", "HWIO", "NHWC")
# (lhs, rhs, out) layouts per rank: channels last, channels first, and a scrambled one.
SPATIAL = {1: "W", 2: "HW", 3: "DHW"}
LAYOUTS = {
    "last": lambda s: (f"N{s}C", f"{s}IO", f"N{s}C"),
    "first": lambda s: (f"NC{s}", f"OI{s}", f"NC{s}"),
    "mixed": lambda s: (f"C{s}N", f"I{s}O", f"N{s[::-1]}C"),
}


def _shape(spec, sizes):
    return tuple(sizes[c] for c in spec)


def _out_size(n, k, s, lo, hi, lhs_d, rhs_d):
    n_in = (n - 1) * lhs_d + 1 + lo + hi
    k_eff = (k - 1) * rhs_d + 1
    return (n_in - k_eff) // s + 1 if n_in >= k_eff else 0


@st.composite
def conv_configs(draw):
    rank = draw(st.integers(1, 3))
    spatial = SPATIAL[rank]
    dn = LAYOUTS[draw(st.sampled_from(sorted(LAYOUTS)))](spatial)
    fgc, bgc = draw(st.sampled_from([(1, 1), (2, 1), (1, 2)]))
    sizes = {"N": bgc * draw(st.integers(1, 2)), "O": fgc * bgc * draw(st.integers(1, 2))}
    sizes["I"] = draw(st.integers(1, 2))
    sizes["C"] = sizes["I"] * fgc
    strides, lhs_d, rhs_d, pads = [], [], [], []
    small = 3 if rank == 3 else 5
    for c in spatial:
        sizes[c] = draw(st.integers(2, small))
        strides.append(draw(st.integers(1, 3)))
        lhs_d.append(draw(st.integers(1, 2)))
        rhs_d.append(draw(st.integers(1, 2)))
        pads.append((draw(st.integers(-1, 2)), draw(st.integers(0, 3))))  # asymmetric
    kernel = {c: draw(st.integers(1, 3)) for c in spatial}
    padding = tuple(pads)
    if all(d == 1 for d in lhs_d) and draw(st.booleans()):
        padding = draw(st.sampled_from(["SAME", "VALID", "SAME_LOWER"]))
    x_shape = _shape(dn[0], sizes)
    w_shape = _shape(dn[1], {**sizes, **kernel})
    kw = dict(
        window_strides=tuple(strides),
        padding=padding,
        lhs_dilation=tuple(lhs_d),
        rhs_dilation=tuple(rhs_d),
        dimension_numbers=dn,
        feature_group_count=fgc,
        batch_group_count=bgc,
    )
    y_shape = jax.eval_shape(
        lambda x, w: lax.conv_general_dilated(x, w, **kw),
        jax.ShapeDtypeStruct(x_shape, jnp.float64),
        jax.ShapeDtypeStruct(w_shape, jnp.float64),
    ).shape
    if 0 in y_shape:  # nothing to compare; lax allows it, the draw is just uninformative
        kw["padding"] = tuple((k, k) for k in kernel.values())
        kw["lhs_dilation"] = None
    return x_shape, w_shape, kw


def _operands(x_shape, w_shape, seed=0):
    """Random float64 operands, drawn with NumPy (no compile per new shape)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(x_shape), rng.standard_normal(w_shape)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(conv_configs())
def test_matches_lax_autodiff_over_configurations(config):
    # Forward and the vjp in both operands, one compile per example (both sides in one jit).
    x_shape, w_shape, kw = config
    x, w = _operands(x_shape, w_shape)

    @jax.jit
    def both(x, w):
        ours, ref = (
            functools.partial(jaxlinear.conv_general_dilated, **kw),
            functools.partial(lax.conv_general_dilated, **kw),
        )
        y, pull = jax.vjp(ours, x, w)
        y_ref, pull_ref = jax.vjp(ref, x, w)
        g = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
        return (y, *pull(g)), (y_ref, *pull_ref(g))

    ours, ref = both(x, w)
    assert_trees_close(ours, ref)


# --- 0-D convolutions (no spatial axis): lax_test's testConvGeneralDilated0D, testGradConv0D ---


def test_zero_dimensional_matches_lax():
    # lhs (N, C), rhs (O, I) or (I, O): a matmul with groups, no spatial axis; feature and
    # batch groups as in lax_test. Both bindings: values and the vjp in both operands; the
    # dual's jvp in both. float64, against JAX's AD of lax.conv_general_dilated.
    configs = [(2, 1, "VALID", ("NC", "OI", "NC")),
               (1, 2, (), lax.ConvDimensionNumbers((0, 1), (1, 0), (0, 1)))]  # fmt: skip
    operands, kws = [], []
    for i, (bgc, fgc, padding, dn) in enumerate(configs):
        x, w = _operands((2 * bgc, 3 * fgc), (3, 2 * fgc * bgc), seed=i)
        operands.append((x, w.T if dn[1] == "OI" else w))
        kws.append(
            dict(window_strides=(), padding=padding, lhs_dilation=(), rhs_dilation=(),
                 dimension_numbers=dn, feature_group_count=fgc, batch_group_count=bgc)
        )  # fmt: skip

    def derivatives(f, x, w, kw, forward_mode):
        f = functools.partial(f, **kw)
        y, pull = jax.vjp(f, x, w)
        out = [y, pull(jnp.cos(y))]
        if forward_mode:
            out.append(jax.jvp(f, (x, w), (jnp.sin(x), jnp.sin(w)))[1])
        return out

    @jax.jit
    def run(operands):
        ours, refs, hand = [], [], []
        for (x, w), kw in zip(operands, kws, strict=True):
            for f, forward_mode in zip(BINDINGS, (False, True), strict=True):
                ours.append(derivatives(f, x, w, kw, forward_mode))
                refs.append(derivatives(lax.conv_general_dilated, x, w, kw, forward_mode))
        # testGradConv0D: ones (2, 5) and (5, 10) with g = ones pull back to 10s and 2s.
        dn = lax.ConvDimensionNumbers((0, 1), (1, 0), (0, 1))
        for f in BINDINGS:
            f0 = functools.partial(f, window_strides=(), padding=(), dimension_numbers=dn)
            y, pull = jax.vjp(f0, jnp.ones((2, 5)), jnp.ones((5, 10)))
            hand.append(pull(jnp.ones_like(y)))
        return ours, refs, hand

    ours, refs, hand = run(operands)
    assert_trees_close(ours, refs)
    assert_trees_close(hand, [(10 * jnp.ones((2, 5)), 2 * jnp.ones((5, 10)))] * 2)


@contextlib.contextmanager
def counting_transposes():
    """Record each call of the conv op's ``transpose_x`` / ``transpose_w`` (conv.py's)."""
    calls, op = [], conv_module.CONV
    originals = {name: getattr(op, name) for name in ("transpose_x", "transpose_w")}
    assert originals == {
        "transpose_x": conv_module.transpose_x,
        "transpose_w": conv_module.transpose_w,
    }

    def counting(name, f):
        def wrapped(*args, **kwargs):
            calls.append(name[-1])
            return f(*args, **kwargs)

        return wrapped

    for name, f in originals.items():
        setattr(op, name, counting(name, f))
    try:
        yield calls
    finally:
        for name, f in originals.items():
            setattr(op, name, f)


@pytest.mark.parametrize("f", [jaxlinear.conv_general_dilated, jaxlinear.dual_conv_general_dilated])
def test_transposes_are_the_explicit_rules(f):
    # grad runs conv.py's transpose_x and transpose_w, once each.
    x, w = _operands((1, 4, 2), (2, 2, 3))
    dn = ("NWC", "WIO", "NWC")
    with counting_transposes() as calls:
        jax.grad(lambda x, w: jnp.sum(f(x, w, (2,), "SAME", dimension_numbers=dn)), (0, 1))(x, w)
    assert sorted(calls) == ["w", "x"]


def test_grad_on_a_mesh_with_explicit_axes():
    # Shardings are types there: the transposes say where x̄ and w̄ live (like x and w).
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    x, w = _operands((2, 5, 5, 3), (3, 3, 3, 4))
    kw = dict(window_strides=(2, 1), padding=((1, 0), (0, 2)), dimension_numbers=NHWC)

    def grads(f, x, w):
        return jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w, **kw))), (0, 1))(x, w)

    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        ws = jax.device_put(w, NamedSharding(mesh, P()))
        run = jax.jit(lambda x, w: [grads(f, x, w) for f in [*BINDINGS, lax.conv_general_dilated]])
        *ours, ref = run(xs, ws)
        # A kernel not placed on the mesh (JAX's own rule refuses it): w̄ comes out replicated.
        ours_numpy_w = jax.jit(lambda x: [grads(f, x, w) for f in BINDINGS])(xs)
    assert jax.typeof(ours[0][0]).sharding.spec == P("data", None, None, None)  # x̄ like x
    assert_trees_close(ours, [ref, ref])
    assert_trees_close(ours_numpy_w, [ref, ref])


# --- the layer ---------------------------------------------------------------------------


def _layer_reference(params, x, strides, padding, dilation, groups):
    n = x.ndim - 2
    s = SPATIAL[n]
    y = lax.conv_general_dilated(
        x,
        params.W,
        (strides,) * n,
        padding,
        rhs_dilation=(dilation,) * n,
        dimension_numbers=(f"N{s}C", f"{s}IO", f"N{s}C"),
        feature_group_count=groups,
    )
    return y + jnp.broadcast_to(params.b, y.shape)


@pytest.mark.parametrize(
    "x_shape, kernel, c_out, strides, padding, dilation, groups",
    [
        ((1, 5, 4, 4), (3, 2), 6, 1, ((1, 0), (2, 1)), 2, 2),
        ((1, 3, 3, 3, 2), (2, 2, 2), 2, 1, "VALID", 1, 2),  # depthwise
    ],
    ids=["2d_pads_dil_groups", "3d_depthwise"],
)
def test_layer_matches_reference(x_shape, kernel, c_out, strides, padding, dilation, groups):
    x, W = _operands(x_shape, (*kernel, x_shape[-1] // groups, c_out))
    params = jaxlinear.Params(W, np.arange(c_out, dtype=np.float64))
    kw = dict(strides=strides, padding=padding, dilation=dilation, groups=groups)
    ref = functools.partial(_layer_reference, **kw)

    @jax.jit
    def run(params, x):
        loss = lambda f: lambda p, x: jnp.sum(jnp.sin(f(p, x)))  # noqa: E731
        ours = (
            jaxlinear.conv(params, x, **kw),
            jax.grad(loss(functools.partial(jaxlinear.conv, **kw)), (0, 1))(params, x),
            jax.jvp(
                lambda p, x: jaxlinear.dual_conv(p, x, **kw), (params, x), (params, jnp.sin(x))
            )[1],
        )
        refs = (
            ref(params, x),
            jax.grad(loss(ref), (0, 1))(params, x),
            jax.jvp(ref, (params, x), (params, jnp.sin(x)))[1],
        )
        return ours, refs

    ours, refs = run(params, x)
    assert_trees_close(ours, refs)


# Unit roundoff of bfloat16; bounds as derived for `linear` in tests/test_linear.py: inputs
# rounded to bf16 make each product off by at most 2u|x||w|, accumulation is float32, Y's
# final rounding adds u|Y|. A conv is a sum of products, so |x| ⋆ |W| replaces |X||W|.
U_BF16 = 2.0**-8


def test_bf16_compute_within_rounding_bounds():
    x, W = (a.astype(np.float32) for a in _operands((2, 5, 5, 4), (3, 3, 4, 5), seed=2))
    params = jaxlinear.Params(W, np.linspace(-1, 1, 5, dtype=np.float32))
    g = jnp.asarray(np.random.default_rng(4).standard_normal((2, 5, 5, 5)), jnp.bfloat16)
    kw = dict(strides=1, padding="SAME", dilation=1, groups=1)
    ref = functools.partial(_layer_reference, **kw)

    @jax.jit
    def run(params, x, g):
        y, pull = jax.vjp(
            lambda p, x: jaxlinear.conv(p, x, compute_dtype=jnp.bfloat16, **kw), params, x
        )
        y32 = jaxlinear.conv(params, x, precision="highest", **kw)
        f64 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float64), t)  # noqa: E731
        P, X, G = f64(params), f64(x), f64(g)
        Y, ref_pull = jax.vjp(ref, P, X)
        absP = jaxlinear.Params(jnp.abs(P.W), jnp.abs(P.b))
        Y_abs, abs_pull = jax.vjp(ref, absP, jnp.abs(X))  # |W| ⋆ |x| + |b| and its pullback
        return (y, *pull(g), y32), (Y, *ref_pull(G)), (Y_abs, *abs_pull(jnp.abs(G)))

    (y, dparams, dx, y32), (Y, dP, dX), (Y_abs, dP_abs, dX_abs) = run(params, x, g)
    assert y.dtype == jnp.bfloat16
    assert dx.dtype == dparams.W.dtype == dparams.b.dtype == jnp.float32

    def within(a, ref, bound):
        return bool(np.all(np.abs(np.asarray(a, np.float64) - ref) <= bound))

    assert within(y, Y, 4 * U_BF16 * Y_abs)
    assert within(dx, dX, 3 * U_BF16 * dX_abs)
    assert within(dparams.W, dP.W, 3 * U_BF16 * dP_abs.W)
    assert within(dparams.b, dP.b, 3 * U_BF16 * dP_abs.b)
    # ... and the bound is not vacuous: float32 compute is far inside it.
    assert np.max(np.abs(np.asarray(y32, np.float64) - Y) / (4 * U_BF16 * Y_abs)) < 0.01


def test_flax_conv_drop_in():
    nnx = pytest.importorskip("flax.nnx")
    kw = dict(strides=(2, 1), padding=((1, 0), (0, 1)), kernel_dilation=(1, 2),
              feature_group_count=2, param_dtype=jnp.float64)  # fmt: skip
    flax_conv = nnx.Conv(4, 6, (3, 2), rngs=nnx.Rngs(0), **kw)
    ours = nnx.Conv(
        4, 6, (3, 2), rngs=nnx.Rngs(0), conv_general_dilated=jaxlinear.conv_general_dilated, **kw
    )
    x = np.random.default_rng(5).standard_normal((2, 5, 4, 4))

    @jax.jit
    def loss_and_grads(module, x):
        return nnx.value_and_grad(lambda m, x: jnp.sum(jnp.sin(m(x))), argnums=(0, 1))(module, x)

    (value, (g_module, g_x)) = loss_and_grads(ours, x)
    (ref_value, (ref_module, ref_x)) = loss_and_grads(flax_conv, x)
    assert_trees_close((value, g_x), (ref_value, ref_x))
    assert_trees_close(nnx.state(g_module, nnx.Param), nnx.state(ref_module, nnx.Param))
    # ... and Flax's module ran our transposes.
    with counting_transposes() as calls:
        jax.make_jaxpr(lambda x: jax.grad(lambda x: jnp.sum(ours(x)))(x))(x)
    assert sorted(calls) == ["w", "x"]  # the custom_vjp asks for both; XLA drops w̄


# --- errors: one check per mistake -------------------------------------------------------

X4 = jnp.ones((2, 5, 5, 4), jnp.float32)
W4 = jnp.ones((3, 3, 4, 6), jnp.float32)
LAX_ERRORS = [
    # (lhs, rhs, kwargs, error, message)
    (X4, jnp.ones((3, 4, 6)), {}, ValueError, r"`rhs` must have rank 4 like `lhs`"),
    (X4[0, 0, 0], jnp.ones((4,)), {}, ValueError, r"`lhs` must have a batch and a feature axis"),
    (X4, jnp.ones((3, 3, 3, 6)), {}, ValueError,
     r"`rhs` \(shape \(3, 3, 3, 6\)\) takes 3 input channels per group × 1 group\(s\) = 3,"
     r" but `lhs` has 4"),
    (X4, jnp.ones((3, 3, 2, 6)), {"feature_group_count": 3}, ValueError,
     r"`lhs` has 4 input channels .* not divisible by `feature_group_count`=3"),
    (X4, jnp.ones((3, 3, 2, 5)), {"feature_group_count": 2}, ValueError,
     r"`rhs` has 5 output channels .* not divisible by `feature_group_count`=2"),
    (jnp.ones((3, 5, 5, 4)), W4, {"batch_group_count": 2}, ValueError,
     r"`lhs` has batch size 3 .* not divisible by `batch_group_count`=2"),
    (X4, W4, {"feature_group_count": 0}, ValueError,
     r"`feature_group_count` must be a positive int, got 0"),
    (X4, jnp.ones((3, 3, 2, 6)), {"feature_group_count": 2, "batch_group_count": 2}, ValueError,
     r"at most one of `feature_group_count` \(2\) and `batch_group_count` \(2\)"),
    (X4, W4, {"window_strides": (1,)}, ValueError,
     r"`window_strides` must be a sequence of 2 positive ints .* got \(1,\)"),
    (X4, W4, {"window_strides": (1, 0)}, ValueError, r"`window_strides` must be .* got \(1, 0\)"),
    (X4, W4, {"rhs_dilation": (1, -2)}, ValueError, r"`rhs_dilation` must be a sequence of 2"),
    (X4, W4, {"lhs_dilation": (2,)}, ValueError, r"`lhs_dilation` must be a sequence of 2"),
    (X4, W4, {"padding": "FULL"}, ValueError, r"`padding` must be one of \('SAME', 'VALID'"),
    (X4, W4, {"padding": ((1, 1),)}, ValueError, r"or 2 \(lo, hi\) int pairs .* got \(\(1, 1\),\)"),
    (X4, W4, {"padding": ((1, 1), (1,))}, ValueError, r"`padding` must be one of"),
    (X4, W4, {"padding": "SAME", "lhs_dilation": (2, 1)}, ValueError,
     r"`padding`='SAME' is not defined with `lhs_dilation`=\(2, 1\)"),
    (X4, W4, {"dimension_numbers": "NHWC"}, ValueError,
     r"`dimension_numbers` must be None, a lax.ConvDimensionNumbers or three strings"),
    (X4, W4, {"dimension_numbers": ("NHWC", "HWIO", "NHW")}, ValueError,
     r"out string 'NHW' has 3 letters but the operands have 4 axes"),
    (X4, W4, {"dimension_numbers": ("NHWC", "HWOO", "NHWC")}, ValueError,
     r"rhs string 'HWOO' must name each axis once, with 'O' and 'I' exactly once"),
    (X4, W4, {"dimension_numbers": ("NHWC", "HXIO", "NHWC")}, ValueError,
     r"must share the same spatial letters"),
    (X4, W4, {"dimension_numbers": lax.ConvDimensionNumbers((0, 3, 1, 1), (3, 2, 0, 1),
                                                            (0, 3, 1, 2))}, ValueError,
     r"`dimension_numbers.lhs_spec` must be a permutation of the 4 axes"),
    (X4.astype(jnp.int32), W4, {}, TypeError, r"`lhs` has dtype int32; expected a floating"),
    (X4, W4.astype(jnp.complex64), {}, TypeError,
     r"complex and real operands do not mix \(`lhs` float32, `rhs` complex64\)"),
    (X4, W4, {"out_sharding": "x"}, NotImplementedError, r"`out_sharding` must be None"),
]  # fmt: skip


@pytest.mark.parametrize("f", [jaxlinear.conv_general_dilated, jaxlinear.dual_conv_general_dilated])
@pytest.mark.parametrize("lhs, rhs, kwargs, error, match", LAX_ERRORS)
def test_lax_signature_errors(f, lhs, rhs, kwargs, error, match):
    kwargs = {"window_strides": (1, 1), "padding": "SAME", "dimension_numbers": NHWC, **kwargs}
    with pytest.raises(error, match=f"^{f.__name__}: .*{match}"):
        jax.eval_shape(lambda: f(lhs, rhs, **kwargs))


P2 = jaxlinear.Params(jnp.ones((3, 3, 4, 6), jnp.float32), jnp.zeros((6,), jnp.float32))
LAYER_ERRORS = [
    (P2, jnp.ones((5, 5, 4)), {}, ValueError,
     r"`x` \(shape \(5, 5, 4\)\) has no batch axis: expected x: \(N, \*spatial, C_in\),"
     r" W: \(\*kernel, C_in/groups, C_out\), with 2 spatial axes .* pass x\[None\]"),
    (P2, jnp.ones((2, 1, 5, 5, 4)), {}, ValueError,
     r"`x` must have rank 4 for `W` of shape \(3, 3, 4, 6\) \(2 kernel axes\): expected x: \(N,"),
    (P2._replace(W=jnp.ones((4, 6))), X4, {}, ValueError,
     r"`W` must be \(\*kernel, C_in/groups, C_out\) with 1 to 3 kernel axes, got shape \(4, 6\)"),
    (P2, jnp.ones((2, 5, 5, 3)), {}, ValueError,
     r"do not fit the channels-last layouts x: \(N, \*spatial, C_in\), W: \(\*kernel, C_in/groups,"
     r" C_out\): C_in=3 is not a multiple of `W`'s 4 input channels per group"),
    # NCHW input, PyTorch OIHW kernels (a 3×3 one, and a 1×1 one whose sizes fit with the
    # wrong groups): the message names the layouts and the conversion.
    (P2, jnp.ones((2, 4, 5, 5)), {}, ValueError,
     r"C_in=5 is not a multiple .*; if `x` is channels-first \(N, C_in, \*spatial\), use"
     r" x.transpose\(0, 2, 3, 1\)(?!; if)"),
    (P2._replace(W=jnp.ones((6, 4, 3, 3))), X4, {}, ValueError,
     r"W: \(\*kernel, C_in/groups, C_out\): C_in=4 is not a multiple of `W`'s 3 input channels"
     r" per group; if `W` is PyTorch's \(C_out, C_in/groups, \*kernel\) layout, use"
     r" W = w_torch.transpose\(2, 3, 1, 0\)(?!; if)"),
    (P2._replace(W=jnp.ones((6, 4, 1, 1))), X4, {}, ValueError,
     r"C_in=4 over `W`'s 1 input channels per group gives groups=4, which does not divide `W`'s"
     r" C_out=1; .* W = w_torch.transpose\(2, 3, 1, 0\)"),
    (P2, jnp.ones((2, 5, 5, 8)), {"groups": 1}, ValueError,
     r"`W` \(shape \(3, 3, 4, 6\)\) takes 4 input channels per group × 1 group\(s\) = 4, but `x`"
     r" has 8"),
    (P2, X4, {"dilation": 2, "kernel_dilation": 2}, TypeError,
     r"pass `dilation` or its Flax name `kernel_dilation`, not both"),
    (P2, X4, {"groups": 1, "feature_group_count": 1}, TypeError,
     r"pass `groups` or its Flax name `feature_group_count`, not both"),
    (P2, X4, {"padding": (1,)}, ValueError,
     r"`padding` must be one of .*, an int p \(p on both sides of every spatial axis, as in Flax\)"
     r" or 2 entries .* got \(1,\)"),
    (P2, X4, {"padding": (1, (0, 1, 2))}, ValueError, r"each an int or a \(lo, hi\) pair"),
    (P2, X4, {"groups": 3}, ValueError, r"not divisible by `groups`=3"),
    (P2, X4, {"strides": 0}, ValueError, r"`strides` must be a sequence of 2 positive ints.*got 0"),
    (P2, X4, {"dilation": (1, 2, 3)}, ValueError, r"`dilation` must be a sequence of 2"),
    (P2, X4, {"padding": "full"}, ValueError, r"`padding` must be one of"),
    (P2._replace(b=jnp.zeros((5,))), X4, {}, ValueError, r"`b` must have shape \(6,\)"),
    (P2._replace(b=jnp.zeros((6,), jnp.complex64)), X4, {}, TypeError,
     r"complex and real operands do not mix \(`x` float32, `W` float32, `b` complex64\)"),
    (P2, X4, {"compute_dtype": jnp.int8}, TypeError, r"`compute_dtype` must be a real floating"),
    ({"W": P2.W, "bias": P2.b}, X4, {}, TypeError, r"got a dict with keys \['W', 'bias'\]"),
]  # fmt: skip


@pytest.mark.parametrize("f", [jaxlinear.conv, jaxlinear.dual_conv])
@pytest.mark.parametrize("params, x, kwargs, error, match", LAYER_ERRORS)
def test_layer_errors(f, params, x, kwargs, error, match):
    with pytest.raises(error, match=f"^{f.__name__}: .*{match}"):
        jax.eval_shape(lambda: f(params, x, **kwargs))


def test_groups_from_the_shapes_and_flax_argument_forms():
    # init_conv(..., groups=2) then conv(p, x): groups follow from the shapes (shapes only).
    p = jax.eval_shape(lambda k: jaxlinear.init_conv(k, (3, 3), 4, 6, groups=2), jax.random.key(0))
    x = jax.ShapeDtypeStruct((2, 5, 5, 4), jnp.float32)
    for f in (jaxlinear.conv, jaxlinear.dual_conv):
        assert jax.eval_shape(f, p, x).shape == (2, 5, 5, 6)
    # Flax's int padding, per-axis ints, kernel_dilation and feature_group_count mean what
    # they mean in Flax: values against lax's convolution (groups inferred, 2).
    x, W = _operands((1, 5, 4, 4), (3, 2, 2, 6))
    p = jaxlinear.Params(W, np.arange(6.0))
    dn = ("NHWC", "HWIO", "NHWC")
    forms = [  # (ours, lax's padding and rhs_dilation)
        (dict(padding=1, kernel_dilation=2), ((1, 1), (1, 1)), (2, 2)),
        (dict(padding=(2, (0, 1)), feature_group_count=2), ((2, 2), (0, 1)), (1, 1)),
    ]

    @jax.jit
    def run(p, x):
        ours = [jaxlinear.conv(p, x, **kw) for kw, _, _ in forms]
        refs = []
        for _, padding, dilation in forms:
            y = lax.conv_general_dilated(x, p.W, (1, 1), padding, rhs_dilation=dilation,
                                         dimension_numbers=dn, feature_group_count=2)  # fmt: skip
            refs.append(y + jnp.broadcast_to(p.b, y.shape))
        return ours, refs

    ours, refs = run(p, x)
    assert_trees_close(ours, refs)


def test_mixed_dtypes_with_compute_dtype_are_accepted():
    y = jaxlinear.conv(P2, X4.astype(jnp.bfloat16), compute_dtype=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 5, 5, 6)


# --- init_conv ---------------------------------------------------------------------------


def test_init_conv_fan_in():
    # lecun_normal: Var W = 1 / fan_in with fan_in = prod(kernel) · c_in / groups = 9·16/4.
    p = jaxlinear.init_conv(jax.random.key(0), (3, 3), 16, 64, groups=4, scheme="lecun_normal")
    assert p.W.shape == (3, 3, 4, 64) and p.b.shape == (64,) and not p.b.any()
    np.testing.assert_allclose(float(jnp.var(p.W)), 1 / 36, rtol=0.1)
    p = jax.eval_shape(  # shapes only: no compile
        lambda k: jaxlinear.init_conv(k, 5, 2, 3, bias=False, dtype=jnp.float64), jax.random.key(1)
    )
    assert p.W.shape == (5, 2, 3) and p.W.dtype == jnp.float64 and p.b is None


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (((3, 0), 4, 8), {}, r"`kernel_size` must be a sequence of positive ints"),
        (((3, 3), 4, 8), {"groups": 3}, r"`c_in`=4 is not divisible by `groups`=3"),
        (((3, 3), 4, 6), {"groups": 4}, r"`c_out`=6 is not divisible by `groups`=4"),
        (((3, 3), 0, 8), {}, r"`c_in` must be a positive int, got 0"),
        (((3, 3), 4, 8), {"scheme": "nope"}, r"`scheme` must be one of"),
    ],
)
def test_init_conv_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=f"^init_conv: {match}"):
        jaxlinear.init_conv(jax.random.key(0), *args, **kwargs)


def test_benchmark_smoke():
    # `python -m benchmarks.bench_family --only conv` runs: tiny shapes, every implementation.
    from benchmarks import bench_family

    rows = bench_family.bench_conv(smoke=True, flax=False)  # the Flax rows: test_flax_conv_*
    assert {row[2] for row in rows} == {
        "JAX AD (lax.conv_general_dilated)",
        "jaxlinear.conv_general_dilated",
        "jaxlinear.dual_conv_general_dilated",
    }
    assert all(float(row[3]) > 0 and row[5] == "3" for row in rows)  # 3 convolutions each
