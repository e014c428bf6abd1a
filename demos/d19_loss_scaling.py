"""Loss scaling: float16 gradients underflow to zero; scaling the loss brings them back."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxlinear
from demos._common import Context, affine

F16, BF16, F32 = jnp.float16, jnp.bfloat16, jnp.float32


def run(ctx: Context):
    # float16 has 5 exponent bits: its largest value is 65504, its smallest normal one
    # 2⁻¹⁴ ≈ 6.1e-5 and its smallest subnormal 2⁻²⁴ ≈ 6.0e-8; anything smaller rounds to 0.
    # bfloat16 keeps float32's 8 exponent bits (smallest normal 2⁻¹²⁶ ≈ 1.2e-38) and pays
    # with a 7-bit mantissa. Hand-worked numbers first, from the bit layouts:
    f16, bf16 = jnp.finfo(F16), jnp.finfo(BF16)
    ctx.check(
        "float16: max 65504 = (2 − 2⁻¹⁰)·2¹⁵, smallest normal 2⁻¹⁴, smallest subnormal 2⁻²⁴",
        float(f16.max) == (2 - 2**-10) * 2**15
        and float(f16.smallest_normal) == 2**-14
        and float(f16.smallest_subnormal) == 2**-24,
    )
    ctx.check(
        "bfloat16: smallest normal 2⁻¹²⁶ (float32's), machine epsilon 2⁻⁷",
        float(bf16.smallest_normal) == 2**-126 and float(bf16.eps) == 2**-7,
    )

    # A deep-ish net: 10 tanh layers, 16 → 64 → ... → 64 → 1, weights at half the LeCun
    # scale, so the signal shrinks about 2× per layer going forward and the gradient does
    # the same going back. The loss, ½ mean(output²), is a mean over 512 examples. Its
    # weight gradients are tiny (median about 1e-8, none above 1e-6), as the gradients of
    # deep nets with mean losses can be.
    n, sizes = 512, [16] + [64] * 9 + [1]
    if ctx.small:
        n = 256
    layers32 = _init(jax.random.key(19), tuple(sizes))  # float32 master weights
    rng = np.random.default_rng(19)
    x32 = rng.standard_normal((n, sizes[0])).astype(np.float32)  # (n, 16)
    g_ref = [np.asarray(p.W) for p in _ref_grad(layers32, x32)]  # float32, plain AD
    g_all = np.concatenate([g.ravel() for g in g_ref])
    ctx.say(
        f"  float32 reference: {g_all.size} weight-gradient entries, |g| from"
        f" {np.min(np.abs(g_all)):.1e} to {np.max(np.abs(g_all)):.1e}"
        f" (median {np.median(np.abs(g_all)):.1e})"
    )

    # The whole net in float16 (weights, inputs, activations, cotangents), the loss in
    # float32 and multiplied by a scale S before the backward pass; the gradient is cast to
    # float32 and divided by S afterwards. S = 1 is no scaling. Count the entries that are
    # exactly 0 in float16 but not in the reference (underflow), and the ones that are not
    # finite (overflow).
    ctx.say(
        f"  {'loss scale S':>12} {'underflowed to 0':>17} {'not finite':>11} {'max rel err':>12}"
    )
    rows, grads = {}, {}
    for log2_s in (0, 8, 16, 24, 40):
        grads[log2_s] = _scaled_grad(layers32, x32, jnp.float32(2.0**log2_s), F16)
        rows[log2_s] = _compare(grads[log2_s], g_ref)
        lost, bad, err = rows[log2_s]
        ctx.say(f"  {'2^' + str(log2_s):>12} {lost:17d} {bad:11d} {err:12.1e}")
    lost0 = rows[0][0]
    ctx.check(
        f"float16, no scaling: {lost0} of {g_all.size} gradients ({lost0 / g_all.size:.0%})"
        " underflow to exactly 0",
        lost0 > g_all.size / 2,
    )
    ctx.check("static loss scale 2^24: none underflow, none overflow", rows[24][:2] == (0, 0))
    g_max = np.max(np.abs(g_all))
    ctx.close(
        "... and the float16 gradient is the float32 one to 1% (relative to max |g|)",
        [np.asarray(g) / g_max for g in grads[24]],
        [g / g_max for g in g_ref],
        tol=1e-2,
    )
    ctx.check(
        f"loss scale 2^40 overflows: {rows[40][1]} entries inf or nan (65504 is the ceiling)",
        rows[40][1] > 0,
    )

    # bfloat16 has float32's exponent range: the same gradients do not underflow at all,
    # with no scaling. Its price is precision (8 significant bits, 2 to 3 decimal digits),
    # not range.
    g_bf = _scaled_grad(layers32, x32, jnp.float32(1.0), BF16)
    lost_bf, bad_bf, _ = _compare(g_bf, g_ref)
    ctx.check(
        f"bfloat16, no scaling: {lost_bf} underflow to 0, {bad_bf} overflow",
        lost_bf == 0 and bad_bf == 0,
    )
    ctx.close(
        "... and the bfloat16 gradient is the float32 one to 5% (relative to max |g|)",
        [np.asarray(g) / g_max for g in g_bf],
        [g / g_max for g in g_ref],
        tol=5e-2,
    )

    # Gradients accumulate in float32. dW = XᵀG sums n products; jaxlinear.linear with
    # compute_dtype=float16 multiplies float16 operands but adds in float32 (and hands back
    # dW in the params' dtype). Summing in float16 instead stalls: once the running sum is
    # large, float16's spacing (2 at 2048) swallows each small product. The reference is
    # the float64 product of the same float16-rounded numbers.
    n_acc, d_in, d_out = 4096, 8, 4
    x16 = np.abs(rng.standard_normal((n_acc, d_in))).astype(np.float16)  # relu-like, ≥ 0
    g16 = (0.5 + rng.standard_normal((n_acc, d_out))).astype(np.float16)  # mean 0.5
    params = jaxlinear.Params(np.zeros((d_in, d_out), np.float32), None)
    dW_mixed = _mixed_dW(params, x16, g16)
    dW_exact = np.asarray(x16, np.float64).T @ np.asarray(g16, np.float64)  # (d_in, d_out)
    dW_f16 = _sum_in_f16(x16, g16)
    scale = np.max(np.abs(dW_exact))
    err_mixed = np.max(np.abs(np.asarray(dW_mixed, np.float64) - dW_exact)) / scale
    err_f16 = np.max(np.abs(np.asarray(dW_f16, np.float64) - dW_exact)) / scale
    ctx.say(
        f"  dW = XᵀG over n = {n_acc} rows, |dW| up to {scale:.0f}: relative error"
        f" {err_mixed:.1e} (float32 sum), {err_f16:.1e} (float16 sum)"
    )
    ctx.check(
        "jaxlinear.linear(compute_dtype=float16) returns dW in float32", dW_mixed.dtype == F32
    )
    ctx.close(
        "... summed in float32: the float64 sum of the same float16 products to 1e-6 (relative)",
        np.asarray(dW_mixed, np.float64) / scale,
        dW_exact / scale,
        tol=1e-6,
    )
    ctx.check(
        f"the same sum kept in float16 is over 100× worse ({err_f16 / err_mixed:.0f}×)",
        err_f16 > 100 * err_mixed,
    )

    # Dynamic loss scaling, the usual recipe, inside one jitted lax.scan: weights in
    # float32, matmuls in float16 (compute_dtype), loss scaled by S. After each backward
    # pass, if any gradient is inf or nan, skip the update and halve S; otherwise update
    # and, after N good steps in a row, double S. Start far too high (2^40): S falls until
    # the gradients fit, then creeps up, overflows, backs off: a sawtooth just under the
    # ceiling, which keeps the small gradients as far from 0 as float16 allows. (The task,
    # driving the output to 0, is only there to move the weights; the scale is the point.)
    steps, grow_every = (120, 20) if not ctx.small else (60, 10)
    trace = _dynamic_training(layers32, x32, steps=steps, grow_every=grow_every, lr=0.5)
    scales, finite, moved, rel_err = (np.asarray(a) for a in trace)
    overflow = ~finite
    ctx.say(
        f"  {steps} steps, grow every {grow_every}: {int(overflow.sum())} overflow steps"
        f" (at {np.flatnonzero(overflow).tolist()})",
        f"  scale log2: {' '.join(str(int(v)) for v in np.log2(scales[:: steps // 30]))} ...",
    )
    ctx.check(
        f"the scale follows the rule (halve on overflow, ×2 after {grow_every} good steps),"
        " replayed in NumPy",
        np.array_equal(scales, _replay(finite, 2.0**40, grow_every)),
    )
    ctx.check(
        f"S starts too high and overflows, then overflows again each time it grows too far"
        f" ({int(overflow[:10].sum())} at the start, {int(overflow[10:].sum())} later)",
        overflow[0] and overflow[10:].sum() >= 2,
    )
    ctx.check(
        "overflow steps are skipped: the weights do not change at all on them",
        np.all(moved[overflow] == 0) and np.all(moved[finite] > 0),
    )
    ctx.check(
        f"every good step's unscaled gradient is within 1% of the float32 reference"
        f" (worst {rel_err[finite].max():.1e})",
        rel_err[finite].max() < 1e-2,
    )

    if ctx.plots:
        _figure(ctx, g_all, scales, overflow, grow_every)
    return ctx.checks


@functools.partial(jax.jit, static_argnums=1)
def _init(key, sizes):
    """10 layers at half the LeCun scale (the signal halves per layer), float32."""
    layers = jaxlinear.init_mlp(key, sizes, dtype=F32)
    return [jaxlinear.Params(0.5 * p.W, p.b) for p in layers]


def _loss(out):
    """Mean over examples of ½ out², computed in float32: (n, 1) -> scalar."""
    return 0.5 * jnp.mean(out.astype(F32) ** 2)


@jax.jit
def _ref_grad(layers, x):
    """The float32 reference: plain x @ W + b and tanh under JAX's own AD."""

    def loss(layers):
        h = x
        for i, p in enumerate(layers):
            h = affine(h, p.W, p.b)
            h = jnp.tanh(h) if i < len(layers) - 1 else h
        return _loss(h)

    return jax.grad(loss)(layers)


