"""Adjoint: the dot-product test ⟨u, J v⟩ = ⟨Jᵀ u, v⟩, and linear_transpose(pushforward)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jaxlinear
from demos._common import Context, affine, count_calls, normal_like
from jaxlinear._src import formulas


def run(ctx: Context):
    n, d_in, d_out = 6, 4, 3
    k_point, k_v, k_u = jax.random.split(jax.random.key(4), 3)
    X, W, b = normal_like(
        k_point, (jnp.zeros((n, d_in)), jnp.zeros((d_in, d_out)), jnp.zeros(d_out))
    )
    params = jaxlinear.Params(W, b)

    # At a fixed point (X, W, b) the pushforward J is a linear map from tangents
    # v = (dX, dW, db) to output tangents dY, and the pullback claims to be its transpose
    # Jᵀ. A linear map and its transpose satisfy, for *every* v and u,
    #     ⟨u, J v⟩ = ⟨Jᵀ u, v⟩       (⟨a, b⟩ = Σ a·b over all entries),
    # so two random vectors make a sharp test: a wrong transpose fails it by O(1).
    v = normal_like(k_v, (jaxlinear.Params(W, b), X))  # a tangent (dparams, dX)
    u = normal_like(k_u, jnp.zeros((n, d_out)))  # a cotangent, shaped like Y
    (dW, db), dX = v
    zero_W, zero_b = jnp.zeros_like(W), jnp.zeros_like(b)

    # The test is only as good as J: first, the pushforward is JAX's own JVP of the plain
    # map x @ W + b (an independent reference), so "Jᵀ" below means the true transpose.
    ctx.close(
        "jaxlinear.pushforward equals JAX's JVP of x @ W + b",
        jaxlinear.pushforward(params, X, v[0], v[1]),
        jax.jvp(affine, (X, W, b), (dX, dW, db))[1],
    )

    # One input at a time: J restricted to X, to W, to b; the matching part of the pullback.
    cases = {
        "X": (
            lambda dX: jaxlinear.pushforward(params, X, None, dX),
            lambda u: jaxlinear.pullback(params, X, u)[1],
            dX,
        ),
        "W": (
            lambda dW: jaxlinear.pushforward(params, X, jaxlinear.Params(dW, zero_b), None),
            lambda u: jaxlinear.pullback(params, X, u)[0].W,
            dW,
        ),
        "b": (
            lambda db: jaxlinear.pushforward(params, X, jaxlinear.Params(zero_W, db), None),
            lambda u: jaxlinear.pullback(params, X, u)[0].b,
            db,
        ),
        "(X, W, b) jointly": (
            lambda v: jaxlinear.pushforward(params, X, v[0], v[1]),
            lambda u: jaxlinear.pullback(params, X, u),
            v,
        ),
    }
    for name, (push, pull, v_part) in cases.items():
        t = jaxlinear.adjoint_test(push, pull, v_part, u)
        ctx.say(f"  w.r.t. {name}: ⟨u, Jv⟩ = {float(t.lhs):+.15f}, ⟨Jᵀu, v⟩ = {float(t.rhs):+.15f}")
        ctx.check(
            f"dot-product test w.r.t. {name} (float64)",
            t.residual <= 1e-13,
            residual=float(t.residual),
            tol=1e-13,
        )

    # The same test in float32 passes at float32's rounding level (about 1e-7), not 1e-15.
    params32, X32, v32 = jax.tree.map(lambda a: a.astype(jnp.float32), (params, X, v))
    t32 = jaxlinear.adjoint_test(
        lambda v: jaxlinear.pushforward(params32, X32, v[0], v[1]),
        lambda u: jaxlinear.pullback(params32, X32, u),
        v32,
        u.astype(jnp.float32),
    )
    ctx.check(
        "dot-product test jointly in float32: residual at float32 rounding",
        t32.residual <= 1e-5,
        residual=float(t32.residual),
        tol=1e-5,
    )

    # The test has teeth: a common slip, averaging over the batch instead of summing in
    # ∂L/∂b, is caught at once (the true transpose of "add db to every row" is the sum).
    t_bad = jaxlinear.adjoint_test(cases["b"][0], lambda u: jnp.mean(u, axis=0), db, u)
    ctx.say(f"  with db = mean(G) instead of Σ G: residual {float(t_bad.residual):.2f}")
    ctx.check("a wrong pullback (mean instead of sum) fails the test", t_bad.residual > 1e-3)

    # jax.linear_transpose builds the transpose of a linear function by itself, from the
    # operations inside it. jaxlinear.pushforward is plain jnp code (formulas.pushforward),
    # so JAX transposes its dot_generals on its own; our pullback is not involved
    # (formulas.pullback is never called), yet it lands on the same numbers.
    def J(v):
        return jaxlinear.pushforward(params, X, v[0], v[1])

    with count_calls(formulas, "pullback") as calls:
        (JT_u,) = jax.linear_transpose(J, v)(u)
    ctx.check("jax.linear_transpose(pushforward) did not call formulas.pullback", len(calls) == 0)

    # The reference for both: the pullback of the plain x @ W + b under JAX's own AD.
    dX_ref, dW_ref, db_ref = jax.vjp(affine, X, W, b)[1](u)
    reference = (jaxlinear.Params(dW_ref, db_ref), dX_ref)
    ctx.close(
        "jax.linear_transpose(jaxlinear.pushforward) equals the pullback of x @ W + b (JAX's AD)",
        JT_u,
        reference,
    )
    ctx.close(
        "jaxlinear.pullback equals the pullback of x @ W + b (JAX's AD)",
        jaxlinear.pullback(params, X, u),
        reference,
    )
    return ctx.checks
