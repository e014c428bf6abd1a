"""Every kind of bad input gets its own clear error at trace time; nothing broadcasts silently."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlinear

F32 = jnp.float32
W = jnp.ones((2, 5), F32)
B = jnp.zeros((5,), F32)
X = jnp.ones((4, 2), F32)

BINDINGS = [jaxlinear.linear, jaxlinear.dual_linear]


def _name(f):
    return f.__name__


CASES = [
    # (params, x, kwargs, error, message regex)
    (jaxlinear.Params(W, B), jnp.ones((4, 3), F32), {}, ValueError,
     r"`x` has last dim 3 \(shape \(4, 3\)\) but `W` expects d_in=2 \(shape \(2, 5\)\)"),
    (jaxlinear.Params(jnp.ones((2, 5, 1), F32), None), X, {}, ValueError,
     r"`W` must be 2-D \(d_in, d_out\), got shape \(2, 5, 1\)"),
    (jaxlinear.Params(jnp.ones(5, F32), None), X, {}, ValueError, r"`W` must be 2-D"),
    (jaxlinear.Params(W, jnp.zeros((4, 5), F32)), X, {}, ValueError,
     r"`b` has shape \(4, 5\) but must be \(5,\) or the row vector \(1, 5\).*not broadcast"),
    (jaxlinear.Params(W, jnp.zeros((1,), F32)), X, {}, ValueError, r"`b` has shape \(1,\)"),
    (jaxlinear.Params(W, jnp.zeros((5, 1), F32)), X, {}, ValueError, r"`b` has shape \(5, 1\)"),
    (jaxlinear.Params(W, jnp.float32(0.0)), X, {}, ValueError, r"`b` has shape \(\)"),
    (jaxlinear.Params(W, B), jnp.float32(1.0), {}, ValueError,
     r"`x` must have at least one axis .* got a 0-d array"),
    (jaxlinear.Params(W, B), jnp.ones((4, 2), jnp.int32), {}, TypeError,
     r"`x` has dtype int32; expected a floating"),
    (jaxlinear.Params(jnp.ones((2, 5), jnp.int32), None), X, {}, TypeError,
     r"`W` has dtype int32; expected a floating"),
    (jaxlinear.Params(W, B), jnp.ones((4, 2), bool), {}, TypeError, r"`x` has dtype bool"),
    (jaxlinear.Params(W, jnp.zeros(5, jnp.int32)), X, {}, TypeError, r"`b` has dtype int32"),
    (jaxlinear.Params(W, B), X.astype(jnp.complex64), {}, TypeError,
     r"complex and real operands do not mix \(`x` complex64, `W` float32, `b` float32\).*"
     r"astype\(jnp.complex64\)"),
    (jaxlinear.Params(W, B), [[1.0, 2.0]], {}, TypeError,
     r"`x` must be an array \(a jax.Array or numpy.ndarray\), got list"),
    (jaxlinear.Params(W, B), "x", {}, TypeError, r"`x` must be an array .* got str"),
    (jaxlinear.Params(W, B), None, {}, TypeError, r"`x` must be an array .* got NoneType"),
    (jaxlinear.Params([[1.0] * 5] * 2, B), X, {}, TypeError, r"`W` must be an array .* got list"),
    ({"b": B}, X, {}, TypeError, r"`params` must be Params\(W, b\), a dict \{'W': W, 'b': b\}"),
    ({"W": W, "bias": B}, X, {}, TypeError, r"got a dict with keys \['W', 'bias'\]"),
    (jaxlinear.Params(None, B), X, {}, TypeError, r"`params` has no `W`"),
    ((W, B, B), X, {}, TypeError, r"`params` is a tuple of 3 items; expected \(W, b\) or \(W,\)"),
    ([W, B], X, {}, TypeError, r"`params` is a list of 2 items; pass Params\(W, b\) or a tuple"),
    ("W", X, {}, TypeError, r"`params` must be Params\(W, b\), .* or a tuple \(W, b\); got str"),
    ({"weight": W.T, "bias": B}, X, {}, TypeError,
     r"looks like a PyTorch state dict \(`weight` of shape \(5, 2\) is \(out, in\); .*"
     r"convert with jaxlinear.from_torch\(state_dict\)"),
    ({"kernel": W, "bias": B, "scale": B}, X, {}, TypeError,
     r"looks like Flax parameters but has extra keys \['scale'\].*jaxlinear.from_flax"),
    (jaxlinear.Params(W, B), X, {"compute_dtype": jnp.int8}, TypeError,
     r"`compute_dtype` must be a real floating dtype"),
    (jaxlinear.Params(W, B), X, {"compute_dtype": "not a dtype"}, TypeError,
     r"`compute_dtype` must be a floating dtype"),
    (jaxlinear.Params(W.astype(jnp.complex64), B.astype(jnp.complex64)),
     X.astype(jnp.complex64), {"compute_dtype": jnp.bfloat16}, TypeError,
     r"`compute_dtype` is for real mixed precision; got complex"),
]  # fmt: skip


@pytest.mark.parametrize("f", BINDINGS, ids=_name)
@pytest.mark.parametrize("params, x, kwargs, error, match", CASES)
def test_error(f, params, x, kwargs, error, match):
    with pytest.raises(error, match=f"^{_name(f)}: .*{match}"):
        f(params, x, **kwargs)


@pytest.mark.parametrize("f", BINDINGS, ids=_name)
def test_errors_raise_at_trace_time_under_jit(f):
    params = jaxlinear.Params(W, jnp.zeros((4, 5), F32))  # per-example bias: refused
    with pytest.raises(ValueError, match="per-example bias is not broadcast"):
        jax.jit(f).trace(params, X)


@pytest.mark.parametrize("f", BINDINGS, ids=_name)
def test_row_bias_gradient_keeps_its_shape(f):
    params = {"W": W, "b": B.reshape(1, 5)}
    g = jax.grad(lambda p: f(p, X).sum())(params)
    assert g["b"].shape == (1, 5)
    assert jnp.array_equal(g["b"], jnp.full((1, 5), 4.0))


@pytest.mark.parametrize("f", BINDINGS, ids=_name)
def test_no_bias_dict_roundtrip(f):
    for params in ({"W": W}, {"W": W, "b": None}, jaxlinear.Params(W, None)):
        g = jax.grad(lambda p: f(p, X).sum())(params)
        assert jax.tree.structure(g) == jax.tree.structure(params)


def test_init_errors():
    with pytest.raises(ValueError, match=r"init: `scheme` must be one of .* got 'kaiming'"):
        jaxlinear.init(jax.random.key(0), 2, 3, scheme="kaiming")
    with pytest.raises(ValueError, match=r"init: `d_in` must be a positive int, got 0"):
        jaxlinear.init(jax.random.key(0), 0, 3)
    with pytest.raises(ValueError, match=r"init: `d_out` must be a positive int, got 2.5"):
        jaxlinear.init(jax.random.key(0), 2, 2.5)
    with pytest.raises(ValueError, match=r"init_mlp: `sizes` needs at least 2 entries"):
        jaxlinear.init_mlp(jax.random.key(0), [3])


@pytest.mark.parametrize("f", BINDINGS, ids=_name)
def test_weak_types_take_the_strong_dtype(f):
    # A weakly typed array (made from a Python float) is float64 here, but next to a
    # float32 W it computes in float32, as in x @ W + b; so it is accepted, not refused.
    x_weak, b_weak = jnp.full((4, 2), 0.5), jnp.full((5,), -1.0)
    assert x_weak.weak_type and x_weak.dtype == b_weak.dtype == jnp.float64
    for params, x in ((jaxlinear.Params(W, B), x_weak), (jaxlinear.Params(W, b_weak), X)):
        y = f(params, x)
        expected = x @ params.W + params.b[None]  # explicit: rank promotion is an error here
        assert y.dtype == expected.dtype == F32
        assert jnp.array_equal(y, expected)


def test_numpy_inputs_compute_in_their_own_dtype_with_x64_on():
    # NumPy float32 everywhere: float32 (no canonicalization needed); float64 everywhere: float64.
    for dtype in (np.float32, np.float64):
        params = jaxlinear.Params(np.ones((2, 5), dtype), np.zeros(5, dtype))
        y = jaxlinear.linear(params, np.ones((4, 2), dtype))
        assert isinstance(y, jax.Array) and y.dtype == dtype
        assert jnp.array_equal(y, jnp.full((4, 5), 2.0, dtype))
    dparams, dx = jaxlinear.pullback(params, np.ones((4, 2)), np.ones((4, 5)))
    assert dx.dtype == dparams.W.dtype == np.float64
    with pytest.raises(TypeError, match=r"^pullback: `g` has dtype float32 but `Y = "):
        jaxlinear.pullback(params, np.ones((4, 2)), np.ones((4, 5), np.float32))
