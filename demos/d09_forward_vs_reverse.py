"""Forward vs reverse cost: jacfwd wins when inputs are few, jacrev when outputs are few."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxlinear
from demos._common import Context, affine


def run(ctx: Context):
    # f: R^d_in → R^d_out, a small tanh MLP d_in → 128 → 128 → d_out built from
    # jaxlinear.dual_linear (linear, a custom_vjp, has no forward mode; see the
    # pushforward demo). Its Jacobian is d_out × d_in. jax.jacfwd builds it one column per
    # input (d_in pushforwards); jax.jacrev one row per output (d_out pullbacks). A
    # pushforward and a pullback cost about the same, so the cheaper mode is the one
    # with fewer passes. Keep d_in · d_out = 4096 and slide from few inputs to few outputs.
    hidden = 128
    shapes = [(4, 1024), (16, 256), (64, 64), (256, 16), (1024, 4)]
    repeats = 9
    if ctx.small:
        shapes, repeats = [(4, 1024), (64, 64), (1024, 4)], 5

    def f(layers, x):
        return jaxlinear.mlp(layers, x, activation=jnp.tanh, layer=jaxlinear.dual_linear)

    def f_ref(layers, x):  # the plain network, for checking the numbers
        for i, p in enumerate(layers):
            x = affine(x, p.W, p.b)
            x = jnp.tanh(x) if i < len(layers) - 1 else x
        return x

    def jacobian_ref(layers, x):  # float64, JAX's own reverse mode on the plain network
        as64 = jax.tree.map(lambda a: a.astype(jnp.float64), (layers, x))
        return jax.jacrev(f_ref, argnums=1)(*as64)

    cases = []
    for d_in, d_out in shapes:
        k_layers, k_x = jax.random.split(jax.random.fold_in(jax.random.key(9), d_in))
        layers = jaxlinear.init_mlp(k_layers, [d_in, hidden, hidden, d_out])  # float32
        x = jax.random.normal(k_x, (d_in,), jnp.float32)
        fwd = jax.jit(jax.jacfwd(f, argnums=1))
        rev = jax.jit(jax.jacrev(f, argnums=1))
        J_fwd, J_rev = fwd(layers, x), rev(layers, x)  # compile (and check) once, untimed
        cases.append((d_in, d_out, layers, x, fwd, rev))
        # Both modes build the same (d_out, d_in) matrix: the float64 Jacobian of the plain
        # network, to float32 rounding (relative to max |J|).
        J_ref = jacobian_ref(layers, x)
        scale = float(jnp.max(jnp.abs(J_ref)))
        for mode, J in (("jacfwd", J_fwd), ("jacrev", J_rev)):
            ctx.close(
                f"d_in={d_in:4d}, d_out={d_out:4d}: {mode} equals the float64 plain reference",
                J.astype(jnp.float64) / scale,
                J_ref / scale,
                tol=1e-5,
            )

    # Time them interleaved (every case and mode once per round, so a burst of load on
    # this shared machine hits all of them alike) and take medians.
    times = np.zeros((len(cases), 2, repeats))
    for r in range(repeats):
        for c, (_, _, layers, x, fwd, rev) in enumerate(cases):
            for m, fn in enumerate((fwd, rev)):
                start = time.perf_counter()
                jax.block_until_ready(fn(layers, x))
                times[c, m, r] = time.perf_counter() - start
    med = np.median(times, axis=2) * 1e3  # (cases, 2) in ms

    ctx.say(
        f"  {'d_in':>5} {'d_out':>5} {'jacfwd ms':>10} {'jacrev ms':>10} {'rev/fwd':>8}  faster"
    )
    for (d_in, d_out, *_), (t_fwd, t_rev) in zip(cases, med, strict=True):
        winner = "jacfwd" if t_fwd < t_rev else "jacrev"
        ctx.say(
            f"  {d_in:5d} {d_out:5d} {t_fwd:10.3f} {t_rev:10.3f} {t_rev / t_fwd:8.2f}  {winner}"
        )

    # Timings are noisy; assert only what holds with a wide margin: at the extremes the
    # pass counts differ 256×, so the right mode must win by at least 2×. (On an
    # accelerator these small Jacobians are bound by kernel launches, not by the number
    # of passes: there the timings are shown but not checked.)
    (t_fwd_few_in, t_rev_few_in), (t_fwd_few_out, t_rev_few_out) = med[0], med[-1]
    if jax.default_backend() != "cpu":
        ctx.say(f"  (timings on {jax.default_backend()}: shown, not checked)")
    else:
        ctx.check(
            f"few inputs ({cases[0][0]} → {cases[0][1]}): jacfwd at least 2× faster"
            f" ({t_rev_few_in / t_fwd_few_in:.0f}×)",
            t_rev_few_in >= 2 * t_fwd_few_in,
        )
        ctx.check(
            f"few outputs ({cases[-1][0]} → {cases[-1][1]}): jacrev at least 2× faster"
            f" ({t_fwd_few_out / t_rev_few_out:.0f}×)",
            t_fwd_few_out >= 2 * t_rev_few_out,
        )

    if ctx.plots:
        plt = ctx.pyplot()
        fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
        d_ins = [c[0] for c in cases]
        ax.loglog(d_ins, med[:, 0], "o-", label="jax.jacfwd (d_in pushforwards)")
        ax.loglog(d_ins, med[:, 1], "s-", label="jax.jacrev (d_out pullbacks)")
        ax.minorticks_off()
        ax.set_xticks(d_ins, [f"{a}→{b}" for a, b, *_ in cases])
        lo, hi = med.min() / 1.5, med.max() * 1.5
        ticks = [
            t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if lo <= t <= hi
        ]
        ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xlabel(r"$d_{in} \to d_{out}$  (with $d_{in} \cdot d_{out} = 4096$)")
        ax.set_ylabel("median time per Jacobian (ms)")
        ax.set_title(f"Jacobian of an MLP d_in→{hidden}→{hidden}→d_out (dual_linear, CPU)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        ctx.save(fig, "forward_vs_reverse.png")
    return ctx.checks
