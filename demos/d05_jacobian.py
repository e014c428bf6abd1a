"""Jacobian: ∂Y/∂X is block diagonal with every block Wᵀ; ∂Y/∂W = X ⊗ I; ∂Y/∂b = 1 ⊗ I."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxlinear
from demos._common import Context, affine, normal_like


def run(ctx: Context):
    n, d_in, d_out = 4, 3, 5
    X, W, b = normal_like(
        jax.random.key(5), (jnp.zeros((n, d_in)), jnp.zeros((d_in, d_out)), jnp.zeros(d_out))
    )
    params = jaxlinear.Params(W, b)

    # jax.jacrev materializes the whole Jacobian of the plain map, one row per output
    # entry: ∂Y/∂X has one axis pair for Y (n, d_out) and one for X (n, d_in).
    J_X, J_W, J_b = jax.jacrev(affine, argnums=(0, 1, 2))(X, W, b)
    ctx.say(f"  ∂Y/∂X {J_X.shape}, ∂Y/∂W {J_W.shape}, ∂Y/∂b {J_b.shape}")
    ctx.check("∂Y/∂X has shape (n, d_out, n, d_in)", J_X.shape == (n, d_out, n, d_in))

    # Flattened to a matrix, (n·d_out) × (n·d_in), row (i, k) holds ∂Y[i, k] / ∂X[j, l].
    # Row i of Y depends only on row i of X, through Y_i = X_i W + b, so the matrix is
    # block diagonal: n blocks of shape (d_out, d_in), each Wᵀ, and exact zeros elsewhere.
    M_X = J_X.reshape(n * d_out, n * d_in)
    diagonal = jnp.stack([J_X[i, :, i, :] for i in range(n)])  # (n, d_out, d_in)
    off_diagonal = jnp.where(jnp.kron(jnp.eye(n), jnp.ones((d_out, d_in))) == 1, 0.0, M_X)
    ctx.close(
        "every diagonal block ∂Y_i/∂X_i is Wᵀ",
        diagonal,
        jnp.broadcast_to(W.T, (n, d_out, d_in)),
        tol=0,
    )
    ctx.close("every off-diagonal block is exactly zero", off_diagonal, jnp.zeros_like(M_X), tol=0)
    ctx.close("so ∂Y/∂X = I_n ⊗ Wᵀ (Kronecker product)", M_X, jnp.kron(jnp.eye(n), W.T), tol=0)

    # ∂Y[i, k] / ∂W[j, l] = X[i, j] when k = l, else 0: row block i is
    # [X[i, 0] I, X[i, 1] I, ...], built from row i of X. As a matrix, X ⊗ I_{d_out}.
    M_W = J_W.reshape(n * d_out, d_in * d_out)
    ctx.close(
        "∂Y/∂W = X ⊗ I_d_out: row block i built from row i of X",
        M_W,
        jnp.kron(X, jnp.eye(d_out)),
        tol=0,
    )

    # ∂Y[i, k] / ∂b[l] = 1 when k = l: the identity, once per example (b is broadcast).
    M_b = J_b.reshape(n * d_out, d_out)
    ctx.close(
        "∂Y/∂b = 1_n ⊗ I_d_out: an identity per example",
        M_b,
        jnp.kron(jnp.ones((n, 1)), jnp.eye(d_out)),
        tol=0,
    )

    # Forward mode builds the same matrix one column at a time.
    jf = jax.jacfwd(affine, argnums=(0, 1, 2))(X, W, b)
    ctx.close("jax.jacfwd equals jax.jacrev on the reference (X, W and b)", jf, (J_X, J_W, J_b))

    # The library's dense Jacobian (built from formulas.pushforward/pullback) agrees ...
    for wrt, J_ref in (("x", J_X), ("W", J_W), ("b", J_b)):
        ctx.close(
            f"jaxlinear.dense_jacobian(wrt={wrt!r}) equals jax.jacrev",
            jaxlinear.dense_jacobian(params, X, wrt=wrt),
            J_ref,
        )
    # ... and jacobian_blocks keeps only the n diagonal blocks.
    blocks = jaxlinear.jacobian_blocks(params, X)
    ctx.close(
        "jaxlinear.jacobian_blocks equals the diagonal blocks of jax.jacrev", blocks, diagonal
    )
    ctx.say(
        f"  dense ∂Y/∂X: n²·d_out·d_in = {M_X.size} numbers; blocks: n·d_out·d_in = {blocks.size}"
        f" ({M_X.size // blocks.size}× fewer; for this layer all n blocks are the same Wᵀ)"
    )
    ctx.check("jacobian_blocks holds n times fewer numbers", M_X.size == n * blocks.size)

    # At a realistic size the dense Jacobian cannot exist: n = 64, d_in = d_out = 4096 in
    # float32 is 64·4096 × 64·4096 = 68.7 billion entries, 256 GiB. dense_jacobian checks
    # the shapes before allocating anything, so abstract shapes are enough to ask.
    S = jax.ShapeDtypeStruct
    big_params = jaxlinear.Params(S((4096, 4096), jnp.float32), S((4096,), jnp.float32))
    big_x = S((64, 4096), jnp.float32)
    ctx.raises(
        "dense_jacobian refuses n=64, d=4096: 68,719,476,736 entries",
        ValueError,
        lambda: jaxlinear.dense_jacobian(big_params, big_x),
        match="68,719,476,736 (68.7 billion) entries, 256 GiB in float32",
    )

    if ctx.plots:
        _figure(ctx, n, d_in, d_out, M_X, M_W, M_b)
    return ctx.checks


def _figure(ctx: Context, n, d_in, d_out, M_X, M_W, M_b):
    plt = ctx.pyplot()
    panels = [
        (
            M_X,
            r"$\partial Y/\partial X = I_n \otimes W^\top$",
            d_out,
            d_in,
            r"$(j, l)$: example, input",
        ),
        (
            M_W,
            r"$\partial Y/\partial W = X \otimes I$",
            d_out,
            d_out,
            r"$(j, l)$: row, column of $W$",
        ),
        (M_b, r"$\partial Y/\partial b = 1_n \otimes I$", d_out, d_out, r"$l$: entry of $b$"),
    ]
    widths = [M.shape[1] for M, *_ in panels]
    fig, axes = plt.subplots(
        1, 3, figsize=(12, 5.6), gridspec_kw={"width_ratios": widths}, layout="constrained"
    )
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="white")  # exact zeros are masked: white
    vmax = max(float(jnp.max(jnp.abs(M))) for M, *_ in panels)
    for ax, (M, title, row_block, col_block, xlabel) in zip(axes, panels, strict=True):
        M = np.asarray(M)
        image = ax.imshow(np.ma.masked_equal(M, 0.0), cmap=cmap, vmin=-vmax, vmax=vmax)
        for r in range(row_block, M.shape[0], row_block):
            ax.axhline(r - 0.5, color="0.3", lw=0.8)
        for c in range(col_block, M.shape[1], col_block):
            ax.axvline(c - 0.5, color="0.3", lw=0.8)
        ax.set_title(title + f"\n{M.shape[0]}×{M.shape[1]}")
        ax.set_xlabel("columns " + xlabel)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_ylabel(f"rows $(i, k)$: example $i$ of {n}, output $k$ of {d_out}")
    fig.colorbar(image, ax=axes, shrink=0.8, label="entry (white: exactly 0)")
    fig.suptitle(
        f"The dense Jacobians of $Y = XW + b$ for $n={n}$, $d_{{in}}={d_in}$, $d_{{out}}={d_out}$"
        " (lines: block borders)"
    )
    ctx.save(fig, "jacobian.png")
