"""Flax NNX through its own injection points: ``dot_general=`` and ``einsum_op=``.

Each module built with a jaxlinear op must give the values and gradients of the same
module with Flax's default (``lax.dot_general`` / ``jnp.einsum`` under JAX's AD), in
float64, and the explicit transposes must be what runs (counted at trace time).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlinear
from jaxlinear._src.ops.dot_general import DOT_GENERAL
from jaxlinear._src.ops.einsum import EINSUM
from tests.helpers import assert_trees_close

nnx = pytest.importorskip("flax.nnx")

F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _value_and_grads(model, x):
    """``(y, ∂loss/∂params, ∂loss/∂x)`` of a non-quadratic loss, under one jit."""

    @nnx.jit
    def run(model, x):
        def loss(model, x):
            return jnp.sum(jnp.sin(model(x)))

        return model(x), nnx.grad(loss, argnums=(0, 1))(model, x)

    y, (g_model, g_x) = run(model, x)
    return y, nnx.state(g_model), g_x


@pytest.fixture
def counted(monkeypatch):
    """Record each call of the ops' transposes (at trace time)."""
    calls = []
    for op in (DOT_GENERAL, EINSUM):
        for name in ("transpose_x", "transpose_w"):
            original = getattr(op, name)

            def wrapper(*a, _original=original, _tag=f"{op.name}.{name}", **k):
                calls.append(_tag)
                return _original(*a, **k)

            monkeypatch.setattr(op, name, wrapper)
    return calls


MODULES = {
    "Linear": (
        lambda rngs, **kw: nnx.Linear(3, 3, rngs=rngs, **F64, **kw),
        "dot_general",
        (2, 3),
    ),
    "LinearGeneral": (
        lambda rngs, **kw: nnx.LinearGeneral((3, 2), (2, 3), axis=(-2, -1), rngs=rngs, **F64, **kw),
        "dot_general",
        (3, 3, 2),
    ),
    "Einsum": (
        lambda rngs, **kw: nnx.Einsum("btd,dhk->bthk", (3, 2, 3), (2, 3), rngs=rngs, **F64, **kw),
        "einsum_op",
        (2, 3, 3),
    ),
}


@pytest.mark.parametrize("name", MODULES)
def test_drop_in_matches_flax_default_and_runs_our_rule(name, counted):
    make, keyword, x_shape = MODULES[name]
    op = jaxlinear.einsum if keyword == "einsum_op" else jaxlinear.dot_general
    x = _x(x_shape)
    ours = _value_and_grads(make(nnx.Rngs(0), **{keyword: op}), x)
    assert sorted(set(counted)) == [f"{'einsum' if keyword == 'einsum_op' else 'dot_general'}"
                                    f".transpose_{s}" for s in "wx"]  # fmt: skip
    assert_trees_close(ours, _value_and_grads(make(nnx.Rngs(0)), x))


def test_dual_dot_general_gives_forward_mode_through_nnx_linear():
    ours = nnx.Linear(3, 2, rngs=nnx.Rngs(1), dot_general=jaxlinear.dual_dot_general, **F64)
    ref = nnx.Linear(3, 2, rngs=nnx.Rngs(1), **F64)
    x, t = _x((4, 3)), _x((4, 3), seed=1)
    assert_trees_close(jax.jvp(ours, (x,), (t,)), jax.jvp(ref, (x,), (t,)))
    jac = jax.jacfwd(lambda x: ours(x))(x)
    assert_trees_close(jac, jax.jacfwd(lambda x: ref(x))(x))


def test_einsum_preferred_element_type_passes_through():
    m = nnx.Einsum(
        "td,dk->tk",
        (3, 2),
        rngs=nnx.Rngs(0),
        einsum_op=jaxlinear.einsum,
        dtype=jnp.bfloat16,
        preferred_element_type=jnp.float32,
    )
    assert m(_x((2, 3)).astype(jnp.float32)).dtype == jnp.float32
