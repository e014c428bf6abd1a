"""The public API in JAX's default configuration (x64 off), on NumPy inputs, warnings as errors.

``tests/conftest.py`` turns float64 on for the rest of the suite, so these tests run in a
fresh interpreter that never reads it: ``tests/test_default_config.py`` runs ::

    python -W error -m pytest --noconftest -p no:cacheprovider tests/default_config_checks.py

with ``JAX_ENABLE_X64=0`` (run that line by hand to see each test). NumPy's
``np.random`` gives float64 arrays; with x64 off JAX computes them in float32, and every
public function must then behave exactly like plain ``x @ W + b`` computed by JAX in the
same configuration: the same result dtype, the same values (to float32 rounding), and no
warning. The file is named ``*_checks.py`` so that the main run does not collect its tests
under x64 (its doctest collection only imports it, which does nothing).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlinear

_IMPORTED_BY_JAXLINEAR = set(sys.modules)  # this file imports nothing optional before here

F32 = np.dtype(np.float32)
TOL = dict(rtol=2e-6, atol=2e-6)  # float32 rounding, sizes below 10


def plain(params, x):
    """The reference: ``x @ W + b`` computed by JAX (NumPy inputs canonicalized by jnp)."""
    W = params.W if isinstance(params, jaxlinear.Params) else params["W"]
    b = params.b if isinstance(params, jaxlinear.Params) else params.get("b")
    y = jnp.matmul(x, W)
    return y if b is None else y + b


def numpy_layer(seed, lead=(5,), d_in=4, d_out=3, dtype=np.float64):
    """NumPy ``(params, x)``: float64 by default, as ``np.random`` gives them."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((d_in, d_out)).astype(dtype)
    b = rng.standard_normal(d_out).astype(dtype)
    x = rng.standard_normal((*lead, d_in)).astype(dtype)
    return jaxlinear.Params(W, b), x


def assert_like(actual, expected, **tol):
    """Same structure, shapes, dtypes; values within float32 rounding."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected), (actual, expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert isinstance(a, jax.Array), type(a)
        assert (a.shape, a.dtype) == (e.shape, e.dtype), (a.shape, a.dtype, e.shape, e.dtype)
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), **(tol or TOL))


LAYERS = [jaxlinear.linear, jaxlinear.dual_linear]
NP_DTYPES = [np.float64, np.float32]


def test_this_is_the_default_configuration():
    assert not jax.config.jax_enable_x64
    assert jnp.asarray(np.ones(2)).dtype == F32
    assert jax.config.jax_numpy_rank_promotion == "allow"


def test_the_issue_example():
    """``linear(init(...), np.random.randn(5, 4))`` in a fresh interpreter: issue #13."""
    params = jaxlinear.init(jax.random.key(0), 4, 3)
    x = np.random.randn(5, 4)  # float64, as NumPy gives it
    y = jaxlinear.linear(params, x)
    assert_like(y, plain(params, x))
    assert y.dtype == (x @ params.W + params.b).dtype == F32


