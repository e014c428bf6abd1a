"""Initialization schemes give the documented variances (a statistical check on many entries)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
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
