"""`jaxlinear.linear` and the public formulas against independent references."""

from __future__ import annotations

import re

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import example, given, settings
from jax.test_util import check_grads

import jaxlinear
from jaxlinear._src import formulas
from tests.helpers import assert_trees_close, eqns, make_layer, reference, saved_residuals

LEADS = {"1d": (), "2d": (5,), "3d": (2, 3), "4d": (2, 1, 3)}
BIASES = ("vector", "row", "none")
# (d_in, d_out): a square W too, where W and Wᵀ have the same shape and only values tell
# a missing transpose (see tests/test_transforms.py::test_square_W_catches_a_missing_transpose).
DIMS = {"4x3": (4, 3), "3x3": (3, 3)}


def _vjp_all(f, params, x, g):
    y, pull = jax.vjp(f, params, x)
    return y, pull(g)


# --- the worked example, by hand -------------------------------------------------------

X = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
W = [[2.0, 1.0], [-1.0, 3.0]]
B = [0.5, -2.0]


def test_worked_example_by_hand():
    params = jaxlinear.Params(jnp.array(W), jnp.array(B))
    x = jnp.array(X)
    y = jaxlinear.linear(params, x)
    np.testing.assert_array_equal(y, [[2.5, -1.0], [-0.5, 1.0], [1.5, 2.0]])
    dparams, dx = jax.grad(lambda p, x: jaxlinear.linear(p, x).sum(), argnums=(0, 1))(params, x)
    np.testing.assert_array_equal(dparams.W, [[2.0, 2.0], [2.0, 2.0]])
    np.testing.assert_array_equal(dx, [[3.0, 2.0], [3.0, 2.0], [3.0, 2.0]])
    np.testing.assert_array_equal(dparams.b, [3.0, 3.0])


# --- gradients equal JAX's own AD on the plain map, float64 ----------------------------


class LinearVsReference(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(lead=tuple(LEADS), bias=BIASES, kind=("params", "dict"))
    def test_value_and_vjp(self, lead, bias, kind):
        self._check_value_and_vjp(lead, bias, kind, "4x3")

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(lead=tuple(LEADS), bias=BIASES)
    def test_value_and_vjp_square_W(self, lead, bias):
        self._check_value_and_vjp(lead, bias, "params", "3x3")

    def _check_value_and_vjp(self, lead, bias, kind, dims):
        params, x = make_layer(jax.random.key(0), LEADS[lead], *DIMS[dims], bias=bias, kind=kind)
        g = jax.random.normal(jax.random.key(1), (*LEADS[lead], 3), jnp.float64)
        f = self.variant(jaxlinear.linear)
        y, (dparams, dx) = _vjp_all(f, params, x, g)
        y_ref, (dparams_ref, dx_ref) = _vjp_all(reference, params, x, g)
        chex.assert_shape(y, (*LEADS[lead], 3))
        assert_trees_close(y, y_ref)
        assert_trees_close(dx, dx_ref)
        assert_trees_close(dparams, dparams_ref)  # same structure as given: Params or dict
        assert type(dparams) is type(params)

    @chex.variants(with_jit=True, without_jit=True)
    def test_value_and_grad(self):
        params, x = make_layer(jax.random.key(2), (6,), 3, 2)

        def loss(f):
            return lambda p, x: jnp.sum(jnp.tanh(f(p, x)) ** 2)

        got = self.variant(jax.value_and_grad(loss(jaxlinear.linear), argnums=(0, 1)))(params, x)
        want = jax.value_and_grad(loss(reference), argnums=(0, 1))(params, x)
        assert_trees_close(got, want)


@settings(max_examples=12, deadline=None)  # derandomized: the profile in tests/conftest.py
@example(lead=[2, 3], d_in=3, d_out=3, bias="vector", kind="params", seed=0)  # square W
@example(lead=[], d_in=1, d_out=1, bias="row", kind="dict", seed=1)
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    d_in=st.integers(1, 5),
    d_out=st.integers(1, 5),
    bias=st.sampled_from(BIASES),
    kind=st.sampled_from(("params", "dict")),
    seed=st.integers(0, 2**16),
)
def test_vjp_property(lead, d_in, d_out, bias, kind, seed):
    params, x = make_layer(jax.random.key(seed), tuple(lead), d_in, d_out, bias=bias, kind=kind)
    rng = np.random.default_rng(seed)  # NumPy draws: no compile per new shape
    g = rng.standard_normal((*lead, d_out))
    vjp_all = jax.jit(_vjp_all, static_argnums=0)  # one compile per shape and function
    assert_trees_close(vjp_all(jaxlinear.linear, params, x, g), vjp_all(reference, params, x, g))


