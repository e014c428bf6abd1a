"""``jax.export`` of functions that take and return jaxlinear's pytrees (issue #30).

A training step on ``Params`` is exported, serialized, deserialized and called, with its
VJP (``vjp_order=1``); values and gradients against the same step run directly, and the
gradient against JAX's AD of plain ``x @ W + b``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jaxlinear
from tests.helpers import assert_trees_close, make_layer, reference


@pytest.mark.parametrize(
    "layer", [jaxlinear.linear, jaxlinear.dual_linear], ids=lambda f: f.__name__
)
def test_exported_training_step_and_its_vjp_round_trip(layer):
    params, x = make_layer(jax.random.key(0), (4,), 3, 2)
    y = jnp.asarray(np.random.default_rng(1).standard_normal((4, 2)))

    def loss(params, x, y):
        return jnp.sum((layer(params, x) - y) ** 2)

    def step(params, x, y):  # -> (Params, loss)
        value, grads = jax.value_and_grad(loss)(params, x, y)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), value

    exported = export.export(jax.jit(step))(params, x, y)
    restored = export.deserialize(exported.serialize(vjp_order=1))
    new, value = restored.call(params, x, y)
    assert isinstance(new, jaxlinear.Params)
    assert_trees_close((new, value), jax.jit(step)(params, x, y))
    # The VJP of the exported step, serialized with it: the gradient of the new loss value.
    grad = jax.grad(lambda p: restored.call(p, x, y)[1])(params)
    assert isinstance(grad, jaxlinear.Params)
    plain = jax.grad(lambda p: jnp.sum((reference(p, x) - y) ** 2))(params)
    assert_trees_close(grad, plain)


def test_adjoint_test_result_is_exportable():
    params, x = make_layer(jax.random.key(2), (3,), 2, 2, bias="none")
    u = jnp.ones((3, 2))

    def residual(W, x, u):  # J = x -> x W (the layer in x), Jᵀ = its pullback
        f = lambda v: jaxlinear.linear(jaxlinear.Params(W), v)  # noqa: E731
        return jaxlinear.adjoint_test(f, lambda u: jax.vjp(f, x)[1](u)[0], x, u)

    exported = export.export(jax.jit(residual))(params.W, x, u)
    got = export.deserialize(exported.serialize()).call(params.W, x, u)
    assert isinstance(got, jaxlinear.AdjointTestResult) and float(got.residual) < 1e-12