@functools.partial(jax.jit, static_argnums=3)
def _scaled_grad(layers, x, scale, dtype):
    """∇(S · loss) / S, the whole net cast to ``dtype``; the gradient returned in float32."""
    layers, x = jax.tree.map(lambda a: a.astype(dtype), (layers, x))

    def loss(layers):
        return scale * _loss(jaxlinear.mlp(layers, x, activation=jnp.tanh))

    g = jax.grad(loss)(layers)
    return [p.W.astype(F32) / scale for p in g]


def _compare(g, g_ref):
    """(entries 0 here but not in g_ref, entries not finite, max relative error)."""
    g = np.concatenate([np.asarray(a).ravel() for a in g])
    r = np.concatenate([a.ravel() for a in g_ref])
    lost = int(np.sum((g == 0) & (r != 0)))
    bad = int(np.sum(~np.isfinite(g)))
    err = float(np.max(np.abs(g - r)) / np.max(np.abs(r))) if bad == 0 else float("inf")
    return lost, bad, err


@jax.jit
def _mixed_dW(params, x16, g16):
    """dW of jaxlinear.linear(compute_dtype=float16) when the cotangent of Y is g16."""

    def loss(p):
        return jnp.sum(jaxlinear.linear(p, x16, compute_dtype=F16).astype(F32) * g16)

    return jax.grad(loss)(params).W