def test_empty_batch():
    params, x = make_layer(jax.random.key(3), (0,), 3, 2)
    g = jnp.zeros((0, 2))
    assert_trees_close(_vjp_all(jaxlinear.linear, params, x, g), _vjp_all(reference, params, x, g))


def test_check_grads_linear_and_mlp():
    params, x = make_layer(jax.random.key(4), (3, 2), 4, 3)
    check_grads(jaxlinear.linear, (params, x), order=1, modes=["rev"])
    layers = jaxlinear.init_mlp(jax.random.key(5), [4, 5, 3], dtype=jnp.float64)
    check_grads(lambda ls, x: jaxlinear.mlp(ls, x, activation=jnp.tanh), (layers, x), 1, ["rev"])


@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.complex128])
def test_complex_matches_jax_convention(dtype):
    k = jax.random.split(jax.random.key(6), 6)

    def c(kr, ki, shape):
        return (jax.random.normal(kr, shape) + 1j * jax.random.normal(ki, shape)).astype(dtype)

    params = jaxlinear.Params(c(k[0], k[1], (3, 2)), c(k[2], k[3], (2,)))
    x = c(k[4], k[5], (4, 3))
    g = c(k[5], k[4], (4, 2))
    tol = 1e-12 if dtype == jnp.complex128 else 1e-5
    assert_trees_close(
        _vjp_all(jaxlinear.linear, params, x, g),
        _vjp_all(reference, params, x, g),
        atol=tol,
        rtol=tol,
    )


# --- the backward pass is the explicit rule, and it saves only x and W ------------------


def test_backward_runs_pullback(monkeypatch):
    calls = []
    original = formulas.pullback

    def counting(*args, **kwargs):
        calls.append(kwargs.get("wrt"))
        return original(*args, **kwargs)

    monkeypatch.setattr(formulas, "pullback", counting)
    params, x = make_layer(jax.random.key(7), (3,), 2, 2)
    jax.grad(lambda p: jaxlinear.linear(p, x).sum())(params)
    assert calls == [("x", "W", "b")]
    # ... and a deliberately wrong pullback shows up in the gradient: nothing else computes it.
    monkeypatch.setattr(formulas, "pullback", lambda *a, **k: [2 * t for t in original(*a, **k)])
    dW = jax.grad(lambda p: jaxlinear.linear(p, x).sum())(params).W
    assert_trees_close(dW, 2 * jax.grad(lambda p: reference(p, x).sum())(params).W)


def test_jaxpr_binds_the_custom_vjp_primitive():
    # The custom_vjp binding is one primitive (so vmap sees it whole); its JVP is the
    # jax.custom_vjp call, whose forward pass shows up under jax.vjp.
    params, x = make_layer(jax.random.key(8), (3,), 2, 2)
    names = {e.primitive.name for e in eqns(jax.make_jaxpr(jaxlinear.linear)(params, x))}
    assert names == {"jaxlinear_affine_custom_vjp"}, names
    vjp = jax.make_jaxpr(lambda p, x: jax.vjp(jaxlinear.linear, p, x)[0])(params, x)
    assert "jaxlinear_affine_custom_vjp" not in {e.primitive.name for e in eqns(vjp)}


@pytest.mark.parametrize("bias", BIASES)
def test_residuals_are_x_and_W(bias):
    params, x = make_layer(jax.random.key(9), (4, 3), 5, 2, bias=bias)
    res = saved_residuals(jaxlinear.linear, params, x)
    assert sorted(res) == sorted(
        ["f64[4,3,5] from the argument x", "f64[5,2] from the argument params.W"]
    )


# --- transforms ----------------------------------------------------------------------


def test_forward_mode_raises_jax_error():
    params, x = make_layer(jax.random.key(10), (3,), 2, 2)
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.jvp(lambda x: jaxlinear.linear(params, x), (x,), (x,))


