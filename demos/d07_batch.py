"""Batch aggregation: per-example gradients (vmap of grad) sum to the batch gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxlinear
from demos._common import Context, affine, matrix_figure, normal_like


def run(ctx: Context):
    n, d_in, d_out = 5, 3, 2
    k_point, k_data = jax.random.split(jax.random.key(7))
    W, b = normal_like(k_point, (jnp.zeros((d_in, d_out)), jnp.zeros(d_out)))
    params = jaxlinear.Params(W, b)
    X, T = normal_like(k_data, (jnp.zeros((n, d_in)), jnp.zeros((n, d_out))))

    # One example's loss: ℓ_i = ½ ‖x_i W + b − t_i‖², with x_i a single vector (d_in,).
    def loss_one(params, x, t):
        return 0.5 * jnp.sum((jaxlinear.linear(params, x) - t) ** 2)

    def loss_one_ref(W, b, x, t):
        return 0.5 * jnp.sum((affine(x, W, b) - t) ** 2)

    # jax.vmap(jax.grad(...)) gives one gradient per example, stacked on a new leading
    # axis: dW (n, d_in, d_out), db (n, d_out).
    per_example = jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0))(params, X, T)
    ref_W, ref_b = jax.vmap(jax.grad(loss_one_ref, argnums=(0, 1)), in_axes=(None, None, 0, 0))(
        W, b, X, T
    )
    ctx.say(f"  per-example dW {per_example.W.shape}, db {per_example.b.shape}")
    ctx.close(
        "per-example gradients equal vmap(grad) of the plain map",
        per_example,
        jaxlinear.Params(ref_W, ref_b),
    )

    # For one example, G is the single row g_i = y_i − t_i, and dW_i = x_iᵀ g_i is an outer
    # product: rank one. The batch dW = Xᵀ G = Σ_i x_iᵀ g_i adds up n of them.
    G = affine(X, W, b) - T  # (n, d_out), every example's upstream gradient
    ctx.close("dW_i = outer(x_i, g_i)", per_example.W, jnp.einsum("ni,no->nio", X, G))
    ranks = [int(np.linalg.matrix_rank(np.asarray(dW_i))) for dW_i in per_example.W]
    ctx.check(f"each dW_i has rank one (ranks {ranks})", all(r == 1 for r in ranks))
    ctx.close("db_i = g_i", per_example.b, G)

    # The batch loss L = Σ_i ℓ_i. Its gradient is the sum of the per-example gradients,
    # because the gradient is linear in the loss.
    def loss_sum(params, X):
        return 0.5 * jnp.sum((jaxlinear.linear(params, X) - T) ** 2)

    # Every check below compares jaxlinear with the plain map under JAX's AD (the reference),
    # never with another jaxlinear result.
    def ref_grad(loss_ref, X, T):
        return jaxlinear.Params(*jax.grad(loss_ref, argnums=(0, 1))(W, b, X, T))

    def loss_sum_ref(W, b, X, T):
        return 0.5 * jnp.sum((affine(X, W, b) - T) ** 2)

    def loss_mean_ref(W, b, X, T):
        return 0.5 * jnp.mean(jnp.sum((affine(X, W, b) - T) ** 2, axis=-1))

    batch = jax.grad(loss_sum)(params, X)
    summed = jax.tree.map(lambda g: g.sum(axis=0), per_example)
    ref_batch = ref_grad(loss_sum_ref, X, T)
    ctx.close("Σ_i per-example gradients = the batch gradient of the reference", summed, ref_batch)
    ctx.close("  and jaxlinear's batch gradient equals it", batch, ref_batch)
    # In particular db = Σ_i g_i: the bias is broadcast to every row, so its gradient
    # sums over the rows.
    ctx.close("batch db = Σ G over the examples", batch.b, G.sum(axis=0))

    # Averaging the loss, L = (1/n) Σ ℓ_i, divides every gradient by n: the mean of the
    # per-example gradients. The direction is the same; the scale no longer grows with the
    # batch, so a learning rate means the same thing at any batch size.
    def loss_mean(params, X, T):
        return 0.5 * jnp.mean(jnp.sum((jaxlinear.linear(params, X) - T) ** 2, axis=-1))

    mean_grad = jax.grad(loss_mean)(params, X, T)
    ctx.close(
        "mean loss: jaxlinear's gradient equals the reference's",
        mean_grad,
        ref_grad(loss_mean_ref, X, T),
    )
    ctx.close(
        "  which is the reference batch gradient / n",
        mean_grad,
        jax.tree.map(lambda g: g / n, ref_batch),
    )

    # Check that claim on a batch twice as large: the same examples, each twice.
    X2, T2 = jnp.concatenate([X, X]), jnp.concatenate([T, T])
    sum_twice = jax.grad(lambda p: 0.5 * jnp.sum((jaxlinear.linear(p, X2) - T2) ** 2))(params)
    ctx.close(
        "duplicated batch, summed loss: the gradient doubles (2 × the reference batch gradient)",
        sum_twice,
        jax.tree.map(lambda g: 2 * g, ref_batch),
    )
    ctx.close(
        "duplicated batch, mean loss: the gradient is unchanged (the reference mean gradient)",
        jax.grad(loss_mean)(params, X2, T2),
        ref_grad(loss_mean_ref, X, T),
    )

    if ctx.plots:
        row_W, row_b = [], []
        for i in range(n):
            row_W += [(f"dW_{i + 1}", per_example.W[i]), "+" if i < n - 1 else "="]
            row_b += [(f"db_{i + 1}", per_example.b[i]), "+" if i < n - 1 else "="]
        fig = matrix_figure(
            ctx,
            [[*row_W, ("dW = Xᵀ G", batch.W)], [*row_b, ("db = Σ G", batch.b)]],
            title="Per-example gradients (each dW_i = x_iᵀ g_i has rank one)"
            " add up to the batch gradient",
            fmt="{:.1f}",
            cell=0.5,
        )
        ctx.save(fig, "batch.png")
    return ctx.checks
