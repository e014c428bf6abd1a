"""Forward vs reverse cost: jacfwd wins when inputs are few, jacrev when outputs are few."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxlinear
from demos._common import Context, affine


def run(ctx: Context):
    on_cpu = jax.default_backend() == "cpu"
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

    # The claim is about work, so check the work, not the clock (timings on a shared
    # machine are noise; they are shown above, not checked): XLA's flop count of each
    # compiled Jacobian program is the number of passes times the flops of one pass
    # (the three GEMMs of one pushforward or pullback, 2·(d_in·h + h·h + h·d_out)), and
    # at the extremes the mode with fewer passes does ~256× less work.
    flops = [[_flops(fn.lower(layers, x).compile()) for fn in (fwd, rev)]
             for (_, _, layers, x, fwd, rev) in cases]  # fmt: skip
    if not on_cpu or any(f is None for row in flops for f in row):
        ctx.say(f"  (no flop count from XLA on {jax.default_backend()}: work not checked)")
    else:
        ctx.say(f"  {'d_in':>5} {'d_out':>5} {'jacfwd passes':>14} {'jacrev passes':>14}"
                "  (XLA flops / flops of one pass)")  # fmt: skip
        ratios = []
        for (d_in, d_out, *_), (f_fwd, f_rev) in zip(cases, flops, strict=True):
            one_pass = 2 * (d_in * hidden + hidden * hidden + hidden * d_out)
            ratios.append((f_fwd / one_pass / d_in, f_rev / one_pass / d_out))
            ctx.say(f"  {d_in:5d} {d_out:5d} {f_fwd / one_pass:14.1f} {f_rev / one_pass:14.1f}")
        ctx.check(
            "jacfwd costs d_in passes and jacrev d_out passes (XLA's flop count, within"
            " 1× to 1.5× the GEMM flops of that many passes)",
            all(1 <= r <= 1.5 for row in ratios for r in row),
        )
        (f_fwd_few_in, f_rev_few_in), (f_fwd_few_out, f_rev_few_out) = flops[0], flops[-1]
        ctx.check(
            f"few inputs ({cases[0][0]} → {cases[0][1]}): jacfwd does at least 100× less work"
            f" ({f_rev_few_in / f_fwd_few_in:.0f}×)",
            f_rev_few_in >= 100 * f_fwd_few_in,
        )
        ctx.check(
            f"few outputs ({cases[-1][0]} → {cases[-1][1]}): jacrev does at least 100× less"
            f" work ({f_fwd_few_out / f_rev_few_out:.0f}×)",
            f_fwd_few_out >= 100 * f_rev_few_out,
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


def _flops(compiled):
    """Flops of a compiled program by XLA's cost analysis, or None."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax: one dict per device
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else cost["flops"]
