"""DP-SGD for a CNN: per-example norms of convolutions from the op's own rule, no vmap."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxlinear
from demos._common import Context, affine

CLASSES = 4  # a bar: horizontal, vertical, diagonal, anti-diagonal
SIZE = 8  # 8×8 grey images


def _bars(rng, n):
    """``n`` noisy 8×8 images of a bar at a random offset, and the bar's orientation."""
    labels = rng.integers(0, CLASSES, size=n)
    images = 0.3 * rng.normal(size=(n, SIZE, SIZE))
    idx = np.arange(SIZE)
    for i, (label, shift) in enumerate(zip(labels, rng.integers(1, SIZE - 1, size=n), strict=True)):
        if label == 0:
            images[i, shift, :] += 1.0
        elif label == 1:
            images[i, :, shift] += 1.0
        else:  # a diagonal through (shift, shift), either way
            cols = idx if label == 2 else SIZE - 1 - idx
            rows = (idx + shift - SIZE // 2) % SIZE
            images[i, rows, cols] += 1.0
    return images[..., None], labels  # (n, 8, 8, 1) channels last, (n,)


def run(ctx: Context):
    # demo 22 clipped the gradients of an MLP. A CNN's weights are convolution kernels,
    # and the per-example gradient of a kernel is a convolution too: with U_i example i's
    # input patches (one row per output position, T rows) and G_i its output cotangent,
    #
    #     w̄_i = U_iᵀ G_i        (T × k²C_in)ᵀ (T × C_out),
    #
    # the same shape of formula as a dense layer with T "positions". So the same two
    # routes apply, chosen per layer from the shapes (fastDP's rule):
    #   gram:        ‖w̄_i‖² = ⟨U_i U_iᵀ, G_i G_iᵀ⟩   when 2T² ≤ k²C_in · C_out,
    #   per_example: form w̄_i (n kernels, through the op's own transpose), else.
    # jaxlinear.clipped_grad reads these from each op's rule; only one forward and one
    # backward pass go through the network, and the clipped sum of each layer is its
    # transpose applied to G with example i's rows scaled by c_i = min(1, C/‖∇ℓ_i‖)
    # (or Σ_i c_i w̄_i, where the route has formed the w̄_i anyway).
    n, C, sigma, lr = 64, 6.0, 0.6, 0.1
    steps = 40 if ctx.small else 150
    rng = np.random.default_rng(24)

    def layer(*shape):  # He-normal W (fan-in: every axis but the last), zero b
        W = rng.normal(size=shape) * np.sqrt(2 / np.prod(shape[:-1]))
        return jaxlinear.Params(jnp.asarray(W), jnp.zeros(shape[-1]))

    params = {"conv1": layer(3, 3, 1, 8), "conv2": layer(3, 3, 8, 16), "head": layer(256, CLASSES)}

    def logits(params, x, conv=jaxlinear.conv, dense=jaxlinear.linear):
        h = jax.nn.relu(conv(params["conv1"], x))  # (n, 8, 8, 8)
        h = jax.nn.relu(conv(params["conv2"], h, strides=2))  # (n, 4, 4, 16)
        return dense(params["head"], h.reshape(h.shape[0], -1))  # (n, 4)

    def loss(params, x, y):
        """Per-example softmax cross-entropy: ``(n,)``."""
        logp = jax.nn.log_softmax(logits(params, x), axis=-1)
        return -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]

    # The reference model: plain lax.conv_general_dilated and x @ W + b, differentiated by
    # JAX itself (no jaxlinear code).
    def plain_conv(p, x, strides=1):
        y = lax.conv_general_dilated(
            x, p.W, (strides, strides), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y + p.b[None, None, None, :]

    def plain_loss(params, x, y):
        logp = jax.nn.log_softmax(
            logits(params, x, conv=plain_conv, dense=lambda p, h: affine(h, p.W, p.b)), axis=-1
        )
        return -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]

    def noise():
        """N(0, σ² C² I), one draw per parameter, in the structure of ``params``."""
        return jax.tree.map(lambda a: sigma * C * rng.normal(size=a.shape), params)

    x, y = _bars(rng, n)
    report = jaxlinear.per_example_routes(loss, params, x, y)
    ctx.say("  Route of every parameter (jaxlinear.per_example_routes):")
    ctx.say(*("    " + line for line in str(report).splitlines()))
    ctx.say(
        "  conv1: T = 64 positions, k²C_in·C_out = 9·8 = 72 < 2T²: each w̄_i formed (72 numbers);"
        "\n  conv2 (stride 2): T = 16, 72·16 = 1152 ≥ 2T² = 512: Gram matrices (16×16);"
        "\n  head: one row per example (T = 1): ‖x_i‖² ‖g_i‖²."
    )
    routes = {r.leaf: r.route for r in report}
    ctx.check(
        "no parameter takes the vmap fallback; the convs take both routes",
        "fallback" not in routes.values()
        and routes["params['conv1'].W"] == "per_example"
        and routes["params['conv2'].W"] == "gram"
        and routes["params['head'].W"] == "rank_one",
    )

    @jax.jit
    def dp_step(params, x, y, z):
        grads, norms = jaxlinear.clipped_grad(loss, params, x, y, clip_norm=C, fallback="raise")
        noisy = jax.tree.map(lambda g, z: (g + z) / n, grads, z)
        return jax.tree.map(lambda p, u: p - lr * u, params, noisy), norms

    @jax.jit
    def textbook_step(params, x, y, z):
        """Every per-example gradient formed (vmap of grad), each clipped, summed; noise."""
        per_example = jax.vmap(
            lambda x, y: jax.grad(lambda p: plain_loss(p, x[None], y[None])[0])(params)
        )(x, y)  # every leaf (n, *shape): n copies of every kernel
        flat = jnp.concatenate([a.reshape(n, -1) for a in jax.tree.leaves(per_example)], 1)
        norms = jnp.linalg.norm(flat, axis=1)
        factors = jnp.minimum(1.0, C / norms)
        clipped = jax.tree.map(lambda a: jnp.tensordot(factors, a, axes=1), per_example)
        noisy = jax.tree.map(lambda g, z: (g + z) / n, clipped, z)
        new = jax.tree.map(lambda p, u: p - lr * u, params, noisy)
        return new, norms, jnp.linalg.norm(flat * factors[:, None], axis=1)

    ctx.say(f"  CNN conv 1→8, conv 8→16 stride 2, dense 256→4; n={n}, C={C}, σ={sigma}, η={lr}")
    z = noise()
    after, norms = dp_step(params, x, y, z)
    want, want_norms, clipped_norms = textbook_step(params, x, y, z)
    norms, clipped_norms = np.asarray(norms), np.asarray(clipped_norms)
    active = int(np.sum(norms > C))
    ctx.say(
        f"  step 0: per-example gradient norms {norms.min():.3f} … {norms.max():.3f};"
        f" {active} of {n} are clipped to C"
    )
    ctx.close("the per-example norms equal the textbook ‖vmap(grad)‖", norms, want_norms)
    ctx.close("the DP-SGD step equals the textbook one (same noise)", after, want)
    ctx.check(
        f"every clipped per-example gradient has norm ≤ C = {C}"
        f" (largest {clipped_norms.max():.15f})",
        np.all(clipped_norms <= C * (1 + 1e-12)),
    )
    ctx.check("clipping was active for some examples and not for others", 0 < active < n)

    # Train on fresh batches; measure held-out accuracy before and after.
    x_test, y_test = _bars(rng, 512)

    predict = jax.jit(lambda params, x: jnp.argmax(logits(params, x), axis=1))

    def accuracy(params):
        return float(np.mean(np.asarray(predict(params, x_test)) == y_test))

    before = accuracy(params)
    start = time.perf_counter()
    trained = params
    for _ in range(steps):
        trained, _ = dp_step(trained, *_bars(rng, n), noise())
    seconds = time.perf_counter() - start
    acc = accuracy(trained)
    ctx.say(
        f"  {steps} DP-SGD steps in {seconds:.2f} s; held-out accuracy {before:.0%} → {acc:.0%}"
        f" (chance {1 / CLASSES:.0%})"
    )
    ctx.check("DP-SGD learned the bars (held-out accuracy ≥ 60%)", acc >= 0.6)
    step = (*_bars(rng, n), noise())
    ctx.close(
        "a later step also equals the textbook one",
        dp_step(trained, *step)[0],
        textbook_step(trained, *step)[0],
    )
    return ctx.checks
