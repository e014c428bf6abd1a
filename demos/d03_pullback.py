"""Pullback: jax.vjp of jaxlinear.linear returns G Wᵀ, Xᵀ G, Σ G, from the explicit rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jaxlinear
from demos._common import Context, affine, count_calls, normal_like
from jaxlinear._src import formulas


def run(ctx: Context):
    # A batch of sequences this time, X: (batch, seq, d_in), to see the sums over *every*
    # leading axis.
    batch, seq, d_in, d_out = 2, 3, 4, 3
    k_point, k_g = jax.random.split(jax.random.key(3))
    X, W, b = normal_like(
        k_point, (jnp.zeros((batch, seq, d_in)), jnp.zeros((d_in, d_out)), jnp.zeros(d_out))
    )
    params = jaxlinear.Params(W, b)
    G = normal_like(k_g, jnp.zeros((batch, seq, d_out)))  # upstream gradient ∂L/∂Y

    # The pullback (VJP) runs backwards: given G = ∂L/∂Y, it returns ∂L/∂(X, W, b).
    #     ∂L/∂X = G Wᵀ        (batch, seq, d_out)(d_out, d_in) → (batch, seq, d_in)
    #     ∂L/∂W = Xᵀ G        summed over batch and seq       → (d_in, d_out)
    #     ∂L/∂b = Σ G         summed over batch and seq       → (d_out,)
    # jax.vjp returns Y and a function that applies the pullback to any G.
    Y, vjp_fn = jax.vjp(jaxlinear.linear, params, X)
    dparams, dX = vjp_fn(G)
    ctx.say(
        f"  dX {dX.shape}, dW {dparams.W.shape}, db {dparams.b.shape}"
        f" from X {X.shape}, W {W.shape}, G {G.shape}"
    )

    # The reference: JAX's own reverse mode on the plain expression.
    _, ref_vjp = jax.vjp(affine, X, W, b)
    dX_ref, dW_ref, db_ref = ref_vjp(G)
    ctx.close("∂L/∂X from jax.vjp(linear) equals the reference", dX, dX_ref)
    ctx.close("∂L/∂W from jax.vjp(linear) equals the reference", dparams.W, dW_ref)
    ctx.close("∂L/∂b from jax.vjp(linear) equals the reference", dparams.b, db_ref)

    # The formulas, written out with einsum so every index is visible, against the same
    # reference (b: batch, s: seq, i: d_in, o: d_out):
    ctx.close("G Wᵀ = einsum('bso,io->bsi')", jnp.einsum("bso,io->bsi", G, W), dX_ref)
    ctx.close(
        "Xᵀ G = Σ_(b,s) x_bs g_bsᵀ, a sum of outer products",
        jnp.einsum("bsi,bso->io", X, G),
        dW_ref,
    )
    ctx.close("Σ G over batch and seq", G.sum(axis=(0, 1)), db_ref)

    # Which rule ran? jaxlinear.linear is a jax.custom_vjp whose backward function is
    # formulas.pullback. Count its calls: none while the forward pass runs, one each
    # time the backward function is applied.
    with count_calls(formulas, "pullback") as calls:
        _, vjp_fn = jax.vjp(jaxlinear.linear, params, X)
        after_forward = len(calls)
        vjp_fn(G)
        after_backward = len(calls)
    ctx.say(
        f"  formulas.pullback calls: {after_forward} after the forward,"
        f" {after_backward} after the backward"
    )
    ctx.check("formulas.pullback did not run in the forward pass", after_forward == 0)
    ctx.check("formulas.pullback ran once in the backward pass", after_backward == 1)

    # Under jit the rule is traced once into the compiled program: a second call of the
    # compiled gradient does not call Python at all.
    grad_fn = jax.jit(jax.grad(lambda p, X: jnp.sum(G * jaxlinear.linear(p, X)), argnums=(0, 1)))
    with count_calls(formulas, "pullback") as calls:
        first = grad_fn(params, X)
        second = grad_fn(params, X)
    ctx.check("under jit, one trace of formulas.pullback serves every call", len(calls) == 1)
    ctx.close(
        "  and the jitted gradient equals the reference",
        first,
        (jaxlinear.Params(dW_ref, db_ref), dX_ref),
    )
    del second

    # Stronger than counting: swap in a deliberately wrong rule (dW doubled) and the
    # gradient JAX returns changes with it. JAX is not differentiating the forward pass
    # itself; it runs our rule.
    original = formulas.pullback

    def doubled(*args, **kwargs):
        dx, dW, db = original(*args, **kwargs)
        return dx, 2 * dW, db

    formulas.pullback = doubled
    try:
        dparams_bad, _ = jax.vjp(jaxlinear.linear, params, X)[1](G)
    finally:
        formulas.pullback = original
    ctx.close(
        "with a sabotaged rule (dW doubled), jax.vjp returns 2 Xᵀ G", dparams_bad.W, 2 * dW_ref
    )

    # The jaxpr of the gradient shows the rule's shape trick: G is reshaped to
    # (batch·seq, d_out) and Xᵀ G is one 2-D contraction over that axis.
    jaxpr = jax.make_jaxpr(jax.grad(lambda p, X: jnp.sum(jaxlinear.linear(p, X))))(params, X)
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    for e in dots:
        shapes = " · ".join(str(v.aval.shape) for v in e.invars)
        ctx.say(f"  dot_general {shapes} contracting {e.params['dimension_numbers'][0]}")
    dW_dots = [e for e in dots if e.outvars[0].aval.shape == (d_in, d_out)]
    ctx.check(
        "in the jaxpr, dW is one dot_general of (batch·seq, d_in) and (batch·seq, d_out)",
        len(dW_dots) == 1
        and [v.aval.shape for v in dW_dots[0].invars]
        == [(batch * seq, d_in), (batch * seq, d_out)],
    )
    ctx.close("  (and Y itself is X W + b)", Y, affine(X, W, b))
    return ctx.checks
