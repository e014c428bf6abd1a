"""Cost and memory of backprop: backward ≈ 2× forward; residuals n·d_in + d_in·d_out per layer."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxlinear
from demos._common import Context

F32 = jnp.float32


def run(ctx: Context):
    on_cpu = jax.default_backend() == "cpu"

    # -- 1. Time: the backward pass costs about two forward passes ------------------------
    # Per layer the forward pass is one GEMM, Y = X W (2·n·d_in·d_out flops); the backward
    # pass is two, dX = G Wᵀ and dW = Xᵀ G, of the same size. So backward : forward ≈ 2 : 1
    # once the GEMMs dominate. Time the two halves apart: jax.vjp's forward (saving the
    # residuals) is compiled once, and its backward function, a pytree, goes through jit.
    n, d, L = 512, 256, 4
    repeats = 7 if ctx.small else 11
    layers = jaxlinear.init_mlp(jax.random.key(21), [d] * (L + 1))  # float32
    x = jnp.asarray(np.random.default_rng(21).standard_normal((n, d)), F32)

    def f(layers, x):
        return jaxlinear.mlp(layers, x, activation=jnp.tanh)  # (n, d)

    y, pullback = jax.jit(lambda p, x: jax.vjp(f, p, x))(layers, x)
    g = jnp.ones_like(y)
    forward = jax.jit(f).lower(layers, x).compile()
    backward = jax.jit(lambda pullback, g: pullback(g)).lower(pullback, g).compile()
    wall, cpu = _interleaved([lambda: forward(layers, x), lambda: backward(pullback, g)], repeats)
    (t_fwd, t_bwd), (c_fwd, c_bwd) = np.median(wall, axis=1), np.median(cpu, axis=1)
    ratio = c_bwd / c_fwd
    ctx.say(
        f"  MLP {L} × ({d}×{d}), batch {n}, float32, medians of {repeats} interleaved runs:",
        f"    forward  {t_fwd * 1e3:7.2f} ms wall  {c_fwd * 1e3:7.2f} ms CPU",
        f"    backward {t_bwd * 1e3:7.2f} ms wall  {c_bwd * 1e3:7.2f} ms CPU",
        f"    backward / forward: {t_bwd / t_fwd:.2f} (wall), {ratio:.2f} (CPU)",
    )
    # The flop counts XLA reports for the two compiled programs (exact, not timed).
    gemm = 2 * n * d * d  # flops of one (n, d) @ (d, d)
    flops_fwd, flops_bwd = _flops(forward), _flops(backward)
    if on_cpu and flops_fwd is not None and flops_bwd is not None:  # XLA:CPU's count
        ctx.say(
            f"  XLA cost analysis: forward {flops_fwd / gemm:.2f} GEMMs, backward"
            f" {flops_bwd / gemm:.2f} GEMMs of 2·n·d² = {gemm / 1e6:.0f} Mflop"
        )
        ctx.check(
            f"the compiled forward is {L} GEMMs and the backward {2 * L} (flops within 2%)",
            abs(flops_fwd / (L * gemm) - 1) < 0.02 and abs(flops_bwd / (2 * L * gemm) - 1) < 0.02,
        )
    # The CPU-time ratio usually comes out close to 2 (the backward pass also applies
    # tanh's slope; the transposed products may run a little slower than the forward one).
    # Times on a shared machine are noise: they are shown, never checked; the work is
    # checked above, by XLA's flop count.

    # -- 2. Memory: what the forward pass keeps for the backward pass ---------------------
    # jaxlinear.linear saves exactly x and W (never Y, never b): n·d_in + d_in·d_out
    # numbers. Read it from the compiled program: jit a function that returns the
    # residuals (the leaves of jax.vjp's backward function) and add up the sizes of its
    # outputs. (XLA's memory_analysis reports the same bytes plus, on CPU, an 8-byte
    # pointer per entry of the output tuple.)
    n_r, widths = 64, [256, 512, 384, 128]
    # Compiling needs only shapes and dtypes: abstract values, nothing is allocated.
    x_r = jax.ShapeDtypeStruct((n_r, widths[0]), F32)
    layers_r = jax.eval_shape(lambda: jaxlinear.init_mlp(jax.random.key(211), widths))
    ctx.say(
        f"  {'layer':>5} {'d_in×d_out':>10} {'residual bytes':>15} {'4·(n·d_in + d_in·d_out)':>24}"
    )
    per_layer = []
    h = x_r
    for i, p in enumerate(layers_r):
        nbytes, _ = _residuals(jaxlinear.linear, p, h)
        formula = 4 * (n_r * p.W.shape[0] + p.W.shape[0] * p.W.shape[1])
        per_layer.append((nbytes, formula))
        ctx.say(
            f"  {i + 1:5d} {p.W.shape[0]:>4}×{p.W.shape[1]:<5} {per_layer[-1][0]:15,d}"
            f" {formula:24,d}"
        )
        h = jax.ShapeDtypeStruct((n_r, p.W.shape[1]), F32)
    ctx.close(
        f"every layer's residuals are exactly n·d_in + d_in·d_out float32 numbers (n = {n_r})",
        np.array(per_layer)[:, 0],
        np.array(per_layer)[:, 1],
        tol=0,
    )
    # In the MLP, tanh adds its own residual: its slope 1 − tanh², one (n, d_out) array per
    # hidden layer. Layer l+1's x is tanh's output, stored once, not twice.
    nbytes, reported = _residuals(
        lambda p, x: jaxlinear.mlp(p, x, activation=jnp.tanh), layers_r, x_r
    )
    tanh_bytes = 4 * n_r * sum(widths[1:-1])
    total = sum(want for _, want in per_layer) + tanh_bytes
    ctx.say(
        f"  whole MLP: {nbytes:,d} bytes = Σ layers {total - tanh_bytes:,d}"
        f" + tanh slopes 4·n·Σd_hidden {tanh_bytes:,d}  (memory_analysis: {reported:,d})"
    )
    ctx.close(
        "the whole MLP keeps Σ_l (n·d_in + d_in·d_out) + n·Σ d_hidden numbers",
        np.array(nbytes),
        np.array(total),
        tol=0,
    )

    # -- 3. jax.checkpoint: trade memory for time ------------------------------------------
    # A deep stack of identical layers is a lax.scan over stacked weights. Without
    # checkpointing the scan keeps, per layer, its input h, tanh's output and tanh's slope:
    # 3·n·d numbers. With jax.checkpoint on the layer, it keeps only the input h and
    # recomputes the rest in the backward pass: one extra GEMM per layer, a third more
    # GEMM work (3 → 4).
    n_c, d_c, L_c = 320, 256, 8  # n ≠ d, to tell activations (L, n, d) from weights (L, d, d)
    stacked = jax.tree.map(
        lambda *a: jnp.stack(a), *jaxlinear.init_mlp(jax.random.key(212), [d_c] * (L_c + 1))
    )
    x_c = jnp.asarray(np.random.default_rng(212).standard_normal((n_c, d_c)), F32)

    def layer(h, p):  # (n, d) -> (n, d)
        return jnp.tanh(jaxlinear.linear(p, h)), None

    def loss_with(body):
        def loss(stacked, x):
            h, _ = lax.scan(body, x, stacked)
            return jnp.mean(h**2)

        return loss

    rows = []
    for name, body in (("no checkpoint", layer), ("jax.checkpoint", jax.checkpoint(layer))):
        loss = loss_with(body)
        # activations: the residuals shaped (L, n, d), one (n, d) slice per layer
        act_bytes = _residuals(loss, stacked, x_c, keep=lambda s: s.shape == (L_c, n_c, d_c))[0]
        compiled = jax.jit(jax.grad(loss)).lower(stacked, x_c).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        # GEMMs in the program JAX hands to XLA: the loop bodies, each run L times
        dots = str(jax.make_jaxpr(jax.grad(loss))(stacked, x_c)).count("dot_general")
        rows.append([name, act_bytes, temp, dots, compiled])
    wall, cpu = _interleaved([lambda c=r[4]: c(stacked, x_c) for r in rows], repeats)
    wall, cpu = np.median(wall, axis=1), np.median(cpu, axis=1)
    ctx.say(
        f"  scan of {L_c} layers {d_c}×{d_c}, batch {n_c}, medians of {repeats} interleaved runs:",
        f"  {'':15} {'saved activations':>18} {'XLA temp bytes':>15} {'GEMMs':>6}"
        f" {'wall time':>10} {'CPU time':>10}",
    )
    for (name, act_bytes, temp, dots, _), t, c in zip(rows, wall, cpu, strict=True):
        ctx.say(
            f"  {name:15} {act_bytes / 2**20:14.2f} MiB {temp / 2**20:11.2f} MiB {dots:6d}"
            f" {t * 1e3:7.2f} ms {c * 1e3:7.2f} ms"
        )
    (_, act0, temp0, dots0, _), (_, act1, temp1, dots1, _) = rows
    unit = L_c * n_c * d_c * 4
    ctx.check(
        f"saved activations: 3·L·n·d numbers without checkpoint, L·n·d with"
        f" ({act0 // unit} and {act1 // unit} × {unit / 2**20:.1f} MiB)",
        act0 == 3 * unit and act1 == unit,
    )
    ctx.check(
        f"XLA's temp memory for the gradient shrinks {temp0 / temp1:.1f}× (at least 1.5×)",
        temp0 >= 1.5 * temp1,
    )
    ctx.check(
        "the checkpointed program has one more GEMM per layer: the recomputed forward"
        f" ({dots0} → {dots1} in the loop bodies)",
        dots1 == dots0 + 1,
    )
    # A third more GEMM work, but the rest (tanh, the loop, memory traffic) is not
    # recomputed: expect well under 4/3 more time. That ~1.2x is within the noise of a
    # shared machine, so the time is shown, not checked; the work is checked exactly, from
    # XLA's cost analysis of the two compiled programs (it counts a loop body once).
    slower = cpu[1] / cpu[0]
    ctx.say(
        f"  the checkpointed step took {slower:.2f}x the CPU time ({wall[1] / wall[0]:.2f}x wall)"
    )
    gemm_c = 2 * n_c * d_c * d_c  # flops of one (n, d) @ (d, d)
    flops0, flops1 = _flops(rows[0][4]), _flops(rows[1][4])
    if on_cpu and flops0 is not None and flops1 is not None:  # XLA:CPU's count
        ctx.check(
            f"XLA's flop count per loop iteration: {flops0 / gemm_c:.2f} GEMMs without"
            f" checkpoint, {flops1 / gemm_c:.2f} with: one more GEMM (within 2%)",
            abs((flops1 - flops0) / gemm_c - 1) < 0.02,
        )
    return ctx.checks


def _interleaved(fns, repeats):
    """Seconds per call of each of ``fns``, one call of each per round, ``repeats`` rounds.

    Returns ``(wall, cpu)``, each ``(len(fns), repeats)``: wall-clock time, and the CPU
    time of this process (all its threads). On a shared machine the CPU time is the
    steadier measure of work: other processes' load stretches the wall clock, not it.
    """
    wall, cpu = np.zeros((len(fns), repeats)), np.zeros((len(fns), repeats))
    for r in range(repeats):
        for i, fn in enumerate(fns):
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            wall[i, r] = time.perf_counter() - start
            cpu[i, r] = time.process_time() - start_cpu
    return wall, cpu


def _flops(compiled):
    """Flops of a compiled program by XLA's cost analysis, or None."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax: one dict per device
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else cost["flops"]


def _residuals(fn, *args, keep=lambda s: True):
    """Compile ``args -> residuals of jax.vjp(fn, *args)``.

    Returns (bytes of the compiled program's outputs ``keep`` selects, the output bytes
    XLA's memory_analysis reports).
    """
    compiled = jax.jit(lambda *a: jax.vjp(fn, *a)[1]).lower(*args).compile()
    shapes = [s for s in jax.tree.leaves(compiled.out_info) if keep(s)]
    nbytes = sum(s.size * s.dtype.itemsize for s in shapes)
    return nbytes, compiled.memory_analysis().output_size_in_bytes
