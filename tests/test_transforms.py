"""The transform matrix: every JAX transform on both bindings, against plain ``x @ W + b``.

``dual_linear`` must pass every row. ``linear`` (a ``custom_vjp``) must pass the
reverse-mode rows and raise JAX's own error on the forward-mode rows: a documented
limitation, asserted here so that it is never a silent wrong answer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.test_util import check_grads

import jaxlinear
from jaxlinear._src import formulas
from tests.helpers import assert_trees_close, eqns, make_layer, reference

LEAD = (2, 3)  # x with two leading axes
D_IN, D_OUT = 4, 3
# (d_in, d_out). With a square W, W and Wᵀ have the same shape: only values can tell a
# missing transpose (test_square_W_catches_a_missing_transpose).
DIMS = {"4x3": (D_IN, D_OUT), "3x3": (D_OUT, D_OUT)}


def _setup(dims="4x3"):
    d_in, d_out = DIMS[dims]
    params, x = make_layer(jax.random.key(0), LEAD, d_in, d_out)
    dparams, dx = make_layer(jax.random.key(1), LEAD, d_in, d_out)
    g = jax.random.normal(jax.random.key(2), (*LEAD, d_out), jnp.float64)
    return params, x, dparams, dx, g


def _loss(f):
    return lambda p, x: jnp.sum(jnp.sin(f(p, x)))  # non-quadratic: Hessians are non-trivial


def _stack(tree):
    return jax.tree.map(lambda a: jnp.stack([a, 2.0 * a, -a]), tree)


def _row_eval(f, p, x, dp, dx, g):
    return f(p, x)


def _row_jit(f, p, x, dp, dx, g):
    return jax.jit(f)(p, x)


def _row_grad(f, p, x, dp, dx, g):
    return jax.grad(_loss(f), argnums=(0, 1))(p, x)


def _row_jit_grad(f, p, x, dp, dx, g):
    return jax.jit(jax.grad(_loss(f), argnums=(0, 1)))(p, x)


def _row_vjp(f, p, x, dp, dx, g):
    y, pull = jax.vjp(f, p, x)
    return y, pull(g)


def _row_jacrev(f, p, x, dp, dx, g):
    return jax.jacrev(f, argnums=(0, 1))(p, x)


def _row_jacrev_grad(f, p, x, dp, dx, g):
    return jax.jacrev(jax.grad(_loss(f), argnums=(0, 1)), argnums=(0, 1))(p, x)


def _row_vmap_x(f, p, x, dp, dx, g):
    return jax.vmap(f, in_axes=(None, 1), out_axes=1)(p, x)  # batch axis in the middle


def _row_vmap_params(f, p, x, dp, dx, g):
    return jax.vmap(f, in_axes=(0, None))(_stack(p), x)


def _row_grad_vmap_params(f, p, x, dp, dx, g):
    return jax.grad(lambda ps: jnp.sum(jnp.sin(jax.vmap(f, in_axes=(0, None))(ps, x))))(_stack(p))


def _row_vmap_grad(f, p, x, dp, dx, g):
    return jax.vmap(jax.grad(_loss(f), argnums=(0, 1)), in_axes=(None, 0))(p, x)  # per-example


def _row_checkpoint_grad(f, p, x, dp, dx, g):
    return jax.grad(jax.checkpoint(_loss(f)), argnums=(0, 1))(p, x)


def _row_scan_grad(f, p, x, dp, dx, g):
    d_in = p.W.shape[0]
    square = jaxlinear.Params(jnp.tile(p.W, (1, 2))[:, :d_in], p.b[:1].repeat(d_in))

    def loss(q, x):
        body = lambda c, _: (jnp.tanh(f(q, c)), None)  # noqa: E731
        return jnp.sum(jax.lax.scan(body, x, None, length=3)[0])

    return jax.grad(loss, argnums=(0, 1))(square, x)


def _row_mixed_grad(f, p, x, dp, dx, g):
    p32, x32 = jax.tree.map(lambda a: a.astype(jnp.float32), (p, x))
    fb = lambda p, x: f(p, x, compute_dtype=jnp.bfloat16).astype(jnp.float32)  # noqa: E731
    return jax.grad(_loss(fb), argnums=(0, 1))(p32, x32)


# forward-mode rows
def _row_jvp(f, p, x, dp, dx, g):
    return jax.jvp(f, (p, x), (dp, dx))


def _row_linearize(f, p, x, dp, dx, g):
    y, f_lin = jax.linearize(f, p, x)
    return y, f_lin(dp, dx)


def _row_jacfwd(f, p, x, dp, dx, g):
    return jax.jacfwd(f, argnums=(0, 1))(p, x)


def _row_hessian_params(f, p, x, dp, dx, g):
    return jax.hessian(_loss(f), argnums=0)(p, x)


def _row_hessian_x(f, p, x, dp, dx, g):
    return jax.hessian(_loss(f), argnums=1)(p, x)


def _row_fwd_over_rev(f, p, x, dp, dx, g):  # Hessian-vector product
    return jax.jvp(jax.grad(_loss(f), argnums=(0, 1)), (p, x), (dp, dx))


def _row_rev_over_fwd(f, p, x, dp, dx, g):
    return jax.grad(lambda p, x: jnp.sum(jnp.sin(jax.jvp(f, (p, x), (dp, dx))[1])), (0, 1))(p, x)


def _row_vmap_jvp(f, p, x, dp, dx, g):
    return jax.vmap(lambda x, dx: jax.jvp(f, (p, x), (dp, dx)))(x, dx)


def _row_linear_transpose_x(f, p, x, dp, dx, g):
    return jax.linear_transpose(lambda x: f(p, x), x)(g)


def _row_linear_transpose_params(f, p, x, dp, dx, g):
    return jax.linear_transpose(lambda p: f(p, x), p)(g)


def _row_mixed_jvp(f, p, x, dp, dx, g):
    p32, x32, dp32, dx32 = jax.tree.map(lambda a: a.astype(jnp.float32), (p, x, dp, dx))
    fb = lambda p, x: f(p, x, compute_dtype=jnp.bfloat16).astype(jnp.float32)  # noqa: E731
    return jax.jvp(fb, (p32, x32), (dp32, dx32))


REVERSE_ROWS = [
    _row_eval, _row_jit, _row_grad, _row_jit_grad, _row_vjp, _row_jacrev, _row_jacrev_grad,
    _row_vmap_x, _row_vmap_params, _row_grad_vmap_params, _row_vmap_grad,
    _row_checkpoint_grad, _row_scan_grad, _row_mixed_grad,
]  # fmt: skip
# Forward-over-reverse differentiates the VJP's fwd and bwd functions (plain jnp), so these
# work even on a custom_vjp function.
FORWARD_OVER_REVERSE_ROWS = [_row_hessian_params, _row_hessian_x, _row_fwd_over_rev]
FORWARD_ROWS = [
    _row_jvp, _row_linearize, _row_jacfwd, _row_rev_over_fwd, _row_vmap_jvp, _row_mixed_jvp,
]  # fmt: skip
TRANSPOSE_ROWS = [_row_linear_transpose_x, _row_linear_transpose_params]
MIXED = {_row_mixed_grad, _row_mixed_jvp}


def _ids(row):
    return row.__name__.removeprefix("_row_")


def _mixed_cast(p, x, compute_dtype):
    """The policy under JAX's AD: operands cast to ``compute_dtype``, float32 accumulation,
    ``b`` added in float32, one rounding. Forward mode rounds tangents as the pushforward
    does (the JVP of a cast is the cast of the tangent)."""
    W, b = p.W.astype(compute_dtype), p.b
    y = jnp.matmul(x.astype(compute_dtype), W, preferred_element_type=jnp.float32)
    return (y + jnp.broadcast_to(b, y.shape)).astype(compute_dtype)


def _mixed_straight_through(p, x, compute_dtype):
    """The same values, but each operand's rounding is invisible to AD (straight-through),
    so reverse mode returns the float32 accumulation of the (rounded) cotangent against the
    rounded operands, unrounded, in the params' dtype: the documented policy. (JAX's AD of
    ``_mixed_cast`` rounds those cotangents to ``compute_dtype`` once more.)"""

    def rounded(a):  # value of fl(a), derivative 1; exact in float32 products and sums
        return a + jax.lax.stop_gradient(a.astype(compute_dtype).astype(a.dtype) - a)

    y = jnp.matmul(rounded(x), rounded(p.W), precision="highest")
    return (y + jnp.broadcast_to(p.b, y.shape)).astype(compute_dtype)


def _run(row, f, args):
    """``row(f, *args)`` as one jitted program (one compile per row instead of one per op);
    the eval row runs eagerly (the primitive's own evaluation rule)."""
    if row is _row_eval:
        return row(f, *args)
    return jax.jit(functools.partial(row, f))(*args)


def _reference_result(row, args):
    if row is _row_mixed_grad:
        return _run(row, _mixed_straight_through, args)
    if row is _row_mixed_jvp:
        return _run(row, _mixed_cast, args)
    return _run(row, reference, args)


def _tolerance(row):
    # Mixed precision: bit for bit. The references round where the policy does and
    # accumulate bf16 products (exact in float32) in float32, so there is nothing to allow.
    return dict(atol=0, rtol=0) if row in MIXED else dict(atol=1e-12, rtol=1e-12)


ALL_ROWS = REVERSE_ROWS + FORWARD_OVER_REVERSE_ROWS + FORWARD_ROWS + TRANSPOSE_ROWS


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("row", ALL_ROWS, ids=_ids)
def test_dual_linear(row, dims):
    args = _setup(dims)
    assert_trees_close(
        _run(row, jaxlinear.dual_linear, args), _reference_result(row, args), **_tolerance(row)
    )


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("row", REVERSE_ROWS + FORWARD_OVER_REVERSE_ROWS, ids=_ids)
def test_linear_reverse_mode(row, dims):
    args = _setup(dims)
    assert_trees_close(
        _run(row, jaxlinear.linear, args), _reference_result(row, args), **_tolerance(row)
    )


@pytest.mark.parametrize("row", FORWARD_ROWS, ids=_ids)
def test_linear_forward_mode_is_refused(row):
    # JAX's own errors: jvp of a custom_vjp; or, for grad-of-jvp, no rule for its linearization.
    match = "can't apply forward-mode autodiff|Differentiation rule for 'custom_lin'"
    with pytest.raises((TypeError, NotImplementedError), match=match):
        row(jaxlinear.linear, *_setup())


@pytest.mark.parametrize("row", TRANSPOSE_ROWS, ids=_ids)
def test_linear_transpose_of_the_custom_vjp_binding(row):
    # The custom_vjp binding is bound through a primitive (so that vmap sees it whole)
    # whose transpose rule is the dual's: jax.linear_transpose runs our transposes too.
    args = _setup()
    assert_trees_close(_run(row, jaxlinear.linear, args), _reference_result(row, args))


def test_check_grads_second_order_both_modes():
    params, x, *_ = _setup()
    check_grads(_loss(jaxlinear.dual_linear), (params, x), order=2, modes=["fwd", "rev"])
    layers = jaxlinear.init_mlp(jax.random.key(3), [D_IN, 5, 2], dtype=jnp.float64)
    mlp = lambda ls, x: jaxlinear.mlp(ls, x, activation=jnp.tanh, layer=jaxlinear.dual_linear)  # noqa: E731
    check_grads(mlp, (layers, x), order=2, modes=["fwd", "rev"])


# --- our rules are what run ------------------------------------------------------------


@pytest.fixture
def counted(monkeypatch):
    """Record each call of formulas.pullback / formulas.pushforward (at trace time)."""
    calls = []
    for name in ("pullback", "pushforward"):
        original = getattr(formulas, name)

        def wrapper(*a, _original=original, _name=name, **k):
            calls.append((_name, k.get("wrt")))
            return _original(*a, **k)

        monkeypatch.setattr(formulas, name, wrapper)
    return calls


def test_grad_runs_our_transpose(counted):
    params, x, *_ = _setup()
    jax.grad(_loss(jaxlinear.dual_linear), argnums=(0, 1))(params, x)
    assert ("pullback", ("x", "W", "b")) in counted
    assert [c for c in counted if c[0] == "pullback"] == [("pullback", ("x", "W", "b"))]


def test_jvp_runs_our_pushforward(counted):
    params, x, dparams, dx, _ = _setup()
    jax.jvp(jaxlinear.dual_linear, (params, x), (dparams, dx))
    assert counted == [("pushforward", None)]


def test_linear_transpose_runs_our_transpose(counted):
    params, x, *_, g = _setup()
    jax.linear_transpose(lambda x: jaxlinear.dual_linear(params, x), x)(g)
    assert counted == [("pullback", ("x",))]
    counted.clear()
    jax.linear_transpose(lambda p: jaxlinear.dual_linear(p, x), params)(g)
    assert counted == [("pullback", ("W", "b"))]


def _pullback_without_transpose(original):
    """A wrong rule (the mutant): ``dX = G W`` instead of ``G Wᵀ``; it has the right shape
    exactly when ``W`` is square, so only values can catch it there."""

    def pullback(x, W, g, **kwargs):
        dx, dW, db = original(x, W, g, **kwargs)
        if dx is not None:
            dx = jnp.matmul(g, W).astype(dx.dtype)  # (..., d_out) @ (d_in, d_out): d_in == d_out
        return dx, dW, db

    return pullback


@pytest.mark.parametrize("f", [jaxlinear.linear, jaxlinear.dual_linear], ids=lambda f: f.__name__)
def test_square_W_catches_a_missing_transpose(monkeypatch, f):
    monkeypatch.setattr(formulas, "pullback", _pullback_without_transpose(formulas.pullback))
    rows = [_row_grad, _row_vjp, _row_jacrev, _row_vmap_grad, _row_checkpoint_grad]
    rows += [_row_linear_transpose_x] if f is jaxlinear.dual_linear else []
    args = _setup("3x3")
    caught = []
    for row in rows:
        try:
            assert_trees_close(row(f, *args), _reference_result(row, args))
        except AssertionError:
            caught.append(_ids(row))
    assert caught == [_ids(row) for row in rows]
    with pytest.raises(TypeError, match="dot_general requires contracting dimensions"):
        _row_grad(f, *_setup("4x3"))  # non-square: the mutant cannot even run


def test_grad_jaxpr_has_no_transposed_dot_from_jax():
    # The jaxpr of grad holds our forward primitive and exactly the pullback's two
    # contractions, dX = G Wᵀ and dW = Xᵀ G (no pushforward work is left in reverse mode).
    params, x, *_ = _setup()
    jaxpr = jax.make_jaxpr(jax.grad(_loss(jaxlinear.dual_linear), argnums=(0, 1)))(params, x)
    names = [e.primitive.name for e in eqns(jaxpr)]
    assert names.count("jaxlinear_affine") == 1 and "jaxlinear_pushforward" not in names, names
    dots = [e for e in eqns(jaxpr) if e.primitive.name == "dot_general"]
    assert [e.params["dimension_numbers"][0] for e in dots] == [
        ((1,), (1,)),  # (n, d_out) @ (d_in, d_out)ᵀ
        ((0,), (0,)),  # (n, d_in)ᵀ @ (n, d_out): leading axes collapsed, no transpose of G
    ]


def test_transposing_bilinear_in_both_is_refused():
    params, x, *_, g = _setup()
    with pytest.raises(ValueError, match="bilinear"):
        jax.linear_transpose(lambda W, x: jaxlinear.dual_linear({"W": W}, x), params.W, x)(g)


def test_mlp_with_dual_layers_hessian_vector_product():
    layers = jaxlinear.init_mlp(jax.random.key(4), [D_IN, 5, 2], dtype=jnp.float64)
    _, x, *_ = _setup()

    def loss(layer):
        return lambda ls: jnp.sum(jaxlinear.mlp(ls, x, activation=jnp.tanh, layer=layer) ** 2)

    def ref_layer(p, x, **kw):
        return reference(p, x)

    v = jax.tree.map(jnp.ones_like, layers)
    hvp = lambda layer: jax.jvp(jax.grad(loss(layer)), (layers,), (v,))  # noqa: E731
    assert_trees_close(hvp(jaxlinear.dual_linear), hvp(ref_layer))
