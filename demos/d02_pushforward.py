"""Pushforward: a tangent (dX, dW, db) goes forward as dY = dX W + X dW + db."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jaxlinear
from demos._common import Context, affine, normal_like


def run(ctx: Context):
    n, d_in, d_out = 4, 3, 5
    k_point, k_v, k_w = jax.random.split(jax.random.key(2), 3)
    X, W, b = normal_like(
        k_point, (jnp.zeros((n, d_in)), jnp.zeros((d_in, d_out)), jnp.zeros(d_out))
    )
    params = jaxlinear.Params(W, b)

    # A tangent is a direction in which to move every input at once: dX like X, dW like W,
    # db like b. The pushforward (JVP) says how fast Y moves when the inputs move that way:
    #     Y(X + t dX, W + t dW, b + t db) = Y + t (dX W + X dW + db) + t² dX dW,
    # so dY = dX W + X dW + db, the coefficient of t.
    dX, dW, db = normal_like(k_v, (X, W, b))

    # Which function do we hand to jax.jvp? Not jaxlinear.linear: it is a jax.custom_vjp,
    # which defines a reverse-mode rule only, and JAX refuses forward mode through it.
    ctx.say("  jax.jvp(jaxlinear.linear, ...):")
    ctx.raises(
        "jax.jvp through jaxlinear.linear (a custom_vjp) raises TypeError",
        TypeError,
        lambda: jax.jvp(lambda X: jaxlinear.linear(params, X), (X,), (dX,)),
        match="custom_vjp",
    )
    # So the reference is the plain expression x @ W + b under JAX's own forward mode.
    Y, dY = jax.jvp(affine, (X, W, b), (dX, dW, db))  # (n, d_out), (n, d_out)
    ctx.show("dY = jax.jvp(x @ W + b)", dY)

    # jaxlinear.pushforward is the formula dX W + X dW + db, written once in formulas.py.
    dY_rule = jaxlinear.pushforward(params, X, jaxlinear.Params(dW, db), dX)
    ctx.close("jaxlinear.pushforward equals jax.jvp of the plain map", dY_rule, dY)

    # Term by term: a zero tangent in two slots isolates the third.
    zeros = jax.tree.map(jnp.zeros_like, (dX, dW, db))
    _, dY_x = jax.jvp(affine, (X, W, b), (dX, zeros[1], zeros[2]))
    _, dY_W = jax.jvp(affine, (X, W, b), (zeros[0], dW, zeros[2]))
    _, dY_b = jax.jvp(affine, (X, W, b), (zeros[0], zeros[1], db))
    ctx.close("  the dX W term", jaxlinear.pushforward(params, X, None, dX), dY_x)
    ctx.close(
        "  the X dW term",
        jaxlinear.pushforward(params, X, jaxlinear.Params(dW, jnp.zeros_like(b)), None),
        dY_W,
    )
    # db is the same for every example: it is broadcast over the n rows.
    ctx.close(
        "  the db term (broadcast to every row)",
        jaxlinear.pushforward(params, X, jaxlinear.Params(jnp.zeros_like(W), db), None),
        dY_b,
    )

    # A finite difference knows nothing about derivatives. Y is quadratic in (X, W, b)
    # jointly (the t² dX dW term above), and a central difference cancels the t² term,
    # so it matches dY up to rounding.
    eps = 1e-4
    plus = affine(X + eps * dX, W + eps * dW, b + eps * db)
    minus = affine(X - eps * dX, W - eps * dW, b - eps * db)
    ctx.close("central finite difference equals dY", (plus - minus) / (2 * eps), dY_rule, tol=1e-9)

    # The pushforward is linear in the tangent: J(αv + βw) = α Jv + β Jw (the point
    # (X, W, b) stays fixed; only the direction changes).
    alpha, beta = 0.7, -2.5
    v = jaxlinear.Params(dW, db), dX
    w = normal_like(k_w, v)
    combo = jax.tree.map(lambda a, c: alpha * a + beta * c, v, w)

    def J(t):
        return jaxlinear.pushforward(params, X, t[0], t[1])

    ctx.close("linearity: J(αv + βw) = α Jv + β Jw", J(combo), alpha * J(v) + beta * J(w))

    # dual_linear is the binding with an explicit JVP rule (formulas.pushforward): with it
    # jax.jvp works directly on the library's layer.
    _, dY_dual = jax.jvp(
        lambda p, X: jaxlinear.dual_linear(p, X), (params, X), (jaxlinear.Params(dW, db), dX)
    )
    ctx.close("jax.jvp through jaxlinear.dual_linear equals the reference", dY_dual, dY)
    ctx.close("  ... and its primal output is X W + b", jaxlinear.dual_linear(params, X), Y)
    return ctx.checks
