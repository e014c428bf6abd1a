"""Transpose chaining: backprop through a 3-layer MLP by hand, one pullback per layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jaxlinear
from demos._common import Context, affine, fmt_shape, normal_like


def run(ctx: Context):
    sizes = [4, 8, 6, 2]  # d_0 → d_1 → d_2 → d_3
    n = 5
    k_layers, k_bias, k_data = jax.random.split(jax.random.key(6), 3)
    layers = jaxlinear.init_mlp(k_layers, sizes, dtype=jnp.float64)
    # Non-zero biases, so a mistake in ∂L/∂b cannot hide behind zeros.
    layers = [
        p._replace(b=0.1 * normal_like(k, p.b))
        for k, p in zip(jax.random.split(k_bias, 3), layers, strict=True)
    ]
    X, T = normal_like(k_data, (jnp.zeros((n, sizes[0])), jnp.zeros((n, sizes[-1]))))

    # The network: Z1 = X W1 + b1, A1 = tanh(Z1), Z2 = A1 W2 + b2, A2 = tanh(Z2),
    # Y = A2 W3 + b3, and the loss L = ½ Σ (Y − T)².
    def loss(layers, X):
        Y = jaxlinear.mlp(layers, X, activation=jnp.tanh)
        return 0.5 * jnp.sum((Y - T) ** 2)

    # Forward, keeping what the backward pass needs: each layer's input.
    Z1 = jaxlinear.linear(layers[0], X)
    A1 = jnp.tanh(Z1)
    Z2 = jaxlinear.linear(layers[1], A1)
    A2 = jnp.tanh(Z2)
    Y = jaxlinear.linear(layers[2], A2)
    ctx.say(
        f"  forward: X {fmt_shape(X.shape)} → Z1, A1 {fmt_shape(A1.shape)}"
        f" → Z2, A2 {fmt_shape(A2.shape)} → Y {fmt_shape(Y.shape)}"
    )

    # Backward, by hand. Start with G = ∂L/∂Y = Y − T. Each layer's pullback turns the
    # gradient at its output into gradients for its parameters and for its input; the
    # input gradient, times the activation's derivative (tanh' = 1 − tanh²), becomes
    # the upstream gradient of the layer below.
    def report(k, inp, G, dp, d_inp):
        n_, d_in, d_out = inp.shape[0], *dp.W.shape
        a = "X" if k == 1 else f"A{k - 1}"
        ctx.say(
            f"  layer {k}: upstream G{k} {fmt_shape(G.shape)}",
            f"    dW{k} = {a}ᵀ G{k}  : {fmt_shape((d_in, n_))}{fmt_shape((n_, d_out))}"
            f" → {fmt_shape(dp.W.shape)}",
            f"    db{k} = Σ G{k}    : {fmt_shape(G.shape)} → {fmt_shape(dp.b.shape)}",
            f"    d{a} = G{k} W{k}ᵀ  : {fmt_shape(G.shape)}{fmt_shape((d_out, d_in))}"
            f" → {fmt_shape(d_inp.shape)}",
        )

    G3 = Y - T  # ∂L/∂Y: (n, d_3)
    dp3, dA2 = jaxlinear.pullback(layers[2], A2, G3)
    report(3, A2, G3, dp3, dA2)
    G2 = dA2 * (1 - A2**2)  # ∂L/∂Z2 = ∂L/∂A2 ⊙ tanh'(Z2): (n, d_2)
    ctx.say(f"    G2 = dA2 ⊙ (1 − A2²) : {fmt_shape(G2.shape)}")
    dp2, dA1 = jaxlinear.pullback(layers[1], A1, G2)
    report(2, A1, G2, dp2, dA1)
    G1 = dA1 * (1 - A1**2)  # ∂L/∂Z1 = ∂L/∂A1 ⊙ tanh'(Z1): (n, d_1)
    ctx.say(f"    G1 = dA1 ⊙ (1 − A1²) : {fmt_shape(G1.shape)}")
    dp1, dX = jaxlinear.pullback(layers[0], X, G1)
    report(1, X, G1, dp1, dX)

    # The reference: jax.grad of the same loss written with plain x @ W + b.
    def loss_ref(Ws, bs, X):
        h = X
        for i, (W, b) in enumerate(zip(Ws, bs, strict=True)):
            h = affine(h, W, b)
            if i < len(Ws) - 1:
                h = jnp.tanh(h)
        return 0.5 * jnp.sum((h - T) ** 2)

    Ws, bs = [p.W for p in layers], [p.b for p in layers]
    dWs, dbs, dX_ref = jax.grad(loss_ref, argnums=(0, 1, 2))(Ws, bs, X)
    ctx.close("loss: jaxlinear.mlp equals the plain network", loss(layers, X), loss_ref(Ws, bs, X))
    for i, dp in enumerate((dp1, dp2, dp3)):
        ctx.close(
            f"hand-chained dW{i + 1}, db{i + 1} equal jax.grad of the plain network",
            (dp.W, dp.b),
            (dWs[i], dbs[i]),
        )
    ctx.close("hand-chained dX equals jax.grad of the plain network", dX, dX_ref)

    # jax.grad through jaxlinear.mlp does this same chaining automatically.
    grads, dX_auto = jax.grad(loss, argnums=(0, 1))(layers, X)
    ref = [jaxlinear.Params(dW, db) for dW, db in zip(dWs, dbs, strict=True)]
    ctx.close(
        "jax.grad through jaxlinear.mlp does the same chaining", (grads, dX_auto), (ref, dX_ref)
    )
    return ctx.checks
