"""Worked example: a 3×2 batch through a 2→2 layer, every number checked by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jaxlinear
from demos._common import Context, affine, fmt_shape, matrix_figure


def run(ctx: Context):
    # The layer is Y = X W + b: three examples (rows of X), two inputs, two outputs.
    X = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # (n, d_in) = (3, 2)
    W = jnp.array([[2.0, 1.0], [-1.0, 3.0]])  # (d_in, d_out) = (2, 2)
    b = jnp.array([0.5, -2.0])  # (d_out,) = (2,)
    params = jaxlinear.Params(W, b)
    n, (d_in, d_out) = X.shape[0], W.shape

    # Forward, by hand: row i of Y is (row i of X) · W + b.
    #   [1, 0] W = [ 2, 1]  -> + b = [ 2.5, -1]
    #   [0, 1] W = [-1, 3]  -> + b = [-0.5,  1]
    #   [1, 1] W = [ 1, 4]  -> + b = [ 1.5,  2]
    Y_hand = jnp.array([[2.5, -1.0], [-0.5, 1.0], [1.5, 2.0]])
    Y = jaxlinear.linear(params, X)
    ctx.show("Y", Y)
    ctx.close("forward: linear(params, X) equals the hand-worked Y", Y, Y_hand, tol=0)

    # Take the loss L = sum(Y). Its gradient with respect to Y, the upstream gradient G,
    # is all ones: nudging any entry of Y by ε moves L by ε.
    G = jnp.ones((n, d_out))  # (n, d_out)

    # The three gradients of the pullback, with their shapes:
    #   dL/dW = Xᵀ G : (d_in×n)(n×d_out) → (d_in×d_out). Entry (j, k) sums X[i, j] over the
    #           rows: column sums of X are [2, 2], so every entry is 2.
    #   dL/dX = G Wᵀ : (n×d_out)(d_out×d_in) → (n×d_in). Each row is the row sums of W,
    #           [2 + 1, -1 + 3] = [3, 2].
    #   dL/db = Σ_i G : (n×d_out) summed over n → (d_out). Three rows of ones: [3, 3].
    dW_hand = jnp.array([[2.0, 2.0], [2.0, 2.0]])
    dX_hand = jnp.array([[3.0, 2.0], [3.0, 2.0], [3.0, 2.0]])
    db_hand = jnp.array([3.0, 3.0])
    dparams, dX = jaxlinear.pullback(params, X, G)
    ctx.say(
        f"  dL/dW = Xᵀ G : (d_in×n)(n×d_out) → (d_in×d_out) = "
        f"{fmt_shape((d_in, n))}{fmt_shape((n, d_out))} → {fmt_shape(dparams.W.shape)}",
        f"  dL/dX = G Wᵀ : (n×d_out)(d_out×d_in) → (n×d_in)     = "
        f"{fmt_shape((n, d_out))}{fmt_shape((d_out, d_in))} → {fmt_shape(dX.shape)}",
        f"  dL/db = Σ G  : (n×d_out) summed over n → (d_out)    = "
        f"{fmt_shape((n, d_out))} → {fmt_shape(dparams.b.shape)}",
    )
    ctx.show("dL/dW", dparams.W)
    ctx.show("dL/dX", dX)
    ctx.show("dL/db", dparams.b)
    ctx.close("dL/dW = Xᵀ G = [[2, 2], [2, 2]] (by hand)", dparams.W, dW_hand, tol=0)
    ctx.close("dL/dX = G Wᵀ = [[3, 2]] × 3 rows (by hand)", dX, dX_hand, tol=0)
    ctx.close("dL/db = Σ G = [3, 3] (by hand)", dparams.b, db_hand, tol=0)

    # Cross-check with JAX's own autodiff of the plain expression x @ W + b (no jaxlinear).
    ref = jax.grad(lambda X, W, b: jnp.sum(affine(X, W, b)), argnums=(0, 1, 2))(X, W, b)
    ctx.close("jax.grad of sum(X @ W + b) agrees", (dX, dparams.W, dparams.b), ref)
    # ... and with jax.grad through jaxlinear.linear, which runs the explicit pullback.
    grads = jax.grad(lambda p, X: jnp.sum(jaxlinear.linear(p, X)), argnums=(0, 1))(params, X)
    ref_grads = (jaxlinear.Params(ref[1], ref[2]), ref[0])
    ctx.close("jax.grad through jaxlinear.linear agrees with it", grads, ref_grads)
    ctx.close(
        "  ... and with the hand-worked numbers",
        grads,
        (jaxlinear.Params(dW_hand, db_hand), dX_hand),
        tol=0,
    )

    # G = ones hides mistakes that swap rows for columns. Take a non-trivial G, with
    # L = Σ G ⊙ Y, whose gradient with respect to Y is exactly G:
    G2 = jnp.array([[1.0, -1.0], [0.0, 2.0], [3.0, 1.0]])  # (n, d_out)
    # By hand: Xᵀ G2 = [[1 + 0 + 3, -1 + 0 + 1], [0 + 0 + 3, 0 + 2 + 1]] = [[4, 0], [3, 3]]
    #          G2 Wᵀ : [1, -1] → [2 - 1, -1 - 3] = [1, -4];  [0, 2] → [2, 6];
    #                  [3, 1] → [6 + 1, -3 + 3] = [7, 0]
    #          Σ G2  = [4, 2]
    dparams2, dX2 = jaxlinear.pullback(params, X, G2)
    ctx.close(
        "with G ≠ ones: Xᵀ G = [[4, 0], [3, 3]] (by hand)",
        dparams2.W,
        jnp.array([[4.0, 0.0], [3.0, 3.0]]),
    )
    ctx.close(
        "with G ≠ ones: G Wᵀ = [[1, -4], [2, 6], [7, 0]] (by hand)",
        dX2,
        jnp.array([[1.0, -4.0], [2.0, 6.0], [7.0, 0.0]]),
    )
    ctx.close("with G ≠ ones: Σ G = [4, 2] (by hand)", dparams2.b, jnp.array([4.0, 2.0]))
    ref2 = jax.grad(lambda X, W, b: jnp.sum(G2 * affine(X, W, b)), argnums=(0, 1, 2))(X, W, b)
    ctx.close(
        "with G ≠ ones: jax.grad of sum(G ⊙ (X @ W + b)) agrees",
        (dX2, dparams2.W, dparams2.b),
        ref2,
    )

    # Finally a finite difference, which knows nothing about derivatives: nudge W[1, 0]
    # by ±ε and watch L = Σ G2 ⊙ Y move. L is linear in W, so the central difference is
    # exact up to rounding.
    eps = 1e-3
    nudge = jnp.zeros_like(W).at[1, 0].set(eps)

    def loss(W):
        return jnp.sum(G2 * jaxlinear.linear(jaxlinear.Params(W, b), X))

    fd = (loss(W + nudge) - loss(W - nudge)) / (2 * eps)
    ctx.close(
        "finite difference of L in W[1, 0] equals (Xᵀ G)[1, 0] = 3", fd, dparams2.W[1, 0], tol=1e-9
    )

    if ctx.plots:
        fig = matrix_figure(
            ctx,
            [
                [("X", X), "·", ("W", W), "+", ("b", b), "=", ("Y", Y)],
                [("Xᵀ", X.T), "·", ("G", G), "=", ("∂L/∂W", dparams.W)],
                [
                    ("G", G),
                    "·",
                    ("Wᵀ", W.T),
                    "=",
                    ("∂L/∂X", dX),
                    "   ",
                    ("G, rows summed", G),
                    "=",
                    ("∂L/∂b", dparams.b),
                ],
            ],
            title="Y = X W + b and its pullback for L = sum(Y), so G = ∂L/∂Y = ones",
        )
        ctx.save(fig, "worked_example.png")
    return ctx.checks