@pytest.mark.parametrize("np_dtype", NP_DTYPES)
@pytest.mark.parametrize("f", LAYERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("params_from", ["numpy", "init"])
def test_layer_value_and_grad(f, np_dtype, params_from):
    params, x = numpy_layer(1, (2, 3), dtype=np_dtype)
    if params_from == "init":
        params = jaxlinear.init(jax.random.key(1), 4, 3)
        params = params._replace(b=params.b + 0.5)
    assert_like(f(params, x), plain(params, x))
    assert_like(jax.jit(f)(params, x), plain(params, x))

    def loss(g):
        return lambda p, x: jnp.sum(jnp.sin(g(p, x)))

    assert_like(
        jax.grad(loss(f), argnums=(0, 1))(params, x),
        jax.grad(loss(plain), argnums=(0, 1))(params, x),
    )


@pytest.mark.parametrize("np_dtype", NP_DTYPES)
def test_dual_linear_forward_mode(np_dtype):
    params, x = numpy_layer(2, dtype=np_dtype)
    dparams, dx = numpy_layer(3, dtype=np_dtype)
    assert_like(
        jax.jvp(jaxlinear.dual_linear, (params, x), (dparams, dx)),
        jax.jvp(plain, (params, x), (dparams, dx)),
    )
    assert_like(
        jax.jacfwd(jaxlinear.dual_linear, argnums=(0, 1))(params, x),
        jax.jacfwd(plain, argnums=(0, 1))(params, x),
    )
    assert_like(
        jax.hessian(lambda x: jnp.sum(jnp.sin(jaxlinear.dual_linear(params, x))))(x[0]),
        jax.hessian(lambda x: jnp.sum(jnp.sin(plain(params, x))))(x[0]),
    )


@pytest.mark.parametrize("np_dtype", NP_DTYPES)
def test_pushforward_and_pullback(np_dtype):
    params, x = numpy_layer(4, (2, 3), dtype=np_dtype)
    dparams, dx = numpy_layer(5, (2, 3), dtype=np_dtype)
    g = np.random.default_rng(6).standard_normal((2, 3, 3)).astype(np_dtype)
    assert_like(
        jaxlinear.pushforward(params, x, dparams, dx), jax.jvp(plain, (params, x), (dparams, dx))[1]
    )
    assert_like(jaxlinear.pushforward(params, x, None, dx), jnp.matmul(dx, params.W))
    assert_like(jaxlinear.pullback(params, x, g), jax.vjp(plain, params, x)[1](g))


def test_jacobian_helpers():
    params, x = numpy_layer(7, (3,))
    for wrt, argnum in (("x", 1), ("W", 0), ("b", 0)):
        expected = jax.jacrev(plain, argnums=argnum)(params, x)
        if wrt != "x":
            expected = getattr(expected, wrt)
        assert_like(jaxlinear.dense_jacobian(params, x, wrt=wrt), expected)
    blocks = jaxlinear.jacobian_blocks(params, x)
    assert_like(blocks, jnp.broadcast_to(jnp.asarray(params.W).T, (3, 3, 4)))


def test_adjoint_test():
    params, x = numpy_layer(8)
    rng = np.random.default_rng(9)
    v, u = rng.standard_normal(x.shape), rng.standard_normal((5, 3))
    t = jaxlinear.adjoint_test(
        lambda dx: jaxlinear.pushforward(params, x, None, dx),
        lambda g: jaxlinear.pullback(params, x, g)[1],
        v,
        u,
    )
    assert t.residual.dtype == F32 and float(t.residual) <= 1e-5
    lhs = jnp.sum(jnp.asarray(u) * jnp.matmul(v, params.W))  # ⟨u, v W⟩ by JAX
    np.testing.assert_allclose(float(t.lhs), float(lhs), rtol=1e-5)


@pytest.mark.parametrize("activation", [jnp.tanh, None], ids=["tanh", "None"])
@pytest.mark.parametrize("f", LAYERS, ids=lambda f: f.__name__)
def test_mlp(f, activation):
    layers = [numpy_layer(10 + i, (), a, b)[0] for i, (a, b) in enumerate([(4, 5), (5, 2)])]
    x = numpy_layer(12)[1]

    def ours(layers, x):
        return jaxlinear.mlp(layers, x, activation=activation, layer=f)

    def ref(layers, x):  # activation=None: the identity
        h = x
        for i, p in enumerate(layers):
            h = plain(p, h)
            h = activation(h) if activation is not None and i < len(layers) - 1 else h
        return h

    assert_like(ours(layers, x), ref(layers, x))
    assert_like(
        jax.grad(lambda ls: jnp.sum(ours(ls, x) ** 2))(layers),
        jax.grad(lambda ls: jnp.sum(ref(ls, x) ** 2))(layers),
    )


def test_mixed_precision_on_numpy_inputs():
    params, x = numpy_layer(13)
    params = jax.tree.map(lambda a: a.astype(np.float32), params)
    y = jaxlinear.linear(params, x, compute_dtype=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    dparams, dx = jax.grad(
        lambda p, x: jnp.sum(jaxlinear.linear(p, x, compute_dtype=jnp.bfloat16)), (0, 1)
    )(params, x)
    assert dx.dtype == dparams.W.dtype == F32


@pytest.mark.parametrize(
    "f",
    [
        jaxlinear.data_parallel_linear,
        jaxlinear.column_parallel_linear,
        jaxlinear.row_parallel_linear,
    ],
    ids=lambda f: f.__name__,
)
def test_sharded_layers_on_one_device(f):
    params, x = numpy_layer(14, (4,))
    axis = "data" if f is jaxlinear.data_parallel_linear else "model"
    mesh = jax.make_mesh((1,), (axis,))
    assert_like(f(params, x, mesh=mesh, axis=axis), plain(params, x))
    layers = [numpy_layer(15, (), 4, 6)[0], numpy_layer(16, (), 6, 3)[0]]
    mesh = jax.make_mesh((1,), ("model",))
    assert_like(
        jaxlinear.tensor_parallel_mlp(layers, x, mesh=mesh),
        plain(layers[1], jax.nn.relu(plain(layers[0], x))),
    )


@pytest.mark.parametrize(
    ("x", "got"),
    [([[1.0, 2.0, 3.0, 4.0]], "list"), ("abcd", "str"), (None, "NoneType")],
    ids=["list", "str", "None"],
)
@pytest.mark.parametrize("f", LAYERS, ids=lambda f: f.__name__)
def test_non_arrays_are_refused(f, x, got):
    params, _ = numpy_layer(17)
    with pytest.raises(TypeError, match=rf"^{f.__name__}: `x` must be an array .* got {got}$"):
        f(params, x)
    with pytest.raises(TypeError):  # jnp refuses them too
        jnp.matmul(x, params.W)


# -- the family, per-example norms and FSDP on NumPy inputs -----------------------------
# Each op against the plain lax/jnp op on the same NumPy inputs, which JAX canonicalizes
# to float32 here: same dtype, same values, gradients too, no warning.

_DN = (((1,), (0,)), ((), ()))
_CONV_DN = ("NHWC", "HWIO", "NHWC")
FAMILY = {
    "dot_general": (
        lambda x, w: jaxlinear.dot_general(x, w, _DN),
        lambda x, w: jax.lax.dot_general(x, w, _DN),
        (5, 4),
        (4, 3),
    ),
    "dual_dot_general": (
        lambda x, w: jaxlinear.dual_dot_general(x, w, _DN),
        lambda x, w: jax.lax.dot_general(x, w, _DN),
        (5, 4),
        (4, 3),
    ),
    "einsum": (
        lambda x, w: jaxlinear.einsum("btd,dhk->bthk", x, w),
        lambda x, w: jnp.einsum("btd,dhk->bthk", x, w),
        (2, 3, 4),
        (4, 2, 3),
    ),
    "dual_einsum": (
        lambda x, w: jaxlinear.dual_einsum("btd,dhk->bthk", x, w),
        lambda x, w: jnp.einsum("btd,dhk->bthk", x, w),
        (2, 3, 4),
        (4, 2, 3),
    ),
    "conv_general_dilated": (
        lambda x, w: jaxlinear.conv_general_dilated(x, w, (2, 1), "SAME", None, None, _CONV_DN),
        lambda x, w: jax.lax.conv_general_dilated(x, w, (2, 1), "SAME", None, None, _CONV_DN),
        (2, 5, 4, 3),
        (3, 3, 3, 2),
    ),
    "dual_conv_general_dilated": (
        lambda x, w: jaxlinear.dual_conv_general_dilated(
            x, w, (1, 1), "VALID", None, None, _CONV_DN
        ),
        lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", None, None, _CONV_DN),
        (2, 5, 4, 3),
        (3, 3, 3, 2),
    ),
}


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_family_ops_on_numpy_inputs(name):
    op, reference, x_shape, w_shape = FAMILY[name]
    rng = np.random.default_rng(20)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)  # float64, as NumPy gives
    assert_like(op(x, w), reference(x, w), rtol=1e-5, atol=1e-5)
    assert op(x, w).dtype == F32

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w)))

    assert_like(
        jax.grad(loss(op), argnums=(0, 1))(x, w),
        jax.grad(loss(reference), argnums=(0, 1))(x, w),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("f", [jaxlinear.conv, jaxlinear.dual_conv], ids=lambda f: f.__name__)
def test_conv_layer_on_numpy_inputs(f):
    rng = np.random.default_rng(21)
    params = jaxlinear.Params(rng.standard_normal((3, 3, 3, 2)), rng.standard_normal(2))
    x = rng.standard_normal((2, 5, 4, 3))
    want = jax.lax.conv_general_dilated(x, params.W, (1, 1), "SAME", None, None, _CONV_DN)
    assert_like(f(params, x), want + params.b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("f", [jaxlinear.embed, jaxlinear.dual_embed], ids=lambda f: f.__name__)
def test_embed_on_numpy_inputs(f):
    rng = np.random.default_rng(22)
    table, ids = rng.standard_normal((6, 3)), np.array([[0, 5, 5], [2, 0, 1]])
    assert_like(f(table, ids), jnp.asarray(table)[ids])
    got = jax.grad(lambda t: jnp.sum(jnp.sin(f(t, ids))))(table)
    want = jax.grad(lambda t: jnp.sum(jnp.sin(jnp.asarray(t)[ids])))(table)
    assert_like(got, want)


def test_per_example_grad_norms_on_numpy_inputs():
    layers = [numpy_layer(23, (), 4, 5)[0], numpy_layer(24, (), 5, 2)[0]]
    x = np.random.default_rng(25).standard_normal((6, 4))

    def loss(layers, x):  # per-example losses, (n,)
        return jnp.sum(jaxlinear.mlp(layers, x, activation=jnp.tanh) ** 2, axis=-1)

    def one(layers, xi):
        return loss(layers, xi[None])[0]

    per_example = jax.vmap(jax.grad(one), in_axes=(None, 0))(layers, jnp.asarray(x))
    want = jnp.sqrt(
        sum(jnp.sum(g.reshape(6, -1) ** 2, axis=1) for g in jax.tree.leaves(per_example))
    )
    norms = jaxlinear.per_example_grad_norms(loss, layers, x)
    assert_like(norms, want, rtol=1e-5, atol=1e-6)
    for plan in ("vmap", "structural"):  # (float32 norms from float64 NumPy data)
        assert_like(jaxlinear.per_example_grad_norms(loss, layers, x, plan=plan), want,
                    rtol=1e-5, atol=1e-6)  # fmt: skip


def test_fsdp_linear_on_one_device():
    params, x = numpy_layer(26, (4,))
    mesh = jax.make_mesh((1,), ("data",))
    assert_like(jaxlinear.fsdp_linear(params, x, mesh=mesh), plain(params, x))


# -- optional libraries, params across libraries, dtype promotion ------------------------


def test_import_jaxlinear_imports_no_optional_library():
    for name in ("equinox", "flax", "optax", "torch"):
        assert name not in _IMPORTED_BY_JAXLINEAR, name


@pytest.mark.parametrize("f", LAYERS, ids=lambda f: f.__name__)
def test_flax_dicts_tuples_and_torch_state_dicts_on_numpy_inputs(f):
    params, x = numpy_layer(30)
    want = plain(params, x)
    assert_like(f({"kernel": params.W, "bias": params.b}, x), want)
    assert_like(f((params.W, params.b), x), want)
    torch_sd = {"weight": params.W.T, "bias": params.b}  # NumPy float64, (out, in)
    converted = jaxlinear.from_torch(torch_sd)
    assert converted.W.dtype == F32  # computed as JAX computes NumPy float64 here
    assert_like(f(converted, x), want)
    back = jaxlinear.to_torch(converted)
    np.testing.assert_allclose(back["weight"], params.W.T, rtol=1e-6)


@pytest.mark.parametrize("f", LAYERS, ids=lambda f: f.__name__)
def test_bfloat16_params_with_numpy_x_promote_like_plain(f):
    params, x = numpy_layer(31)
    params = jaxlinear.Params(*(jnp.asarray(a, jnp.bfloat16) for a in params))
    y, want = f(params, x), plain(params, x)
    assert y.dtype == want.dtype == F32
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
    grads = jax.grad(lambda p: jnp.sum(f(p, x)))(params)
    assert grads.W.dtype == grads.b.dtype == jnp.bfloat16


@pytest.mark.parametrize("recipe", ["fp8_hybrid", "int8"])
def test_quant_on_numpy_inputs(recipe):
    """``quant=`` on NumPy float64 inputs with x64 off: float32 results and gradients (the
    params' dtype as JAX gives it), near plain ``x @ W + b`` (a few % for fp8), no warning."""
    params, x = numpy_layer(0, lead=(6,), d_in=8, d_out=4)
    y = jaxlinear.linear(params, x, quant=recipe)
    ref = plain(params, x)
    assert y.dtype == F32
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=0.1 * float(jnp.abs(ref).max()))
    g = jax.grad(lambda p: jnp.sum(jaxlinear.conv(p, x[None, :, :], quant=recipe)))(
        jaxlinear.Params(np.ones((3, 8, 2)), np.zeros(2))
    )
    assert (g.W.dtype, g.b.dtype) == (F32, F32) and bool(jnp.all(jnp.isfinite(g.W)))
