"""Initialization schemes give the documented variances (a statistical check on many entries)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlinear

D_IN, D_OUT = 400, 300
VARIANCE = {
    "lecun_normal": 1 / D_IN,
    "lecun_uniform": 1 / D_IN,
    "he_normal": 2 / D_IN,
    "he_uniform": 2 / D_IN,
    "glorot_normal": 2 / (D_IN + D_OUT),
    "glorot_uniform": 2 / (D_IN + D_OUT),
    "xavier_normal": 2 / (D_IN + D_OUT),
    "xavier_uniform": 2 / (D_IN + D_OUT),
}


def test_every_scheme_is_covered():
    assert set(VARIANCE) == set(jaxlinear.SCHEMES)


@pytest.mark.parametrize("scheme", sorted(VARIANCE))
def test_variance(scheme):
    p = jaxlinear.init(jax.random.key(0), D_IN, D_OUT, scheme=scheme)
    assert p.W.shape == (D_IN, D_OUT) and p.W.dtype == jnp.float32
    assert p.b.shape == (D_OUT,) and not p.b.any()
    # 120 000 entries: the sample variance is within ~1% (4 sigma) of the true one.
    assert float(jnp.var(p.W)) == pytest.approx(VARIANCE[scheme], rel=0.03)
    assert abs(float(jnp.mean(p.W))) < 4 * (VARIANCE[scheme] / p.W.size) ** 0.5


def test_uniform_is_bounded_and_normal_is_truncated():
    u = jaxlinear.init(jax.random.key(1), D_IN, D_OUT, scheme="he_uniform").W
    assert float(jnp.max(jnp.abs(u))) <= (6 / D_IN) ** 0.5
    n = jaxlinear.init(jax.random.key(1), D_IN, D_OUT, scheme="lecun_normal").W
    assert float(jnp.max(jnp.abs(n))) <= 2 * (1 / D_IN) ** 0.5 / 0.8796  # truncated at 2 sigma


def test_options():
    p = jaxlinear.init(jax.random.key(2), 3, 2, bias=False, dtype=jnp.float64)
    assert p.b is None and p.W.dtype == jnp.float64
    ones = jaxlinear.init(jax.random.key(2), 3, 2, scheme=jax.nn.initializers.ones)
    assert jnp.array_equal(ones.W, jnp.ones((3, 2)))
    keys_differ = jaxlinear.init_mlp(jax.random.key(3), [4, 4, 4])
    assert not jnp.array_equal(keys_differ[0].W, keys_differ[1].W)


def test_integer_seed_is_jax_random_key():
    key = jax.random.key(7)
    assert jnp.array_equal(jaxlinear.init(7, 3, 2).W, jaxlinear.init(key, 3, 2).W)
    assert jnp.array_equal(jaxlinear.init(np.int32(7), 3, 2).W, jaxlinear.init(key, 3, 2).W)
    mlp, mlp_key = jaxlinear.init_mlp(7, [3, 2]), jaxlinear.init_mlp(key, [3, 2])
    assert all(jnp.array_equal(a.W, b.W) for a, b in zip(mlp, mlp_key, strict=True))
    conv = jaxlinear.init_conv(7, 3, 2, 4).W
    assert jnp.array_equal(conv, jaxlinear.init_conv(key, 3, 2, 4).W)
    raw = jax.random.PRNGKey(7)  # old-style uint32[2] keys still work
    assert jaxlinear.init(raw, 3, 2).W.shape == (3, 2)


@pytest.mark.parametrize(
    "fn", [lambda k: jaxlinear.init(k, 3, 2), lambda k: jaxlinear.init_mlp(k, [3, 2]),
           lambda k: jaxlinear.init_conv(k, 3, 2, 2)], ids=["init", "init_mlp", "init_conv"]
)  # fmt: skip
@pytest.mark.parametrize("key", [1.5, True, np.zeros(3)], ids=["float", "bool", "array"])
def test_bad_key(fn, key):
    with pytest.raises(TypeError, match=r"`key` must be a PRNG key such as jax.random.key\(0\)"):
        fn(key)
