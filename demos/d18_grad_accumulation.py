"""Gradient accumulation: k microbatches summed in lax.scan give the full-batch gradient."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxlinear
from demos._common import Context, affine


def run(ctx: Context):
    # A 4 → 32 → 32 → 1 tanh MLP in float64, and a regression task: per-example loss
    # ℓ_i = ½ (f(x_i) − y_i)². The gradient of a *sum* over examples is the sum of the
    # per-example gradients, so it can be built up in pieces: split the batch into k
    # microbatches, take each one's gradient, add. Only one microbatch's activations are
    # alive at a time: that is how a batch too big for memory is trained.
    sizes, N, k = [4, 32, 32, 1], 96, 4
    m = N // k  # examples per microbatch
    k_init = jax.random.key(18)
    layers = _init(k_init, tuple(sizes), jnp.float64)
    X, Y = _data(18, N, sizes[0])  # (N, 4), (N, 1) float64

    def sum_loss(layers, x, y):
        """Σ_i ½ (f(x_i) − y_i)² over a batch x (b, 4), y (b, 1): jaxlinear layers."""
        return 0.5 * jnp.sum((jaxlinear.mlp(layers, x, activation=jnp.tanh) - y) ** 2)

    @jax.jit
    @jax.grad
    def ref_grad(layers, x, y, w):
        """∇ Σ_i w_i ½ (f(x_i) − y_i)² on plain x @ W + b (no jaxlinear code), JAX's own AD.

        x (b, 4), y (b, 1), w (b,): w = 1 is the sum loss, w = 1/N the mean loss.
        """
        return 0.5 * jnp.sum(w[:, None] * (_ref_mlp(layers, x) - y) ** 2)

    @jax.jit
    def accumulate(layers, xs, ys):
        """Σ_j ∇(sum loss of microbatch j): xs (k, m, 4), ys (k, m, 1), one scan step each."""

        def step(total, batch):
            g = jax.grad(sum_loss)(layers, *batch)
            return jax.tree.map(jnp.add, total, g), None

        zeros = jax.tree.map(jnp.zeros_like, layers)  # the running sum
        total, _ = lax.scan(step, zeros, (xs, ys))
        return total

    xs, ys = X.reshape(k, m, sizes[0]), Y.reshape(k, m, 1)
    g_acc = accumulate(layers, xs, ys)
    g_ref = ref_grad(layers, X, Y, np.ones(N))  # the whole batch at once, plain AD
    scale = _max_abs(g_ref)
    ctx.say(f"  N = {N} examples in k = {k} microbatches of m = {m}; max |∇L| = {scale:.3f}")
    ctx.close(
        f"Σ of {k} microbatch gradients (lax.scan) = the full-batch gradient (relative)",
        _scaled(g_acc, scale),
        _scaled(g_ref, scale),
    )

    # A mean loss L = (1/N) Σ_i ℓ_i divides by the number of *examples*. Accumulating
    # sum-loss gradients and dividing once by N at the end is right. Dividing by the number
    # of *microbatches* k is the classic slip: the gradient comes out m = N/k times too
    # large (here 24×), as if the learning rate had been multiplied by m.
    g_mean_ref = ref_grad(layers, X, Y, np.full(N, 1 / N))
    right = _scaled(g_acc, N)
    wrong_k = _scaled(g_acc, k)
    ctx.close(
        "mean loss: Σ microbatch sum-gradients ÷ N (examples) = ∇ mean loss",
        _scaled(right, scale / N),
        _scaled(g_mean_ref, scale / N),
    )
    err_k = _max_abs(jax.tree.map(np.subtract, wrong_k, g_mean_ref)) / _max_abs(g_mean_ref)
    ctx.say(f"  ÷ k instead of ÷ N: relative error {err_k:.1f} (the factor m − 1 = {m - 1})")
    ctx.close(
        f"÷ k (microbatches) instead of ÷ N is exactly m = {m} times too large",
        _scaled(wrong_k, m * scale / N),
        _scaled(g_mean_ref, scale / N),
    )

    # Averaging the microbatch *means* (÷ k) is right only when every microbatch has the
    # same size. Split the same N = 96 examples into microbatches of 40: the last one has 16
    # real examples (padded to 40 and masked), and the mean of means weights each of those
    # 2.5× more than the others. The masked sum ÷ N stays exact.
    m2 = 40
    k2 = -(-N // m2)  # 3 microbatches: 40, 40, 16
    pad = k2 * m2 - N
    mask = np.concatenate([np.ones(N), np.zeros(pad)]).reshape(k2, m2, 1)  # 1: real
    xs2 = np.concatenate([X, np.zeros((pad, sizes[0]))]).reshape(k2, m2, sizes[0])
    ys2 = np.concatenate([Y, np.zeros((pad, 1))]).reshape(k2, m2, 1)
    counts = mask.sum(axis=(1, 2))  # (k2,) real examples per microbatch

    @jax.jit
    def masked_grads(layers, xs, ys, mask):
        """Per-microbatch gradients of the masked sum loss: a pytree of (k2, ...) arrays."""

        def one(x, y, w):  # x (m2, 4), y (m2, 1), w (m2, 1)
            def loss(p):
                r = jaxlinear.mlp(p, x, activation=jnp.tanh) - y  # (m2, 1)
                return 0.5 * jnp.sum(w * r**2)

            return jax.grad(loss)(layers)

        return jax.vmap(one)(xs, ys, mask)

    per_mb = jax.tree.map(np.asarray, masked_grads(layers, xs2, ys2, mask))
    good = jax.tree.map(lambda g: g.sum(axis=0) / N, per_mb)  # Σ_j (sum grad)_j ÷ N
    mean_of_means = jax.tree.map(  # (1/k) Σ_j (sum grad)_j / n_j
        lambda g: np.sum(g / counts.reshape(-1, *([1] * (g.ndim - 1))), axis=0) / k2, per_mb
    )
    ctx.say(f"  ragged: N = {N} as microbatches of {counts.astype(int).tolist()} (padded, masked)")
    ctx.close(
        "ragged microbatches: masked Σ of sum-gradients ÷ N = ∇ mean loss",
        _scaled(good, scale / N),
        _scaled(g_mean_ref, scale / N),
    )
    # The mean of means is itself a weighted loss, Σ_i ℓ_i / (k · n_{j(i)}); its gradient,
    # from plain AD on the reference, is what the mistake computes.
    weights = (1.0 / (k2 * counts))[np.arange(N) // m2]  # (N,) weight of each example
    ctx.close(
        "the mean of microbatch means = the gradient of the mis-weighted loss Σ ℓ_i/(k·n_j)",
        _scaled(mean_of_means, scale / N),
        _scaled(ref_grad(layers, X, Y, weights), scale / N),
    )
    err_mm = _max_abs(jax.tree.map(np.subtract, mean_of_means, g_mean_ref)) / (scale / N)
    ctx.check(f"... which is not ∇ mean loss (relative error {err_mm:.2f}, over 5%)", err_mm > 0.05)

    # Batch size and learning rate. The sum-loss gradient is a sum of B terms of about the
    # same mean, so it grows like B; the mean-loss gradient estimates the expected
    # per-example gradient and stays put (its noise shrinks like 1/√B). So with a sum loss
    # the learning rate must shrink like 1/B to keep the step the same; with a mean loss it
    # need not change. Nested batches of 64 ... 1024 from one pool of data (the first B
    # examples: weight 1 or 1/B, the rest weight 0, so one compiled gradient serves all).
    pool = 1024
    pool_x, pool_y = _data(182, pool, sizes[0])
    batches = (64, 128, 256, 512, 1024)
    norms = []
    for B in batches:
        first = (np.arange(pool) < B).astype(np.float64)  # (pool,) 1 for the batch
        g_sum = ref_grad(layers, pool_x, pool_y, first)
        g_mean = ref_grad(layers, pool_x, pool_y, first / B)
        ctx.close(
            f"B = {B:4d}: ∇ sum loss = B · ∇ mean loss (relative)",
            _scaled(g_sum, _max_abs(g_sum)),
            _scaled(g_mean, _max_abs(g_sum) / B),
        )
        norms.append((_norm(g_sum), _norm(g_mean)))
    norms = np.array(norms)  # (len(batches), 2)
    ctx.say(f"  {'B':>5} {'‖∇ sum loss‖':>14} {'‖∇ mean loss‖':>14}")
    for B, (s, mn) in zip(batches, norms, strict=True):
        ctx.say(f"  {B:5d} {s:14.3f} {mn:14.4f}")
    # From B = 64 to 1024 (16×): the sum-loss gradient grows about 16× (the noise in each
    # batch's mean is about 10% here, so "about" is within 1.5×); the mean-loss one stays
    # within 1.5× of where it was.
    grow_sum, grow_mean = norms[-1] / norms[0]
    growth = batches[-1] // batches[0]
    ctx.check(
        f"B × {growth}: ‖∇ sum loss‖ grows {grow_sum:.1f}× (about {growth}×: within 1.5×)",
        growth / 1.5 < grow_sum < growth * 1.5,
    )
    ctx.check(
        f"B × {growth}: ‖∇ mean loss‖ changes {grow_mean:.2f}× (stays within 1.5×)",
        1 / 1.5 < grow_mean < 1.5,
    )

    # Memory, read from the compiled programs (XLA's buffer assignment: temp bytes are the
    # scratch buffers the program needs besides its inputs and outputs). At N = 4096,
    # width 256, the full-batch backward keeps every layer's activations for all N
    # examples; the accumulating scan keeps them for one microbatch of m = N/k at a time.
    big_sizes, big_N, big_k = [64, 256, 256, 256, 1], 4096, 16
    if ctx.small:
        big_N, big_k = 1024, 8
    big_layers = jax.eval_shape(lambda: jaxlinear.init_mlp(k_init, big_sizes))  # shapes only
    bx = jax.ShapeDtypeStruct((big_N, big_sizes[0]), jnp.float32)
    by = jax.ShapeDtypeStruct((big_N, 1), jnp.float32)
    bxs = jax.ShapeDtypeStruct((big_k, big_N // big_k, big_sizes[0]), jnp.float32)
    bys = jax.ShapeDtypeStruct((big_k, big_N // big_k, 1), jnp.float32)
    full = jax.jit(jax.grad(sum_loss)).lower(big_layers, bx, by).compile().memory_analysis()
    micro = accumulate.lower(big_layers, bxs, bys).compile().memory_analysis()
    if full is None or micro is None:
        ctx.say(f"  (no memory_analysis on {jax.default_backend()}: memory not checked)")
        return ctx.checks
    hidden = sum(big_sizes[1:-1])
    per_example = hidden * 4  # bytes of one example's hidden activations, float32
    ctx.say(
        f"  temp bytes, full batch of {big_N}:      {full.temp_size_in_bytes / 2**20:7.2f} MiB",
        f"  temp bytes, {big_k} microbatches of {big_N // big_k}: "
        f"{micro.temp_size_in_bytes / 2**20:7.2f} MiB",
        f"  one copy of the hidden activations: N·Σd·4 = {big_N * per_example / 2**20:.2f} MiB"
        f" (full batch), {big_N // big_k * per_example / 2**20:.2f} MiB (one microbatch)",
    )
    ctx.check(
        "the full-batch step holds at least one copy of all N examples' hidden activations",
        full.temp_size_in_bytes >= big_N * per_example,
    )
    ratio = full.temp_size_in_bytes / micro.temp_size_in_bytes
    ctx.check(
        f"the microbatched step needs at least k/4 = {big_k // 4}× less temp memory"
        f" ({ratio:.1f}× less)",
        ratio >= big_k / 4,
    )
    return ctx.checks


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init(key, sizes, dtype):
    """``jaxlinear.init_mlp`` compiled once (eagerly it runs op by op)."""
    return jaxlinear.init_mlp(key, sizes, dtype=dtype)


def _data(seed, n, d):
    """Inputs (n, d) ~ N(0, 1) and targets y = sin(x₀) + x₁² / 2 (n, 1), float64 NumPy."""
    x = np.random.default_rng(seed).standard_normal((n, d))
    return x, (np.sin(x[:, 0]) + 0.5 * x[:, 1] ** 2)[:, None]


def _ref_mlp(layers, x):
    """The tanh MLP on plain x @ W + b: every layer but the last followed by tanh."""
    for i, p in enumerate(layers):
        x = affine(x, p.W, p.b)
        x = jnp.tanh(x) if i < len(layers) - 1 else x
    return x


# Small reductions in NumPy: eager JAX would compile each little op once more.
def _max_abs(tree) -> float:
    return max(float(np.max(np.abs(np.asarray(a)))) for a in jax.tree.leaves(tree))


def _norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.asarray(a) ** 2) for a in jax.tree.leaves(tree))))


def _scaled(tree, scale):
    """Divide every leaf by ``scale`` (in NumPy): differences then read as relative errors."""
    return jax.tree.map(lambda a: np.asarray(a) / scale, tree)
