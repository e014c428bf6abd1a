"""Batch norm: the backward pass by hand; mean subtraction I − 11ᵀ/n is its own adjoint."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxlinear
from demos._common import Context, affine


def run(ctx: Context):
    rng = np.random.default_rng(16)  # NumPy's generator: data needs no compiled kernels

    def normal(*shape, scale=1.0, mean=0.0):
        return jnp.asarray(mean + scale * rng.standard_normal(shape))  # float64

    # A linear layer followed by batch norm in training mode (statistics of the batch):
    #   Z = X W + b,  μ = mean(Z),  σ² = mean((Z − μ)²) + ε,  Ẑ = (Z − μ)/σ,  Y = γ ⊙ Ẑ + β,
    # every statistic per feature (column), over the n examples (rows).
    n, d_in, d, eps = 8, 3, 4, 1e-5
    params = jaxlinear.Params(normal(d_in, d), normal(d, scale=0.5))
    gamma, beta = normal(d, scale=0.3, mean=1.0), normal(d, scale=0.1)
    X, T = normal(n, d_in), normal(n, d)  # input; target for L = ½‖Y − T‖²

    def batchnorm(Z, gamma, beta, eps=eps):  # (n, d), (d,), (d,) -> (n, d)
        mu = jnp.mean(Z, axis=0, keepdims=True)  # (1, d)
        sigma = jnp.sqrt(jnp.mean((Z - mu) ** 2, axis=0, keepdims=True) + eps)  # (1, d)
        return gamma[None] * (Z - mu) / sigma + beta[None]

    def loss_ref(W, b, gamma, beta, X):  # plain jnp: affine, then batch norm
        return 0.5 * jnp.sum((batchnorm(affine(X, W, b), gamma, beta) - T) ** 2)

    # The backward pass by hand. With g = ∂L/∂Y (rows g_i) and the means over the batch:
    #   dβ = Σ_i g_i,   dγ = Σ_i g_i ⊙ ẑ_i,
    #   dZ = (γ/σ) ⊙ (g − mean(g) − Ẑ ⊙ mean(g ⊙ Ẑ)),
    # then the linear layer's pullback takes dZ to dW, db and dX. (Usually written dx, for
    # batch norm's input x; here that input is Z.)
    @jax.jit
    def backward(params, gamma, beta, X):
        Z = jaxlinear.linear(params, X)  # (n, d_in) @ (d_in, d) -> (n, d)
        mu = jnp.mean(Z, axis=0, keepdims=True)
        sigma = jnp.sqrt(jnp.mean((Z - mu) ** 2, axis=0, keepdims=True) + eps)  # (1, d)
        Z_hat = (Z - mu) / sigma  # (n, d)
        g = gamma[None] * Z_hat + beta[None] - T  # ∂L/∂Y: (n, d)
        d_beta, d_gamma = jnp.sum(g, axis=0), jnp.sum(g * Z_hat, axis=0)  # (d,), (d,)
        mean_g = jnp.mean(g, axis=0, keepdims=True)
        mean_g_zhat = jnp.mean(g * Z_hat, axis=0, keepdims=True)
        dZ = gamma[None] / sigma * (g - mean_g - Z_hat * mean_g_zhat)  # (n, d)
        d_params, dX = jaxlinear.pullback(params, X, dZ)
        return d_params, d_gamma, d_beta, dX, Z, Z_hat, dZ

    d_params, d_gamma, d_beta, dX, Z, Z_hat, dZ = backward(params, gamma, beta, X)
    grads = jax.jit(jax.grad(loss_ref, argnums=(0, 1, 2, 3, 4)))(params.W, params.b, gamma, beta, X)
    dW_ref, db_ref, d_gamma_ref, d_beta_ref, dX_ref = grads
    dZ_ref = jax.jit(jax.grad(lambda Z: 0.5 * jnp.sum((batchnorm(Z, gamma, beta) - T) ** 2)))(Z)
    ctx.close("hand dβ = Σ g equals jax.grad (float64)", d_beta, d_beta_ref, tol=1e-13)
    ctx.close("hand dγ = Σ g ⊙ ẑ equals jax.grad", d_gamma, d_gamma_ref, tol=1e-13)
    ctx.close("hand dZ = (γ/σ)(g − mean(g) − ẑ·mean(g ⊙ ẑ)) equals jax.grad", dZ, dZ_ref, tol=1e-13)
    ctx.close(
        "through the layer's pullback: dW and dX equal jax.grad",
        (d_params.W, dX),
        (dW_ref, dX_ref),
        tol=1e-13,
    )

    # dZ is orthogonal, column by column, to the constant vector 1: shifting a feature
    # changes nothing after normalization, so no gradient points that way. In particular
    # the bias b of the layer before batch norm gets no gradient at all (db = Σ dZ = 0):
    # batch norm's β replaces it. Scaling a feature is forgotten too, but only as ε → 0:
    # Σ_i dZ_i ẑ_i = (γ/σ)·dγ·(1 − mean(ẑ²)) = (γ/σ)·dγ·ε/σ², small but not zero.
    dZ_np, Z_hat_np = np.asarray(dZ), np.asarray(Z_hat)
    sigma = np.sqrt(np.var(np.asarray(Z), axis=0) + eps)  # (d,), NumPy's own statistics
    ctx.close(
        "every column of dZ sums to zero: 1ᵀ dZ = 0", dZ_np.sum(axis=0), np.zeros(d), tol=1e-14
    )
    along_z = np.sum(dZ_np * Z_hat_np, axis=0)
    ctx.say("  Σ_i dZ_i ẑ_i per feature: " + ", ".join(f"{a:.2e}" for a in along_z))
    ctx.close(
        "dZ's component along ẑ is (γ/σ)·dγ·ε/σ²: zero only when ε = 0",
        along_z,
        np.asarray(gamma) / sigma * np.asarray(d_gamma_ref) * eps / sigma**2,
        tol=1e-13,
    )
    ctx.close(
        "so the bias before batch norm gets zero gradient (hand)",
        d_params.b,
        np.zeros(d),
        tol=1e-14,
    )
    ctx.close("and jax.grad agrees: db = 0", db_ref, np.zeros(d), tol=1e-14)

    # --- Mean subtraction Z ↦ Z − mean(Z) is the linear map P = I − 11ᵀ/n on each column.
    # P is an orthogonal projection: P = Pᵀ (its own adjoint) and P² = P, P1 = 0. With n = 8
    # its entries 7/8 and −1/8 are exact binary numbers, so these hold exactly.
    def center(Z):  # (n, d) -> (n, d)
        return Z - jnp.mean(Z, axis=0, keepdims=True)

    P = np.asarray(jax.jit(jax.jacfwd(center))(Z)[:, 0, :, 0])  # ∂(center Z)[:, 0] / ∂Z[:, 0]
    ctx.show("P (materialized by jax.jacfwd, one column)", P)
    ones = np.ones((n, 1))
    ctx.close("jax.jacfwd(mean subtraction) = I − 11ᵀ/n", P, np.eye(n) - ones @ ones.T / n, tol=0)
    ctx.close("P is symmetric: Pᵀ = P", P.T, P, tol=0)
    ctx.close("P is a projection: P² = P", P @ P, P, tol=0)
    ctx.close("P removes constants: P 1 = 0", P @ ones, np.zeros((n, 1)), tol=0)

    # Without materializing anything: linearize the map at this batch and run jaxlinear's
    # dot-product test ⟨u, J v⟩ = ⟨Jᵀ u, v⟩ with the *pushforward itself* as the claimed
    # pullback. It passes: the linearized map is its own transpose. (Each test runs
    # jitted, linearization included.)
    v, u = normal(n, d), normal(n, d)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def dot_product_test(f, pullback, Z, v, u):
        """``adjoint_test`` of ``f``'s pushforward at ``Z`` against ``pullback``: "jvp"
        (itself) or "vjp" (JAX's own transpose)."""
        _, f_jvp = jax.linearize(f, Z)
        f_vjp = f_jvp if pullback == "jvp" else (lambda u: jax.vjp(f, Z)[1](u)[0])
        return jaxlinear.adjoint_test(f_jvp, f_vjp, v, u)

    t = dot_product_test(center, "jvp", Z, v, u)
    ctx.check(
        "dot-product test: the linearized mean subtraction is its own adjoint",
        t.residual <= 1e-14,
        residual=float(t.residual),
        tol=1e-14,
    )
    # The test has teeth: Z ↦ Z − Z[0] (subtract the first example) also removes
    # constants, but its matrix I − 1e₀ᵀ is not symmetric, and the same test fails.
    t_bad = dot_product_test(lambda Z: Z - Z[:1], "jvp", Z, v, u)
    ctx.say(f"  Z ↦ Z − Z[0] used as its own adjoint: residual {float(t_bad.residual):.2f}")
    ctx.check(
        "subtracting the first example instead is not self-adjoint: caught", t_bad.residual > 1e-2
    )

    # The whole of batch norm, linearized in Z at this batch, has the Jacobian
    #   J = (γ/σ)(I − 11ᵀ/n − ẑẑᵀ/n)   per column,
    # which is symmetric as well: the hand dZ above is J g, column by column. The
    # dot-product test of the pushforward against JAX's pullback (jax.vjp) passes, and so
    # does the pushforward against itself.
    def bn_of_Z(Z):
        return batchnorm(Z, gamma, beta)

    for claim, pullback in (
        ("dot-product test: batch norm's jvp and vjp are transposes", "vjp"),
        ("dot-product test: batch norm's jvp is its own transpose (symmetric J)", "jvp"),
    ):
        result = dot_product_test(bn_of_Z, pullback, Z, v, u)
        ctx.check(claim, result.residual <= 1e-13, residual=float(result.residual), tol=1e-13)
    J0 = np.asarray(jax.jit(jax.jacrev(bn_of_Z))(Z)[:, 0, :, 0])  # column 0: (n, n)
    z0, sigma0 = Z_hat_np[:, :1], float(np.sqrt(np.var(np.asarray(Z)[:, 0]) + eps))
    J0_hand = np.asarray(gamma)[0] / sigma0 * (np.eye(n) - ones @ ones.T / n - z0 @ z0.T / n)
    ctx.close("jax.jacrev(batch norm), column 0 = (γ/σ)(I − 11ᵀ/n − ẑẑᵀ/n)", J0, J0_hand, tol=1e-12)

    # With ε = 0, ‖ẑ‖² = n exactly, and I − 11ᵀ/n − ẑẑᵀ/n is itself a projection: it removes
    # from g its mean and its component along ẑ, the two directions normalization forgets.
    z0_exact = (np.asarray(Z)[:, :1] - np.asarray(Z)[:, :1].mean()) / np.asarray(Z)[:, :1].std()
    M = np.eye(n) - ones @ ones.T / n - z0_exact @ z0_exact.T / n
    ctx.close("with ε = 0, I − 11ᵀ/n − ẑẑᵀ/n is a projection (M² = M)", M @ M, M, tol=1e-14)
    return ctx.checks