@jax.jit
def _sum_in_f16(x, g):
    """Σ_i x_iᵀ g_i with the running sum rounded to float16 after every row."""

    def step(acc, row):
        xi, gi = row  # (d_in,), (d_out,)
        return (acc + xi[:, None] * gi[None, :]).astype(F16), None

    acc, _ = lax.scan(step, jnp.zeros((x.shape[1], g.shape[1]), F16), (x, g))
    return acc


@functools.partial(jax.jit, static_argnames=("steps", "grow_every", "lr"))
def _dynamic_training(layers, x, *, steps, grow_every, lr):
    """SGD with dynamic loss scaling; per step: (scale, finite, max |Δparams|, rel. error)."""

    def loss(layers, scale):  # float32 weights, float16 matmuls (float32 accumulation)
        out = jaxlinear.mlp(layers, x, activation=jnp.tanh, compute_dtype=F16)
        return scale * _loss(out)

    def step(state, _):
        layers, scale, good = state
        grads = jax.tree.map(lambda g: g / scale, jax.grad(loss)(layers, scale))
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        new = jax.tree.map(lambda p, g: jnp.where(finite, p - lr * g, p), layers, grads)
        moved = _max_abs(jax.tree.leaves(jax.tree.map(jnp.subtract, new, layers)))
        good = jnp.where(finite, good + 1, 0)
        grow = good == grow_every
        next_scale = jnp.where(finite, jnp.where(grow, 2 * scale, scale), scale / 2)
        ref = _ref_grad(layers, x)  # float32 plain AD at the same weights
        diff = _max_abs([a.W - b.W for a, b in zip(grads, ref, strict=True)])
        size = _max_abs([b.W for b in ref])
        state = (new, next_scale, jnp.where(grow, 0, good))
        return state, (scale, finite, moved, diff / size)

    state = (layers, jnp.float32(2.0**40), jnp.int32(0))
    _, trace = lax.scan(step, state, None, length=steps)
    return trace


