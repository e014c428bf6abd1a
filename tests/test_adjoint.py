"""``adjoint_test``: the dot-product test passes for true transposes and catches wrong ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlinear


def _layer(seed=0, n=5, d_in=4, d_out=3, dtype=jnp.float64):
    kx, kw, kb, kdW, kdb, kdx, ku = jax.random.split(jax.random.key(seed), 7)
    x = jax.random.normal(kx, (n, d_in), dtype)
    params = jaxlinear.Params(
        jax.random.normal(kw, (d_in, d_out), dtype), jax.random.normal(kb, (d_out,), dtype)
    )
    v = (
        jaxlinear.Params(
            jax.random.normal(kdW, (d_in, d_out), dtype), jax.random.normal(kdb, (d_out,), dtype)
        ),
        jax.random.normal(kdx, (n, d_in), dtype),
    )
    u = jax.random.normal(ku, (n, d_out), dtype)
    return params, x, v, u


def _push(params, x):
    return lambda v: jaxlinear.pushforward(params, x, v[0], v[1])


def _pull(params, x):
    return lambda u: jaxlinear.pullback(params, x, u)


@pytest.mark.parametrize(("d_in", "d_out"), [(4, 3), (3, 3)], ids=["4x3", "square"])
@pytest.mark.parametrize(("dtype", "tol"), [(jnp.float64, 1e-13), (jnp.float32, 1e-5)])
def test_layer_pullback_passes(dtype, tol, d_in, d_out):
    params, x, v, u = _layer(dtype=dtype, d_in=d_in, d_out=d_out)
    t = jaxlinear.adjoint_test(_push(params, x), _pull(params, x), v, u)
    assert isinstance(t, jaxlinear.AdjointTestResult)
    assert t.lhs.shape == t.rhs.shape == t.residual.shape == ()
    assert float(t.residual) <= tol
    # lhs is computed independently of jaxlinear: Σ u ⊙ (dX W + X dW + db).
    (dW, db), dX = v
    lhs = np.sum(
        np.asarray(u)
        * (np.asarray(dX) @ np.asarray(params.W) + np.asarray(x) @ np.asarray(dW) + np.asarray(db))
    )
    np.testing.assert_allclose(float(t.lhs), lhs, rtol=1e-5 if dtype == jnp.float32 else 1e-12)


@pytest.mark.parametrize(
    "wrong",
    [
        lambda params, x, u: (params._replace(b=jnp.mean(u, axis=0)), u @ params.W.T),  # mean
        lambda params, x, u: (params._replace(W=2 * x.T @ u, b=u.sum(0)), u @ params.W.T),
        lambda params, x, u: (params._replace(W=x.T @ u, b=u.sum(0)), -(u @ params.W.T)),
    ],
    ids=["db_mean", "dW_doubled", "dx_sign"],
)
def test_wrong_pullbacks_fail(wrong):
    params, x, v, u = _layer()
    t = jaxlinear.adjoint_test(_push(params, x), lambda u: wrong(params, x, u), v, u)
    assert float(t.residual) > 1e-3


def test_square_W_missing_transpose_fails():
    # dX = G W instead of G Wᵀ: the same shape when W is square, so only values catch it.
    params, x, v, u = _layer(d_in=3, d_out=3)
    right = jaxlinear.adjoint_test(_push(params, x), _pull(params, x), v, u)
    wrong = jaxlinear.adjoint_test(
        _push(params, x), lambda u: (params._replace(W=x.T @ u, b=u.sum(0)), u @ params.W), v, u
    )
    assert float(right.residual) <= 1e-13
    assert float(wrong.residual) > 1e-3


def test_complex_uses_the_bilinear_pairing():
    kr, ki, kv, ku = jax.random.split(jax.random.key(1), 4)
    A = jax.random.normal(kr, (3, 4)) + 1j * jax.random.normal(ki, (3, 4))
    v = jax.random.normal(kv, (4,)) + 0j
    u = jax.random.normal(ku, (3,)) * (1 + 1j)
    transpose = jaxlinear.adjoint_test(lambda v: A @ v, lambda u: A.T @ u, v, u)
    assert float(transpose.residual) < 1e-14
    adjoint = jaxlinear.adjoint_test(lambda v: A @ v, lambda u: A.conj().T @ u, v, u)
    assert float(adjoint.residual) > 1e-3  # JAX pullbacks are transposes, not adjoints


def test_zero_vectors_give_zero_residual():
    params, x, v, u = _layer()
    zeros = jax.tree.map(jnp.zeros_like, v)
    t = jaxlinear.adjoint_test(_push(params, x), _pull(params, x), zeros, u)
    assert float(t.lhs) == float(t.rhs) == float(t.residual) == 0.0


def test_works_under_jit():
    params, x, v, u = _layer()
    residual = jax.jit(
        lambda p, x, v, u: jaxlinear.adjoint_test(_push(p, x), _pull(p, x), v, u).residual
    )(params, x, v, u)
    assert float(residual) <= 1e-13


def test_errors():
    params, x, v, u = _layer()
    push, pull = _push(params, x), _pull(params, x)
    with pytest.raises(TypeError, match="adjoint_test: `pushforward_fn` must be callable, got int"):
        jaxlinear.adjoint_test(1, pull, v, u)
    with pytest.raises(TypeError, match="adjoint_test: `pullback_fn` must be callable"):
        jaxlinear.adjoint_test(push, None, v, u)
    with pytest.raises(
        TypeError, match=r"adjoint_test: `u` must be a floating array, got dtype int"
    ):
        jaxlinear.adjoint_test(push, pull, v, jnp.ones((5, 3), jnp.int32))
    with pytest.raises(
        ValueError,
        match=r"adjoint_test: `pushforward_fn\(v\)` has shape \(5, 3\) but `u` has shape \(5, 2\)",
    ):
        jaxlinear.adjoint_test(push, pull, v, u[:, :2])
    with pytest.raises(ValueError, match=r"adjoint_test: `pullback_fn\(u\)` has pytree structure"):
        jaxlinear.adjoint_test(push, lambda u: pull(u)[1], v, u)
    with pytest.raises(
        ValueError,
        match=r"`pullback_fn\(u\)\[1\]` has shape \(5, 4\) but `v\[1\]` has shape \(4, 4\)",
    ):
        jaxlinear.adjoint_test(lambda v: push((v[0], jnp.ones((5, 4)))), pull, (v[0], v[1][:4]), u)
