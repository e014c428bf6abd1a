"""Convolution: the Jacobian is a strided band; its transpose, a flipped kernel on a dilated G."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxlinear
from demos._common import Context, count_calls, matrix_figure
from jaxlinear._src.ops import conv as conv_module

NWC = ("NWC", "WIO", "NWC")  # batch, width, channels: one example, one channel in and out


def run(ctx: Context):
    # A 1-D convolution (a cross-correlation, as in every deep-learning library) of a signal
    # x of length n with a kernel w of length k, stride s, padding "SAME":
    #     y[i] = Σ_t x[s·i − lo + t] · w[t],  t = 0..k−1,
    # with lo the padding before (x is zero outside 0..n−1).
    n, k, s = 8, 3, 2
    w = jnp.array([1.0, -2.0, 3.0])  # small integers: the Jacobian is readable
    x = jax.random.normal(jax.random.key(12), (n,), jnp.float64)
    (lo, hi), = lax.padtype_to_pads((n,), (k,), (s,), "SAME")  # fmt: skip
    m = (n + lo + hi - k) // s + 1
    ctx.say(f"  n={n}, k={k}, stride s={s}, 'SAME' pads (lo, hi)=({lo}, {hi}) -> m={m} outputs")

    def conv_ref(x, w):  # the plain lax op; JAX differentiates it with its own rules
        return lax.conv_general_dilated(x[None, :, None], w[:, None, None], (s,), "SAME",
                                        dimension_numbers=NWC)[0, :, 0]  # fmt: skip

    def conv_ours(x, w, f=jaxlinear.dual_conv_general_dilated):
        return f(x[None, :, None], w[:, None, None], (s,), "SAME", dimension_numbers=NWC)[0, :, 0]

    ctx.close("conv_general_dilated equals lax.conv_general_dilated", conv_ours(x, w),
              conv_ref(x, w))  # fmt: skip

    # 1. The Jacobian ∂y/∂x is an m × n matrix: row i holds the kernel, starting at column
    # s·i − lo. Written out by hand:
    J_hand = np.zeros((m, n))
    for i in range(m):
        for t in range(k):
            j = s * i - lo + t
            if 0 <= j < n:
                J_hand[i, j] = w[t]
    J = jax.jacrev(conv_ref)(x, w)  # JAX's own AD, one row per output
    ctx.close("∂y/∂x (jax.jacrev of lax) is the strided band of w, by hand", J, J_hand, tol=0)
    ctx.close("jax.jacfwd of dual_conv_general_dilated (our JVP) gives the same matrix",
              jax.jacfwd(conv_ours)(x, w), J_hand, tol=0)  # fmt: skip
    # With stride 1 the band would be Toeplitz (constant along diagonals); with stride s each
    # row shifts by s columns: the Toeplitz matrix of the stride-1 conv, every s-th row kept.
    shifted = all(np.array_equal(J_hand[i + 1, s:], J_hand[i, :-s]) for i in range(m - 1))
    ctx.check("each row is the previous one shifted s columns (strided Toeplitz)", shifted)

    # 2. The pullback in x is Jᵀ g. Column j of Jᵀ g collects g[i]·w[j − s·i + lo]: place g
    # on a grid with s − 1 zeros between entries (input dilation s), convolve with w (a
    # correlation with the flipped kernel), and keep n entries starting at lo. NumPy:
    g = jax.random.normal(jax.random.key(13), (m,), jnp.float64)
    g_dilated = np.zeros((m - 1) * s + 1)
    g_dilated[::s] = g
    full = np.convolve(g_dilated, np.asarray(w), mode="full")  # flipped-kernel correlation
    full = np.pad(full, (0, max(0, lo + n - full.size)))
    x_bar_numpy = full[lo : lo + n]
    ctx.close("Jᵀ g = dilated g convolved with w (NumPy, by hand)", J.T @ g, x_bar_numpy)

    with count_calls(conv_module.CONV, "transpose_x") as calls:
        _, pull = jax.vjp(lambda x: conv_ours(x, w, jaxlinear.conv_general_dilated), x)
        (x_bar,) = pull(g)
    ctx.close("our pullback in x (conv.transpose_x) equals Jᵀ g", x_bar, J.T @ g)
    ctx.check("... and it is conv.transpose_x that ran", len(calls) == 1)
    # transpose_x is one lax conv: g with lhs_dilation=s, the flipped kernel, window stride 1,
    # padding k − 1 − lo before and whatever makes n outputs after.
    before = k - 1 - lo
    after = n + k - 1 - ((m - 1) * s + 1) - before
    flipped = lax.conv_general_dilated(g[None, :, None], w[::-1, None, None], (1,),
                                       ((before, after),), lhs_dilation=(s,),
                                       dimension_numbers=NWC)[0, :, 0]  # fmt: skip
    ctx.say(f"  x̄ = conv(g, flip(w)), lhs_dilation={s}, padding ({before}, {after})")
    ctx.close("Jᵀ g is the flipped-kernel conv with input dilation s", flipped, J.T @ g)

    def conv_transpose(g):  # JAX's transposed convolution, the kernel flipped for us
        y = lax.conv_transpose(
            g[None, :, None], w[:, None, None], (s,), "SAME", dimension_numbers=NWC,
            transpose_kernel=True,
        )  # fmt: skip
        return y[0, :, 0]

    transposed = conv_transpose(g)
    ctx.close("lax.conv_transpose(transpose_kernel=True) equals our pullback in x",
              transposed, x_bar)  # fmt: skip

    # 3. The pullback in w: w̄[t] = Σ_i g[i]·x[s·i − lo + t], a correlation of x with g
    # (JAX's rule: x and g convolved with their batch and feature axes swapped).
    x_pad = np.pad(np.asarray(x), (lo, hi + s))
    w_bar_numpy = np.array([sum(g[i] * x_pad[s * i + t] for i in range(m)) for t in range(k)])
    _, pull_w = jax.vjp(lambda w: conv_ours(x, w, jaxlinear.conv_general_dilated), w)
    ctx.close("our pullback in w (conv.transpose_w) is the correlation of x with g",
              pull_w(g)[0], w_bar_numpy)  # fmt: skip

    # 4. The dot-product test: ⟨g, J v⟩ = ⟨Jᵀ g, v⟩ for the pushforward and pullback in x.
    v = jax.random.normal(jax.random.key(14), (n,), jnp.float64)
    result = jaxlinear.adjoint_test(
        lambda v: jax.jvp(lambda x: conv_ours(x, w), (x,), (v,))[1], lambda g: pull(g)[0], v, g
    )
    ctx.check("adjoint test ⟨g, J v⟩ = ⟨Jᵀ g, v⟩", float(result.residual) < 1e-12,
              residual=float(result.residual), tol=1e-12)  # fmt: skip

    if ctx.plots:
        fig = matrix_figure(
            ctx,
            [[("J = ∂y/∂x", J_hand)], [("Jᵀ", J_hand.T), "=",
                                            ("lax.conv_transpose", jax.jacrev(conv_transpose)(g))]],
            title=f"1-D conv, k={k}, stride {s}, 'SAME': a strided band; its transpose",
        )  # fmt: skip
        ctx.save(fig, "conv_jacobian.png")
    return ctx.checks
