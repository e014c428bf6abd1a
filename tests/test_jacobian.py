"""``dense_jacobian`` and ``jacobian_blocks`` against ``jax.jacrev`` of plain ``x @ W + b``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlinear


def _reference(x, W, b):
    """Plain ``x @ W + b`` (float64 under the test config), differentiated by JAX itself."""
    y = x @ W
    return y + b.reshape((1,) * (y.ndim - 1) + (-1,))


def _case(x_shape, d_out, seed=0, dtype=jnp.float64):
    kx, kw, kb = jax.random.split(jax.random.key(seed), 3)
    d_in = x_shape[-1]
    x = jax.random.normal(kx, x_shape, dtype)
    W = jax.random.normal(kw, (d_in, d_out), dtype)
    b = jax.random.normal(kb, (d_out,), dtype)
    return x, W, b


# x shapes with leading axes of every rank; (7,) with d_out=2 takes the pullback branch
# (fewer outputs than inputs), the others the pushforward branch.
SHAPES = {"2d": ((4, 3), 5), "3d": ((2, 3, 3), 4), "vector": ((7,), 2), "wide_out": ((2, 6), 1)}


@pytest.mark.parametrize("wrt", ["x", "W", "b"])
@pytest.mark.parametrize("case", sorted(SHAPES))
def test_dense_jacobian_matches_jacrev(case, wrt):
    x, W, b = _case(*SHAPES[case])
    argnum = {"x": 0, "W": 1, "b": 2}[wrt]
    # Each side as one jitted program (one compile, not one per op; the guard is static).
    expected = jax.jit(jax.jacrev(_reference, argnums=argnum))(x, W, b)
    dense = jax.jit(lambda p, x: jaxlinear.dense_jacobian(p, x, wrt=wrt))
    got = dense(jaxlinear.Params(W, b), x)
    assert got.shape == expected.shape == (*x.shape[:-1], W.shape[1], *(x, W, b)[argnum].shape)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("wrt", ["x", "W", "b"])
def test_dense_jacobian_dict_params_and_row_bias(wrt):
    x, W, b = _case((3, 4), 2)
    params = {"W": W, "b": b.reshape(1, 2)}
    got = jaxlinear.dense_jacobian(params, x, wrt=wrt)

    def f(x, W, b_row):
        return _reference(x, W, b_row.reshape(-1))

    argnum = {"x": 0, "W": 1, "b": 2}[wrt]
    expected = jax.jacrev(f, argnums=argnum)(x, W, params["b"])
    assert got.shape == expected.shape  # the row bias keeps its (1, d_out) shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-14)


def test_dense_jacobian_no_bias_and_float32_under_jit():
    x, W, _ = _case((3, 4), 2, dtype=jnp.float32)
    params = jaxlinear.Params(W, None)
    got = jax.jit(lambda p, x: jaxlinear.dense_jacobian(p, x))(params, x)
    assert got.dtype == jnp.float32
    expected = jax.jacrev(lambda x: x @ W)(x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_dense_jacobian_x_is_block_diagonal():
    x, W, b = _case((4, 3), 5)
    J = jaxlinear.dense_jacobian(jaxlinear.Params(W, b), x).reshape(4 * 5, 4 * 3)
    np.testing.assert_array_equal(J, np.kron(np.eye(4), W.T))


@pytest.mark.parametrize("x_shape", [(4, 3), (2, 3, 3), (3,)])
def test_jacobian_blocks_are_the_diagonal_of_jacrev(x_shape):
    x, W, b = _case(x_shape, 5)
    blocks = jaxlinear.jacobian_blocks(jaxlinear.Params(W, b), x)
    lead = x.shape[:-1]
    assert blocks.shape == (*lead, 5, x.shape[-1])
    n = int(np.prod(lead))
    dense = jax.jacrev(_reference)(x, W, b).reshape(n, 5, n, x.shape[-1])
    diagonal = np.stack([dense[i, :, i, :] for i in range(n)]).reshape(blocks.shape)
    np.testing.assert_allclose(blocks, diagonal, rtol=0, atol=1e-14)


def test_jacobian_blocks_pullback_branch():
    x, W, b = _case((3, 6), 2)  # d_out < d_in: built from formulas.pullback
    blocks = jaxlinear.jacobian_blocks(jaxlinear.Params(W, b), x)
    np.testing.assert_array_equal(blocks, np.broadcast_to(W.T, (3, 2, 6)))


def _big():
    S = jax.ShapeDtypeStruct
    params = jaxlinear.Params(S((4096, 4096), jnp.float32), S((4096,), jnp.float32))
    return params, S((64, 4096), jnp.float32)


def test_dense_jacobian_size_guard_message():
    params, x = _big()
    with pytest.raises(ValueError) as info:
        jaxlinear.dense_jacobian(params, x)
    message = str(info.value)
    assert message.startswith(
        "dense_jacobian: the Jacobian ∂Y/∂x would have shape (64, 4096, 64, 4096)"
    )
    assert "68,719,476,736 (68.7 billion) entries, 256 GiB in float32" in message
    assert "max_entries=67,108,864" in message
    assert "jacobian_blocks gives the n=64 diagonal blocks instead: 1,073,741,824" in message


def test_dense_jacobian_size_guard_other_wrt_and_limit():
    params, x = _big()
    with pytest.raises(ValueError, match=r"∂Y/∂W would have shape \(64, 4096, 4096, 4096\)"):
        jaxlinear.dense_jacobian(params, x, wrt="W")
    x_small, W, b = _case((2, 3), 4)
    p = jaxlinear.Params(W, b)
    with pytest.raises(
        ValueError, match=r"48 entries, 384 bytes in float64; the limit is max_entries=47\."
    ):
        jaxlinear.dense_jacobian(p, x_small, wrt="x", max_entries=47)
    assert jaxlinear.dense_jacobian(p, x_small, max_entries=48).shape == (2, 4, 2, 3)


def test_jacobian_blocks_size_guard():
    params, x = _big()
    with pytest.raises(
        ValueError,
        match=r"jacobian_blocks: the diagonal blocks of ∂Y/∂x would have shape \(64, 4096, 4096\):"
        r" 1,073,741,824 \(1\.1 billion\) entries, 4 GiB in float32",
    ):
        jaxlinear.jacobian_blocks(params, x)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, None])
def test_max_entries_must_be_a_positive_int(bad):
    x, W, b = _case((2, 3), 4)
    for fn in (jaxlinear.dense_jacobian, jaxlinear.jacobian_blocks):
        with pytest.raises(
            ValueError, match=f"{fn.__name__}: `max_entries` must be a positive int"
        ):
            fn(jaxlinear.Params(W, b), x, max_entries=bad)


def test_wrt_errors():
    x, W, b = _case((2, 3), 4)
    with pytest.raises(
        ValueError, match=r"dense_jacobian: `wrt` must be one of \('x', 'W', 'b'\), got 'w'"
    ):
        jaxlinear.dense_jacobian(jaxlinear.Params(W, b), x, wrt="w")
    with pytest.raises(ValueError, match=r"dense_jacobian: `wrt` is 'b' but `params` has no bias"):
        jaxlinear.dense_jacobian(jaxlinear.Params(W, None), x, wrt="b")


def test_layer_validation_names_the_function():
    x, W, b = _case((2, 3), 4)
    with pytest.raises(ValueError, match=r"dense_jacobian: `x` has last dim 2"):
        jaxlinear.dense_jacobian(jaxlinear.Params(W, b), x[:, :2])
    with pytest.raises(ValueError, match=r"jacobian_blocks: `x` has last dim 2"):
        jaxlinear.jacobian_blocks(jaxlinear.Params(W, b), x[:, :2])
    with pytest.raises(
        TypeError, match=r"dense_jacobian: `x` has dtype float32 but `W` has dtype float64"
    ):
        jaxlinear.dense_jacobian(jaxlinear.Params(W, b), x.astype(jnp.float32))
