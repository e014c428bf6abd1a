"""Forward mode through the two bindings: into linear it fails, into dual_linear it works."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jaxlinear
from demos._common import Context, affine, count_calls, normal_like, one_line
from jaxlinear._src import formulas


def run(ctx: Context):
    # jaxlinear binds the same three formulas to JAX twice:
    #   linear       a jax.custom_vjp: a forward function plus a *reverse* rule
    #                (formulas.pullback). JAX has no forward-mode rule for it and cannot
    #                make one from the reverse rule (that would need to transpose an
    #                arbitrary Python function), so forward mode applied to it (jvp,
    #                jacfwd, reverse-over-forward) raises an error.
    #   dual_linear  a primitive with a forward-mode rule (formulas.pushforward) and a
    #                transpose rule for it (formulas.pullback). JAX's reverse mode is
    #                "linearize, then transpose", so both modes, and any nesting, work.
    sizes, n = [3, 5, 2], 4
    k_layers, k_bias, k_data, k_v, k_g = jax.random.split(jax.random.key(10), 5)
    layers = jaxlinear.init_mlp(k_layers, sizes, dtype=jnp.float64)
    layers = [
        p._replace(b=0.1 * normal_like(k, p.b))
        for k, p in zip(jax.random.split(k_bias, 2), layers, strict=True)
    ]
    X, T = normal_like(k_data, (jnp.zeros((n, sizes[0])), jnp.zeros((n, sizes[-1]))))
    v = normal_like(k_v, layers)  # a direction in parameter space

    def loss(layer):
        """½ Σ (MLP(X) − T)², the MLP built from ``layer`` (linear or dual_linear)."""

        def L(layers):
            Y = jaxlinear.mlp(layers, X, activation=jnp.tanh, layer=layer)
            return 0.5 * jnp.sum((Y - T) ** 2)

        return L

    def loss_ref(layers):  # the same network in plain x @ W + b, for JAX's own AD
        h = X
        for i, p in enumerate(layers):
            h = affine(h, p.W, p.b)
            h = jnp.tanh(h) if i < len(layers) - 1 else h
        return 0.5 * jnp.sum((h - T) ** 2)

    # 1. A Hessian-vector product H v, two ways. First reverse-over-forward: the gradient
    # of the directional derivative ⟨∇L, v⟩, computed by jax.jvp. Forward mode meets the
    # layer first, so through linear it fails.
    def hvp_rof(L):
        return jax.grad(lambda q: jax.jvp(L, (q,), (v,))[1])(layers)

    Hv_ref = hvp_rof(loss_ref)
    ctx.say("  1. Hessian-vector product, reverse-over-forward: grad of jvp")
    # JAX says so in one of two ways, depending on where forward mode meets the custom_vjp.
    no_forward_rule = ("can't apply forward-mode autodiff", "Differentiation rule for 'custom_lin'")
    try:
        hvp_rof(loss(jaxlinear.linear))
        error = None
    except (TypeError, NotImplementedError) as e:
        error = e
    ctx.check(
        "reverse-over-forward HVP through linear fails with JAX's no-forward-rule error",
        error is not None and any(phrase in str(error) for phrase in no_forward_rule),
    )
    if error is not None:
        ctx.say(f"         raises {one_line(error)}")
    with count_calls(formulas, "pushforward") as pushes, count_calls(formulas, "pullback") as pulls:
        Hv_dual = hvp_rof(loss(jaxlinear.dual_linear))
    ctx.say(
        f"  through dual_linear it ran formulas.pushforward {len(pushes)}×,"
        f" formulas.pullback {len(pulls)}×"
    )
    ctx.close(
        "reverse-over-forward HVP through dual_linear equals the plain network's", Hv_dual, Hv_ref
    )
    ctx.check("  and it ran the library's rules (pushforward and pullback)", pushes and pulls)
    # A finite difference of the reference gradient along v agrees too.
    eps = 1e-5
    grad_ref = jax.grad(loss_ref)
    shifted = [jax.tree.map(lambda p, d, s=s: p + s * eps * d, layers, v) for s in (1, -1)]
    fd = jax.tree.map(lambda a, c: (a - c) / (2 * eps), grad_ref(shifted[0]), grad_ref(shifted[1]))
    ctx.close("  and a central difference of the gradient along v", Hv_dual, fd, tol=1e-7)

    # Then forward-over-reverse: the JVP of the gradient. jax.hessian (jacfwd of jacrev)
    # is the same composition. Reverse mode meets the layer first and replaces the
    # custom_vjp by its forward function and its backward rule, both ordinary JAX code;
    # the outer forward mode then differentiates formulas.pullback itself. In JAX 0.10 and
    # 0.11 that works through linear too, without ever calling formulas.pushforward; the
    # check below fails if a JAX version refuses it (a change to document, not to hide).
    ctx.say("  1'. Hessian-vector product, forward-over-reverse: jvp of grad")

    def hvp_for(L):
        return jax.jvp(jax.grad(L), (layers,), (v,))[1]

    ctx.close(
        "forward-over-reverse HVP through dual_linear equals the reference",
        hvp_for(loss(jaxlinear.dual_linear)),
        Hv_ref,
    )
    claim = f"forward-over-reverse HVP through linear works (jax {jax.__version__})"
    try:
        with count_calls(formulas, "pushforward") as pushes:
            Hv_lin = hvp_for(loss(jaxlinear.linear))
    except (TypeError, NotImplementedError) as e:  # JAX changed: the claim above is false
        ctx.say(f"    this JAX ({jax.__version__}) refuses it: {one_line(e, 'raised')}")
        ctx.check(claim + f": refused ({type(e).__name__})", False)
    else:
        ctx.say(
            f"  through linear it ran formulas.pushforward {len(pushes)}×"
            " (JAX differentiated the pullback instead)"
        )
        ctx.close(claim + ", equals the reference", Hv_lin, Hv_ref)
        ctx.check("  and it never ran formulas.pushforward", len(pushes) == 0)

    # 2. The full Hessian in the first layer's bias, through dual_linear.
    ctx.say("  2. jax.hessian (jacfwd of jacrev) in the first layer's bias")

    def in_b1(L):
        return lambda b1: L([layers[0]._replace(b=b1), *layers[1:]])

    ctx.close(
        "jax.hessian through dual_linear equals the plain network's",
        jax.hessian(in_b1(loss(jaxlinear.dual_linear)))(layers[0].b),
        jax.hessian(in_b1(loss_ref))(layers[0].b),
    )

    ctx.say("  3. jax.jacfwd of one layer in its input")
    # 3. jacfwd of one layer with respect to its input: forward mode straight into the
    # layer. Through linear, JAX's TypeError; through dual_linear, its pushforward rule.
    p = layers[0]
    ctx.raises(
        "jax.jacfwd through linear raises TypeError",
        TypeError,
        lambda: jax.jacfwd(lambda X: jaxlinear.linear(p, X))(X),
        match="custom_vjp",
    )
    J_dual = jax.jacfwd(lambda X: jaxlinear.dual_linear(p, X))(X)
    ctx.close(
        "jax.jacfwd through dual_linear equals jacfwd of x @ W + b",
        J_dual,
        jax.jacfwd(lambda X: affine(X, p.W, p.b))(X),
    )
    # Reverse mode works through both bindings and they agree.
    ctx.close(
        "jax.jacrev through linear and through dual_linear agree with the reference",
        (
            jax.jacrev(lambda X: jaxlinear.linear(p, X))(X),
            jax.jacrev(lambda X: jaxlinear.dual_linear(p, X))(X),
        ),
        (jax.jacrev(lambda X: affine(X, p.W, p.b))(X),) * 2,
    )

    ctx.say("  4. jax.linear_transpose of the pushforward of dual_linear")
    # 4. jax.linear_transpose of dual_linear's pushforward. The pushforward (the JVP in the
    # tangent) is linear; transposing it is what reverse mode does, and for dual_linear
    # JAX uses the registered transpose rule: formulas.pullback.
    G = normal_like(k_g, jnp.zeros((n, sizes[1])))

    def push(dX, dW, db):  # tangents (dX, dW, db) -> dY at the point (X, W, b)
        return jax.jvp(jaxlinear.dual_linear, (p, X), (jaxlinear.Params(dW, db), dX))[1]

    with count_calls(formulas, "pullback") as calls:
        dX, dW, db = jax.linear_transpose(push, X, p.W, p.b)(G)
    ctx.say(
        f"  jax.linear_transpose(pushforward of dual_linear) called formulas.pullback {len(calls)}×"
    )
    ctx.check(
        "jax.linear_transpose landed on the explicit rule (formulas.pullback ran)", len(calls) >= 1
    )
    dX_ref, dW_ref, db_ref = jax.vjp(affine, X, p.W, p.b)[1](G)
    ctx.close(
        "  and equals the pullback of x @ W + b under JAX's AD",
        (dX, dW, db),
        (dX_ref, dW_ref, db_ref),
    )
    return ctx.checks