def test_jacrev_vmap_checkpoint_scan():
    params, x = make_layer(jax.random.key(11), (3,), 4, 4)
    assert_trees_close(
        jax.jacrev(jaxlinear.linear, argnums=(0, 1))(params, x),
        jax.jacrev(reference, argnums=(0, 1))(params, x),
    )

    def per_example(f):
        return jax.vmap(jax.grad(lambda p, xi: jnp.sum(f(p, xi) ** 2)), in_axes=(None, 0))

    assert_trees_close(per_example(jaxlinear.linear)(params, x), per_example(reference)(params, x))

    def remat(f):
        return jax.grad(jax.checkpoint(lambda p: jnp.sum(jnp.sin(f(p, x)))))

    assert_trees_close(remat(jaxlinear.linear)(params), remat(reference)(params))

    def scanned(f):
        def loss(p):
            body = lambda c, _: (jnp.tanh(f(p, c)), None)  # noqa: E731
            return jnp.sum(jax.lax.scan(body, x, None, length=3)[0])

        return jax.grad(loss)

    assert_trees_close(scanned(jaxlinear.linear)(params), scanned(reference)(params))


# --- mixed precision and precision -----------------------------------------------------

# The rounding error analysis of the policy, per element of Y = X W + b (u: the unit roundoff
# of the compute dtype, 2⁻⁸ for bfloat16 and 2⁻¹¹ for float16; u₃₂ = 2⁻²⁴):
#   1. x̂ = fl(x), ŵ = fl(w): each off by at most u relatively, so Σ x̂ŵ is within
#      (2u + u²)·A of Σ xw, where A = |X||W| elementwise (zero if X, W are representable).
#   2. Each product x̂ŵ is exact in float32 (8 + 8 and 11 + 11 significand bits fit in 24);
#      the d_in − 1 sums and the bias add in float32 cost γ_{d_in}·(Σ|x̂ŵ| + |b|), with
#      γ_k = k u₃₂ / (1 − k u₃₂) and Σ|x̂ŵ| ≤ (1 + u)²·A.
#   3. One rounding of that float32 sum s to the compute dtype: |Y − s| ≤ u|s| ≤ u|y| + u|s − y|.
# So |Y − y| ≤ u|y| + (1 + u)·e with e the sum of the bounds of steps 1 and 2. A second
# rounding (the bias added after Y is rounded) breaks step 3 and is caught when step 1 is
# exact: see test_double_rounding_fails_the_bound.
# The pullback rounds only the operand that is not already in the compute dtype (W for
# dX = G Wᵀ, X for dW = Xᵀ G; the cotangent G arrives in it) and returns the float32
# accumulation unrounded: the bound is (u + (1 + u)·γ_k)·|A||B| with k the contracted length.
UNIT_ROUNDOFF = {jnp.bfloat16: 2.0**-8, jnp.float16: 2.0**-11}
SEEDS = range(8)


def _gamma(k):
    return k * 2.0**-24 / (1 - k * 2.0**-24)


def _f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _forward_bound(P, X, u, *, representable=False):
    """The bound on |Y − (X W + b)| above; ``representable``: X and W exact in the compute dtype."""
    A = np.abs(X) @ np.abs(P.W)
    e = 0.0 if representable else (2 * u + u * u) * A
    e = e + _gamma(X.shape[-1]) * ((1 + u) ** 2 * A + np.abs(P.b))
    return u * np.abs(X @ P.W + P.b) + (1 + u) * e


def _policy_reference(params, x, compute_dtype):
    """The policy, written independently: operands cast once, float32 products and sums,
    the bias added in float32, one rounding at the end."""
    y = jnp.dot(
        x.astype(compute_dtype), params.W.astype(compute_dtype), preferred_element_type=jnp.float32
    )
    return (y + jnp.broadcast_to(params.b, y.shape)).astype(compute_dtype)


def _double_rounding(params, x, compute_dtype):
    """A wrong implementation (the mutant): Y rounded to the compute dtype, then b added."""
    y = jnp.dot(
        x.astype(compute_dtype), params.W.astype(compute_dtype), preferred_element_type=jnp.float32
    ).astype(compute_dtype)
    return y + jnp.broadcast_to(params.b.astype(compute_dtype), y.shape)


def _mixed_case(seed, lead=(16,), d_in=16, d_out=8, *, representable=False, compute_dtype=None):
    params, x = make_layer(jax.random.key(seed), lead, d_in, d_out, dtype=jnp.float32)
    if representable:  # X and W exactly representable in the compute dtype: step 1 is exact
        params = params._replace(W=params.W.astype(compute_dtype).astype(jnp.float32))
        x = x.astype(compute_dtype).astype(jnp.float32)
    return params, x