def _max_abs(arrays):
    """max |a| over a list of arrays (traceable)."""
    return jnp.max(jnp.stack([jnp.max(jnp.abs(a)) for a in arrays]))


def _replay(finite, start, grow_every):
    """The loss-scale rule in plain Python, from the record of which steps were finite."""
    scales, scale, good = [], start, 0
    for ok in finite:
        scales.append(scale)
        if not ok:
            scale, good = scale / 2, 0
        else:
            good += 1
            if good == grow_every:
                scale, good = scale * 2, 0
    return np.array(scales, np.float32)


def _figure(ctx: Context, g_all, scales, overflow, grow_every):
    plt = ctx.pyplot()
    fig, (ax_h, ax_s) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    logs = np.log2(np.abs(g_all[g_all != 0]))
    bins = np.arange(np.floor(logs.min()) - 1, 18 + 24)
    ax_h.hist(logs, bins=bins, alpha=0.6, label="float32 gradients |g|")
    ax_h.hist(logs + 24, bins=bins, alpha=0.6, label="scaled by S = 2²⁴")
    ax_h.axvspan(bins[0], -24, color="C3", alpha=0.15, label="float16: rounds to 0")
    ax_h.axvspan(-24, -14, color="C1", alpha=0.15, label="float16: subnormal")
    ax_h.axvspan(np.log2(65504), bins[-1], color="k", alpha=0.12, label="float16: overflow")
    ax_h.set_xlabel("log₂ |gradient entry|")
    ax_h.set_ylabel("entries")
    ax_h.set_title("The gradients of a 10-layer net against float16's range")
    ax_h.legend(fontsize=8, loc="upper right")
    steps = np.arange(len(scales))
    ax_s.step(steps, np.log2(scales), where="post", label="log₂ S")
    ax_s.plot(
        steps[overflow],
        np.log2(scales[overflow]),
        "x",
        color="C3",
        ms=7,
        label="overflow: step skipped, S halved",
    )
    ax_s.set_xlabel("training step")
    ax_s.set_ylabel("log₂ loss scale")
    ax_s.set_title(f"Dynamic loss scaling (×2 after {grow_every} good steps)")
    ax_s.grid(True, alpha=0.3)
    ax_s.legend()
    ctx.save(fig, "loss_scaling.png")
