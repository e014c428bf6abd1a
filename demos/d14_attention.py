"""Attention: O = softmax(QKᵀ/√d) V backpropagated by hand; the softmax Jacobian; a causal mask."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

import jaxlinear
from demos._common import Context, affine, fmt_shape, matrix_figure


def run(ctx: Context):
    B, n, d_model, d = 2, 5, 6, 4  # batch, tokens, model width, head width
    rng = np.random.default_rng(14)  # NumPy's generator: data needs no compiled kernels

    def normal(*shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape))  # float64

    # Four projections, each a jaxlinear layer: W_q, W_k, W_v: (d_model, d), W_o: (d, d_model).
    # Weights scaled by 1/√fan_in and non-zero biases, so no gradient hides behind a zero.
    shapes = {"q": (d_model, d), "k": (d_model, d), "v": (d_model, d), "o": (d, d_model)}
    params = {
        name: jaxlinear.Params(normal(*shape, scale=shape[0] ** -0.5), normal(shape[1], scale=0.1))
        for name, shape in shapes.items()
    }
    X = normal(B, n, d_model)  # (B, n, d_model)
    T = normal(B, n, d_model)  # a target, for L = ½‖Y − T‖²
    # A mask says which keys each query may see: everything (no mask), or, causal, the
    # keys s ≤ t for query t. Both are (1, n, n) boolean arrays, so one compiled program
    # serves both.
    full = np.ones((1, n, n), bool)
    causal = np.tril(full)

    # The forward pass. The four projections are the linear layers; the two products
    # around the softmax are bilinear maps of the *activations* (no weights), written
    # as einsums: S = Q Kᵀ/√d and O = P V.
    def forward(params, X, mask):
        Q = jaxlinear.linear(params["q"], X)  # (B, n, d_model) @ (d_model, d) -> (B, n, d)
        K = jaxlinear.linear(params["k"], X)
        V = jaxlinear.linear(params["v"], X)
        S = jnp.einsum("bqd,bkd->bqk", Q, K) / math.sqrt(d)  # (B, n, n) scores
        # Masked scores become −∞, so exp(−∞) = 0 in the softmax.
        P = jax.nn.softmax(jnp.where(mask, S, -jnp.inf), axis=-1)  # (B, n, n), rows sum to 1
        O = jnp.einsum("bqk,bkd->bqd", P, V)  # (B, n, n) @ (B, n, d) -> (B, n, d)
        Y = jaxlinear.linear(params["o"], O)  # (B, n, d) @ (d, d_model) -> (B, n, d_model)
        return Y, dict(Q=Q, K=K, V=V, S=S, P=P, O=O)

    # The reference: the same network in plain jnp (x @ W + b, no jaxlinear), under
    # JAX's own autodiff.
    def core(Q, K, V, mask):  # (B, n, d) × 3, (1, n, n) -> (B, n, d)
        S = jnp.where(mask, jnp.einsum("bqd,bkd->bqk", Q, K) / math.sqrt(d), -jnp.inf)
        return jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(S, axis=-1), V)

    def loss_ref(params, X, mask):
        p = {k: (v.W, v.b) for k, v in params.items()}
        O = core(*(affine(X, *p[k]) for k in "qkv"), mask)
        return 0.5 * jnp.sum((affine(O, *p["o"]) - T) ** 2)

    # The backward pass by hand. From G = ∂L/∂Y = Y − T:
    #   through W_o:   (dW_o, db_o), dO = pullback(W_o, O, G)       dO = G W_oᵀ
    #   O = P V:       dV = Pᵀ dO,   dP = dO Vᵀ                       (the two transposes)
    #   P = softmax S: dS = P ⊙ (dP − rowsum(dP ⊙ P))                 (see below)
    #   S = Q Kᵀ/√d:   dQ = dS K/√d, dK = dSᵀ Q/√d
    #   through W_q, W_k, W_v: one pullback each; X feeds all three, so dX is their sum.
    def backward(params, X, mask):
        Y, f = forward(params, X, mask)
        Q, K, V, P, O = f["Q"], f["K"], f["V"], f["P"], f["O"]
        G = Y - T  # (B, n, d_model)
        dp_o, dO = jaxlinear.pullback(params["o"], O, G)  # dO: (B, n, d)
        dV = jnp.einsum("bqk,bqd->bkd", P, dO)  # Pᵀ dO: (B, n, d)
        dP = jnp.einsum("bqd,bkd->bqk", dO, V)  # dO Vᵀ: (B, n, n)
        dS = P * (dP - jnp.sum(dP * P, axis=-1, keepdims=True))  # (B, n, n)
        dQ = jnp.einsum("bqk,bkd->bqd", dS, K) / math.sqrt(d)  # dS K/√d: (B, n, d)
        dK = jnp.einsum("bqk,bqd->bkd", dS, Q) / math.sqrt(d)  # dSᵀ Q/√d: (B, n, d)
        grads, dX = {"o": dp_o}, 0.0
        for name, dZ in (("q", dQ), ("k", dK), ("v", dV)):
            grads[name], dX_part = jaxlinear.pullback(params[name], X, dZ)
            dX = dX + dX_part
        return grads, dX, dict(f, Y=Y, dO=dO, dP=dP, dS=dS, dQ=dQ, dK=dK, dV=dV)

    # Everything runs jitted: one compiled program each instead of one per operation.
    # Results are then compared as NumPy arrays.
    backward = jax.jit(backward)
    grad_ref = jax.jit(jax.value_and_grad(loss_ref, argnums=(0, 1)))
    core_vjp = jax.jit(lambda Q, K, V, dO: jax.vjp(core, Q, K, V, full)[1](dO)[:3])
    grads, dX, h = backward(params, X, full)
    h = {k: np.asarray(v) for k, v in h.items()}
    loss_value, (ref_grads, ref_dX) = grad_ref(params, X, full)
    ctx.close(
        "loss: the jaxlinear network equals the plain one",
        0.5 * np.sum((h["Y"] - np.asarray(T)) ** 2),
        loss_value,
    )
    # First the core alone, (Q, K, V) -> O, against jax.vjp of the plain einsums.
    ctx.close(
        "dQ = dS K/√d, dK = dSᵀ Q/√d, dV = Pᵀ dO equal jax.vjp of the plain core",
        (h["dQ"], h["dK"], h["dV"]),
        core_vjp(h["Q"], h["K"], h["V"], h["dO"]),
        tol=1e-13,
    )
    for name in "qkvo":
        ctx.close(
            f"hand dW_{name}, db_{name} equal jax.grad of the plain network (float64)",
            grads[name],
            ref_grads[name],
            tol=1e-13,
        )
    ctx.close("hand dX (sum over the three projections) equals jax.grad", dX, ref_dX, tol=1e-13)

    # --- The softmax Jacobian. For one row, p = softmax(s) with p_i = e^{s_i} / Σ_j e^{s_j}:
    #   ∂p_i/∂s_j = p_i (δ_ij − p_j),  i.e.  J = diag(p) − p pᵀ.
    # It is symmetric, so its transpose (the pullback) is J itself: dS_row = J dP_row =
    # p ⊙ dP − p (pᵀ dP), the formula used above. Its rows sum to zero because Σ p_i = 1
    # whatever s is; its columns, because adding a constant to every score changes nothing.
    s, p = h["S"][0, 2], h["P"][0, 2]  # the scores and probabilities of one query, (n,)
    J = np.asarray(jax.jit(jax.jacrev(jax.nn.softmax))(s))  # (n, n), JAX's own AD of softmax
    diag_p, ppT = np.diag(p), np.outer(p, p)
    ctx.show("p = softmax(s)", p)
    ctx.close("jax.jacrev(softmax) = diag(p) − p pᵀ", J, diag_p - ppT, tol=1e-15)
    ctx.close("the softmax Jacobian is symmetric: J = Jᵀ", J, J.T, tol=1e-15)
    ctx.close("its rows sum to zero (Σ p = 1 for every s)", J.sum(axis=1), np.zeros(n), tol=1e-15)
    ctx.close(
        "its columns sum to zero (softmax(s + c) = softmax(s))",
        J.sum(axis=0),
        np.zeros(n),
        tol=1e-15,
    )
    eigenvalues = np.linalg.eigvalsh(J)
    ctx.show("eigenvalues of J", eigenvalues)
    ctx.check(
        "J is positive semidefinite, with exactly one zero eigenvalue (its null space: 1)",
        eigenvalues[0] > -1e-15 and abs(eigenvalues[0]) < 1e-15 and eigenvalues[1] > 1e-3,
        residual=float(abs(eigenvalues[0])),
        tol=1e-15,
    )
    ctx.close(
        "the hand dS row equals J dP (J is the row's pullback)",
        h["dS"][0, 2],
        J @ h["dP"][0, 2],
        tol=1e-15,
    )

    # --- A causal mask: the scores above the diagonal become −∞ before the softmax. Shapes
    # do not change (the mask removes nothing, it zeroes), masked probabilities are
    # exactly 0, and the same hand backward pass still equals jax.grad.
    grads_c, dX_c, hc = backward(params, X, causal)
    hc = {k: np.asarray(v) for k, v in hc.items()}
    above = ~causal[0]  # (n, n): True where s > t, the masked entries
    ctx.check(
        f"the causal mask keeps every shape: P {fmt_shape(hc['P'].shape)},"
        f" O {fmt_shape(hc['O'].shape)}, Y {fmt_shape(hc['Y'].shape)}",
        all(hc[k].shape == h[k].shape for k in "PSOY"),
    )
    ctx.close(
        "masked probabilities are exactly 0", hc["P"][:, above], np.zeros((B, above.sum())), tol=0
    )
    ctx.close("every row of the causal P still sums to 1", hc["P"].sum(-1), np.ones((B, n)))
    ctx.close(
        "with the mask, hand gradients (all of W, b and X) equal jax.grad",
        (grads_c, dX_c),
        grad_ref(params, X, causal)[1],
        tol=1e-13,
    )

    # Masked entries get zero gradient: ∂L/∂S is exactly 0 above the diagonal, in the hand
    # formula (P is 0 there) and in JAX's AD of the loss as a function of the raw scores.
    def loss_of_scores(S):  # (B, n, n) -> scalar
        P = jax.nn.softmax(jnp.where(causal, S, -jnp.inf), axis=-1)
        O = jnp.einsum("bqk,bkd->bqd", P, hc["V"])
        return 0.5 * jnp.sum((affine(O, params["o"].W, params["o"].b) - T) ** 2)

    dS_ref = np.asarray(jax.jit(jax.grad(loss_of_scores))(hc["S"]))
    ctx.close(
        "jax.grad w.r.t. the masked scores is exactly 0",
        dS_ref[:, above],
        np.zeros((B, above.sum())),
        tol=0,
    )
    ctx.close(
        "hand dS with the mask equals jax.grad w.r.t. the scores", hc["dS"], dS_ref, tol=1e-14
    )

    # So nothing flows from the future: output token t does not depend on input token s > t.
    # The Jacobian ∂Y_t/∂X_s (JAX's jacrev of the plain network, one sequence) is exactly 0
    # for s > t, and dense for s ≤ t.
    def causal_out(x):  # (n, d_model) -> (n, d_model)
        p = {k: (v.W, v.b) for k, v in params.items()}
        O = core(*(affine(x[None], *p[k]) for k in "qkv"), causal)[0]
        return affine(O, *p["o"])

    J_c = np.asarray(jax.jit(jax.jacrev(causal_out))(X[0]))  # (n, d_model, n, d_model)
    block_norms = np.sqrt(np.sum(J_c**2, axis=(1, 3)))  # (n, n): ‖∂Y_t/∂X_s‖
    ctx.show("‖∂Y_t/∂X_s‖ (row t, column s)", block_norms)
    ctx.close(
        "∂Y_t/∂X_s is exactly 0 for every future token s > t",
        block_norms[above],
        np.zeros(above.sum()),
        tol=0,
    )
    ctx.check("and non-zero for every s ≤ t", bool(np.all(block_norms[~above] > 0)))

    if ctx.plots:
        row_max, col_max = np.abs(J.sum(axis=1)).max(), np.abs(J.sum(axis=0)).max()
        fig = matrix_figure(
            ctx,
            [
                [("s (scores of one query)", s), "→", ("p = softmax(s)", p)],
                [("diag(p)", diag_p), "−", ("p pᵀ", ppT), "=", ("J = ∂p/∂s (symmetric)", J)],
                [
                    (f"J 1 (row sums, |·| ≤ {row_max:.0e})", np.round(J.sum(axis=1), 12) + 0.0),
                    " ",
                    (f"1ᵀ J (column sums, |·| ≤ {col_max:.0e})", np.round(J.sum(axis=0), 12) + 0.0),
                ],
            ],
            title="The softmax Jacobian J = diag(p) − p pᵀ: symmetric, rows and columns sum to 0",
            fmt="{:.2f}",
            cell=0.5,
        )
        ctx.save(fig, "softmax_jacobian.png")
    return ctx.checks
