"""Finite differences: the V curve of error against step size; a check that catches a bad rule."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

import jaxlinear
from demos._common import Context, affine


def run(ctx: Context):
    # --- The V curve. The central difference (f(x + h) − f(x − h)) / 2h has two errors:
    #   truncation: Taylor's theorem gives f'(x) + h² f'''(x)/6 + O(h⁴), an error O(h²);
    #   round-off:  f(x ± h) are each rounded, relative error up to ε/2 (ε: the machine
    #               epsilon), so their difference is off by about ε|f|, divided by 2h: O(ε/h).
    # For f = exp (f = f' = f''') the relative error is about h²/6 + ε/(2h), smallest at
    #   h* = (3ε/2)^{1/3} ~ ε^{1/3},  with error ~ ε^{2/3}:
    # about 7e-6 and 1e-11 in float64, but 6e-3 and 2e-5 in float32. (Far left, in float32,
    # h is below half an ulp of x: x + h rounds to x, the difference is 0, the error 100%.)
    xs = np.linspace(-1.0, 1.0, 33)  # 33 points; the error is the RMS over them
    hs = np.logspace(-12, 0, 97)  # 8 steps per decade
    exact = np.exp(xs)[:, None]  # f'(x) = exp(x), exactly (NumPy, float64)

    @jax.jit
    def central(x, h):  # (m, 1), (1, k) -> (m, k), all in the dtype of x and h
        return (jnp.exp(x + h) - jnp.exp(x - h)) / (2 * h)

    curves = {}
    for dtype in (jnp.float32, jnp.float64):
        eps = float(jnp.finfo(dtype).eps)
        fd = central(jnp.asarray(xs[:, None], dtype), jnp.asarray(hs[None, :], dtype))
        rel = np.abs(np.asarray(fd, np.float64) - exact) / exact  # (m, k)
        error = np.sqrt(np.mean(rel**2, axis=0))  # (k,): RMS over the points
        h_star = (1.5 * eps) ** (1 / 3)
        best = int(np.argmin(error))
        curves[dtype] = eps, error, h_star, best
        name = jnp.dtype(dtype).name

        # The two branches of the V, as straight lines on log-log axes: the fitted slope is
        # +2 well to the right of h* (truncation) and −1 well to the left (round-off).
        def slope(lo, hi, error=error):
            sel = (hs >= lo) & (hs <= hi)
            return float(np.polyfit(np.log10(hs[sel]), np.log10(error[sel]), 1)[0])

        right, left = slope(10 * h_star, 100 * h_star), slope(h_star / 1000, h_star / 30)
        predicted_min = h_star**2 / 6 + eps / (2 * h_star)
        ctx.say(
            f"  {name}: ε = {eps:.2e}; predicted h* = (3ε/2)^(1/3) = {h_star:.2e},"
            f" measured best h = {hs[best]:.2e} (error {error[best]:.2e},"
            f" predicted {predicted_min:.2e}); slopes {right:+.2f} right, {left:+.2f} left"
        )
        ctx.check(
            f"{name}: the measured best step {hs[best]:.1e} is within 10× of"
            f" (3ε/2)^(1/3) = {h_star:.1e}",
            abs(np.log10(hs[best] / h_star)) <= 1,
        )
        ctx.check(
            f"{name}: the smallest error is within 10× of h*²/6 + ε/(2h*) = {predicted_min:.1e}",
            abs(np.log10(error[best] / predicted_min)) <= 1,
        )
        ctx.check(
            f"{name}: right of h* the error grows like h² (fitted slope {right:.2f} in [1.8, 2.2])",
            1.8 <= right <= 2.2,
        )
        ctx.check(
            f"{name}: left of h* round-off grows like 1/h as h shrinks (slope {left:.2f} in"
            " [−1.3, −0.7])",
            -1.3 <= left <= -0.7,
        )
    ctx.check(
        "float32's best central difference is over 1000× worse than float64's",
        curves[jnp.float32][1].min() > 1000 * curves[jnp.float64][1].min(),
    )
    # So gradient checks run in float64: there a finite difference is good to about 1e-10,
    # enough to catch a relative error of 1e-6 in a gradient; in float32, only to ~1e-5.

    # --- A directional-derivative check of a whole MLP. For a random direction V in
    # parameter space, the derivative of t ↦ L(θ + tV) at 0 is ⟨∇L(θ), V⟩: reverse-mode
    # AD gives the left side through every pullback of the network; the central
    # difference (L(θ + hV) − L(θ − hV))/2h, with h = 1e-5 ≈ h* in float64, gives the
    # right side from forward passes only. One number per direction tests every layer.
    rng = np.random.default_rng(17)
    sizes, n = [4, 16, 16, 2], 8

    def normal_params():  # a list of Params shaped like the MLP: NumPy float64 arrays
        return [
            jaxlinear.Params(rng.standard_normal((a, b)) / np.sqrt(a), 0.1 * rng.standard_normal(b))
            for a, b in itertools.pairwise(sizes)
        ]

    layers = normal_params()
    X, T = jnp.asarray(rng.standard_normal((n, 4))), jnp.asarray(rng.standard_normal((n, 2)))
    directions = [normal_params() for _ in range(3)]

    # The bug to catch: a layer whose forward pass is right but whose hand-written
    # backward rule averages dW over the batch (Xᵀ G / n) instead of summing it. The
    # loss, and so every loss curve, is unchanged; only the gradient is wrong.
    @jax.custom_vjp
    def wrong_affine(x, W, b):
        return affine(x, W, b)

    def wrong_fwd(x, W, b):
        return affine(x, W, b), (x, W)

    def wrong_bwd(residuals, g):
        x, W = residuals
        return g @ W.T, x.T @ g / x.shape[0], jnp.sum(g, axis=0)  # dW ÷ n: the wrong scale

    wrong_affine.defvjp(wrong_fwd, wrong_bwd)

    def wrong_linear(params, x, **_):
        return wrong_affine(x, params.W, params.b)

    bindings = {"jaxlinear.linear": jaxlinear.linear, "the ÷n rule": wrong_linear}

    def make_loss(layer):
        def loss(layers):
            Y = jaxlinear.mlp(layers, X, activation=jnp.tanh, layer=layer)
            return 0.5 * jnp.sum((Y - T) ** 2)

        return jax.jit(loss), jax.jit(jax.grad(loss))

    def pairing(a, b):  # ⟨a, b⟩ over every leaf
        return sum(
            float(np.vdot(x, y))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )

    def directional_check(loss, grad, V, h=1e-5):
        """The relative gap between ⟨∇L, V⟩ (AD) and the central difference along V.

        The steps θ ± hV and the pairing are NumPy float64 arithmetic (no compiling)."""
        ad = pairing(jax.tree.map(np.asarray, grad(layers)), V)
        plus = jax.tree.map(lambda p, v: p + h * v, layers, V)
        minus = jax.tree.map(lambda p, v: p - h * v, layers, V)
        fd = (float(loss(plus)) - float(loss(minus))) / (2 * h)
        return ad, fd, abs(ad - fd) / max(abs(ad), abs(fd))

    losses = {name: make_loss(layer) for name, layer in bindings.items()}
    ctx.close(
        "the ÷n rule's forward pass is right: its loss equals jaxlinear.mlp's",
        losses["the ÷n rule"][0](layers),
        losses["jaxlinear.linear"][0](layers),
        tol=1e-13,
    )
    gaps = {}
    for name, (loss, grad) in losses.items():
        gaps[name] = []
        for k, V in enumerate(directions):
            ad, fd, gap = directional_check(loss, grad, V)
            gaps[name].append(gap)
            ctx.say(f"  {name}, direction {k}: AD {ad:+.10f}, FD {fd:+.10f}, gap {gap:.1e}")
    worst = max(gaps["jaxlinear.linear"])
    ctx.check(
        "jaxlinear.mlp passes: AD and FD agree to 1e-8 along 3 random directions",
        worst <= 1e-8,
        residual=worst,
        tol=1e-8,
    )
    ctx.check(
        "the wrong rule is caught: a gap above 1e-2 along every direction"
        f" (smallest {min(gaps['the ÷n rule']):.2f})",
        min(gaps["the ÷n rule"]) > 1e-2,
    )

    # Directions that move one parameter at a time point at the culprit: every dW fails
    # the check, every db passes (the ÷n rule only touched dW).
    def only(i, leaf):  # direction 0, restricted to one leaf of layer i: zeros elsewhere
        V = [jax.tree.map(np.zeros_like, p) for p in layers]
        V[i] = V[i]._replace(**{leaf: getattr(directions[0][i], leaf)})
        return V

    results = {}  # (binding, "dW1") -> (AD, FD, gap)
    for name, (loss, grad) in losses.items():
        for i, leaf in itertools.product(range(len(layers)), ("W", "b")):
            results[name, f"d{leaf}{i + 1}"] = directional_check(loss, grad, only(i, leaf))
        ctx.say(
            f"  {name}: "
            + ", ".join(
                f"{g} {'pass' if r[2] <= 1e-8 else 'FAIL'}"
                for (b, g), r in results.items()
                if b == name
            )
        )
    ctx.check(
        "one leaf at a time, jaxlinear.mlp passes everywhere",
        all(r[2] <= 1e-8 for (b, _), r in results.items() if b == "jaxlinear.linear"),
    )
    ctx.check(
        "and the wrong rule fails exactly on dW1, dW2, dW3",
        [g for (b, g), r in results.items() if b == "the ÷n rule" and r[2] > 1e-8]
        == ["dW1", "dW2", "dW3"],
    )
    # It even measures the bug: along each dW, AD / FD is the 1/n the rule slipped in.
    ad_fd = np.array([results["the ÷n rule", f"dW{i + 1}"][:2] for i in range(len(layers))])
    ctx.close(
        f"along every dW, AD / FD = 1/n = {1 / n} for the wrong rule",
        ad_fd[:, 0] / ad_fd[:, 1],
        np.full(len(layers), 1 / n),
        tol=1e-8,
    )

    if ctx.plots:
        plt = ctx.pyplot()
        fig, ax = plt.subplots(figsize=(8.5, 5.2), layout="constrained")
        for k, dtype in enumerate((jnp.float32, jnp.float64)):
            eps, error, h_star, best = curves[dtype]
            name = jnp.dtype(dtype).name
            ax.loglog(hs, error, "o-", ms=2.5, color=f"C{k}", label=f"{name}, measured (RMS)")
            ax.loglog(hs, eps / (2 * hs), ":", color=f"C{k}", lw=1, label=f"{name}: ε/(2h)")
            ax.axvline(h_star, color=f"C{k}", ls="--", lw=1)
            ax.plot(hs[best], error[best], "*", ms=14, color=f"C{k}", mec="k")
            ax.annotate(
                f"h* = {h_star:.1e}",
                (h_star, 1e-13 if k == 0 else 1e-15),
                xytext=(4, 0),
                textcoords="offset points",
                color=f"C{k}",
                fontsize=9,
            )
        ax.loglog(hs, hs**2 / 6, "k:", lw=1, label="truncation h²/6")
        ax.set_ylim(1e-16, 10)
        ax.set_xlabel("step h")
        ax.set_ylabel("relative error of (f(x+h) − f(x−h))/2h,  f = exp")
        ax.set_title(
            "Central differences: round-off O(ε/h) on the left, truncation O(h²) on the right;\n"
            "the best step (★) is near h* ~ ε^(1/3), the best error ~ ε^(2/3)"
        )
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=9, loc="lower left")
        ctx.save(fig, "finite_differences.png")
    return ctx.checks