@pytest.mark.parametrize("lead", [(16,), (2, 3), ()], ids=["2d", "3d", "1d"])
@pytest.mark.parametrize("compute_dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("f", [jaxlinear.linear, jaxlinear.dual_linear], ids=lambda f: f.__name__)
def test_mixed_precision_forward_is_bit_exact(f, compute_dtype, lead):
    for seed in SEEDS:
        params, x = _mixed_case(seed, lead)
        y = f(params, x, compute_dtype=compute_dtype)
        assert y.dtype == compute_dtype
        np.testing.assert_array_equal(
            np.asarray(y, np.float64), np.asarray(_policy_reference(params, x, compute_dtype))
        )


@pytest.mark.parametrize("compute_dtype", [jnp.bfloat16, jnp.float16])
def test_mixed_precision_within_rounding_bounds(compute_dtype):
    u = UNIT_ROUNDOFF[compute_dtype]
    params, x = _mixed_case(12)
    P, X = _f64(params), _f64(x)
    absW, absX = np.abs(P.W), np.abs(X)

    y, pull = jax.vjp(lambda p, x: jaxlinear.linear(p, x, compute_dtype=compute_dtype), params, x)
    assert y.dtype == compute_dtype
    assert np.all(np.abs(_f64(y) - (X @ P.W + P.b)) <= _forward_bound(P, X, u))

    g = jax.random.normal(jax.random.key(13), y.shape, jnp.float32).astype(compute_dtype)
    G = _f64(g)  # the same (already rounded) cotangent for the reference
    n, d_out = G.shape[0], P.W.shape[1]
    dparams, dx = pull(g)
    assert dx.dtype == dparams.W.dtype == dparams.b.dtype == jnp.float32  # params'/x's dtypes
    dx_bound = (u + (1 + u) * _gamma(d_out)) * (np.abs(G) @ absW.T)
    dW_bound = (u + (1 + u) * _gamma(n)) * (absX.T @ np.abs(G))
    assert np.all(np.abs(_f64(dx) - G @ P.W.T) <= dx_bound)
    assert np.all(np.abs(_f64(dparams.W) - X.T @ G) <= dW_bound)
    assert np.all(np.abs(_f64(dparams.b) - G.sum(0)) <= _gamma(n) * np.abs(G).sum(0))
    # ... and the bounds are not vacuous: float32 compute is much closer than the bound.
    y32 = _f64(jaxlinear.linear(params, x, precision="highest"))
    assert np.max(np.abs(y32 - (X @ P.W + P.b)) / _forward_bound(P, X, u)) < 0.01


@pytest.mark.parametrize("compute_dtype", [jnp.bfloat16, jnp.float16])
def test_double_rounding_fails_the_bound(compute_dtype):
    """On inputs exact in the compute dtype the bound is sharp (attained to within a few
    percent) by the policy, and a second rounding breaks it on every seed."""
    u = UNIT_ROUNDOFF[compute_dtype]
    worst, caught, differs = 0.0, [], []
    for seed in SEEDS:
        params, x = _mixed_case(seed, representable=True, compute_dtype=compute_dtype)
        P, X = _f64(params), _f64(x)
        bound = _forward_bound(P, X, u, representable=True)
        for f in (jaxlinear.linear, jaxlinear.dual_linear):
            y = _f64(f(params, x, compute_dtype=compute_dtype))
            assert np.all(np.abs(y - (X @ P.W + P.b)) <= bound), (f.__name__, seed)
            worst = max(worst, np.max(np.abs(y - (X @ P.W + P.b)) / bound))
        mutant = _f64(_double_rounding(params, x, compute_dtype))
        caught.append(bool(np.any(np.abs(mutant - (X @ P.W + P.b)) > bound)))
        differs.append(
            not np.array_equal(mutant, _f64(_policy_reference(params, x, compute_dtype)))
        )
    assert worst > 0.9  # the bound is what the policy attains, not a loose envelope
    assert caught == [True] * len(SEEDS)  # the bound catches double rounding on every seed
    assert differs == [True] * len(SEEDS)  # and so does the bit-exact comparison


def test_mixed_precision_matmuls_run_in_compute_dtype():
    """On accelerators the three matmuls take bfloat16 operands and accumulate in float32; on
    CPU the same bfloat16-rounded operands are widened to float32 first (exact; XLA:CPU
    lacks kernels for some bfloat16 × bfloat16 → float32 forms, issue #29)."""
    params, x = make_layer(jax.random.key(13), (8,), 16, 4, dtype=jnp.float32)
    loss = lambda p, x: jnp.sum(jaxlinear.linear(p, x, compute_dtype=jnp.bfloat16) ** 2)  # noqa: E731
    traced = jax.jit(jax.grad(loss, (0, 1))).trace(params, x)
    # (lhs, rhs, result) element types of each product in the lowered program
    dot = r"stablehlo.dot_general [^:]*: \(tensor<\S+x(\w+)>, tensor<\S+x(\w+)>\)"
    dot += r" -> tensor<\S+x(\w+)>"
    for platform, operands in (("cuda", "bf16"), ("cpu", "f32")):
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        dots = re.findall(dot, text)
        assert len(dots) == 3, (platform, dots)  # forward, dX = G Wᵀ, dW = Xᵀ G
        assert all(d == (operands, operands, "f32") for d in dots), (platform, dots)
    assert re.search(r"stablehlo.convert %\w+ : \(tensor<\S+xbf16>\) -> tensor<\S+xf32>", text)


def test_mixed_dtypes_x_bf16_params_f32():
    params, x = make_layer(jax.random.key(14), (8,), 16, 4, dtype=jnp.float32)
    xb = x.astype(jnp.bfloat16)
    dparams, dx = jax.grad(
        lambda p, x: jnp.sum(jaxlinear.linear(p, x, compute_dtype=jnp.bfloat16)), (0, 1)
    )(params, xb)
    assert dx.dtype == jnp.bfloat16
    assert dparams.W.dtype == dparams.b.dtype == jnp.float32


def test_precision_survives_into_backward():
    params, x = make_layer(jax.random.key(15), (3,), 2, 2, dtype=jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    jaxpr = jax.make_jaxpr(
        jax.grad(lambda p, x: jaxlinear.linear(p, x, precision=hi).sum(), (0, 1))
    )(params, x)
    dots = [e for e in eqns(jaxpr) if e.primitive.name == "dot_general"]
    assert len(dots) == 3
    assert all(e.params["precision"] == (hi, hi) for e in dots), [
        e.params["precision"] for e in dots
    ]


# --- public pushforward / pullback -----------------------------------------------------


@pytest.mark.parametrize("bias", BIASES)
def test_public_pushforward_and_pullback(bias):
    params, x = make_layer(jax.random.key(16), (2, 3), 4, 3, bias=bias)
    dparams, dx = make_layer(jax.random.key(17), (2, 3), 4, 3, bias=bias)
    _, dy_ref = jax.jvp(reference, (params, x), (dparams, dx))
    assert_trees_close(jaxlinear.pushforward(params, x, dparams, dx), dy_ref)
    # zero tangents may be given as None: all of dparams, or its bias
    if bias != "none":
        _, dy_w = jax.jvp(lambda W: reference(params._replace(W=W), x), (params.W,), (dparams.W,))
        assert_trees_close(jaxlinear.pushforward(params, x, dparams._replace(b=None), None), dy_w)
    _, dy_x = jax.jvp(lambda x: reference(params, x), (x,), (dx,))
    assert_trees_close(jaxlinear.pushforward(params, x, None, dx), dy_x)
    g = jax.random.normal(jax.random.key(18), (2, 3, 3), jnp.float64)
    assert_trees_close(jaxlinear.pullback(params, x, g), jax.vjp(reference, params, x)[1](g))


def test_pullback_rejects_wrong_cotangent():
    params, x = make_layer(jax.random.key(19), (5,), 4, 3)
    with pytest.raises(ValueError, match=r"pullback: `g` has shape \(5, 4\) but .* \(5, 3\)"):
        jaxlinear.pullback(params, x, jnp.ones((5, 4)))
    with pytest.raises(TypeError, match="pullback: `g` has dtype float32 but"):
        jaxlinear.pullback(params, x, jnp.ones((5, 3), jnp.float32))


def test_pushforward_rejects_wrong_tangent():
    params, x = make_layer(jax.random.key(20), (5,), 4, 3)
    with pytest.raises(ValueError, match=r"pushforward: `dx` has shape \(4, 4\)"):
        jaxlinear.pushforward(params, x, None, jnp.ones((4, 4)))
    with pytest.raises(TypeError, match="same structure"):
        jaxlinear.pushforward(params, x, {"W": params.W, "b": params.b}, None)


# --- training ------------------------------------------------------------------------


def test_jitted_sgd_step_compiles_once_and_lowers_loss():
    key_x, key_p = jax.random.split(jax.random.key(21))
    x = jax.random.uniform(key_x, (64, 2), jnp.float32, -1.0, 1.0)
    y = jnp.sin(3.0 * x[:, :1]) * x[:, 1:]  # (64, 1) target
    layers = jaxlinear.init_mlp(key_p, [2, 32, 32, 1])

    def loss(layers, x, y):
        return jnp.mean((jaxlinear.mlp(layers, x, activation=jnp.tanh) - y) ** 2)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(layers, x, y):
        value, grads = jax.value_and_grad(loss)(layers, x, y)
        return jax.tree.map(lambda p, g: p - 0.1 * g, layers, grads), value

    first = None
    for _ in range(300):
        layers, value = step(layers, x, y)
        first = value if first is None else first
    last = loss(layers, x, y)
    assert float(last) < float(first) / 5, (first, last)


# --- mlp -------------------------------------------------------------------------------


def test_mlp_matches_reference_chain():
    layers = jaxlinear.init_mlp(jax.random.key(22), [3, 4, 5, 2], dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(23), (6, 3), jnp.float64)

    def ref_mlp(layers, x):
        for i, p in enumerate(layers):
            x = reference(p, x)
            x = jax.nn.relu(x) if i < len(layers) - 1 else x
        return x

    out = jaxlinear.mlp(layers, x)
    chex.assert_shape(out, (6, 2))
    assert_trees_close(out, ref_mlp(layers, x))
    g = jax.grad(lambda ls: jnp.sum(jaxlinear.mlp(ls, x) ** 2))(layers)
    assert_trees_close(g, jax.grad(lambda ls: jnp.sum(ref_mlp(ls, x) ** 2))(layers))


def test_mlp_rejects_empty():
    with pytest.raises(ValueError, match="mlp: `layers` is empty"):
        jaxlinear.mlp([], jnp.ones(3))


@pytest.mark.parametrize(
    "layer", [jaxlinear.linear, jaxlinear.dual_linear], ids=lambda f: f.__name__
)
def test_mlp_errors_name_the_layer(layer):
    name = layer.__name__
    layers = jaxlinear.init_mlp(jax.random.key(24), [3, 5, 2], dtype=jnp.float64)
    x = jnp.ones((2, 3))
    wide = [layers[0], jaxlinear.init(jax.random.key(25), 4, 2, dtype=jnp.float64)]
    with pytest.raises(
        ValueError, match=rf"^mlp: layer 1 \(4 → 2\): {name}: `x` has last dim 5 \(shape \(2, 5\)\)"
    ):
        jaxlinear.mlp(wide, x, layer=layer)
    ints = [layers[0]._replace(W=jnp.ones((3, 5), jnp.int32)), layers[1]]
    with pytest.raises(TypeError, match=rf"^mlp: layer 0 \(3 → 5\): {name}: `W` has dtype int32"):
        jaxlinear.mlp(ints, x, layer=layer)
    with pytest.raises(TypeError, match=rf"^mlp: layer 0: {name}: `params` must be Params"):
        jaxlinear.mlp(["W", layers[1]], x, layer=layer)
    with pytest.raises(TypeError, match=r"^mlp: `activation` must be callable or None, got str"):
        jaxlinear.mlp(layers, x, activation="relu", layer=layer)


@pytest.mark.parametrize(
    "layer", [jaxlinear.linear, jaxlinear.dual_linear], ids=lambda f: f.__name__
)
def test_mlp_activation_none_is_the_identity(layer):
    layers = jaxlinear.init_mlp(jax.random.key(26), [3, 4, 2], dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(27), (5, 3), jnp.float64)

    def ref(layers):  # affine, affine: nothing in between
        return reference(layers[1], reference(layers[0], x))

    def ours(layers):
        return jaxlinear.mlp(layers, x, activation=None, layer=layer)

    assert_trees_close(ours(layers), ref(layers))
    loss = lambda f: lambda ls: jnp.sum(jnp.sin(f(ls)))  # noqa: E731
    assert_trees_close(jax.grad(loss(ours))(layers), jax.grad(loss(ref))(layers))
