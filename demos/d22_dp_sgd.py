"""DP-SGD: per-example clipping from the layers' structure, Gaussian noise, update."""

from __future__ import annotations

import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxlinear
from demos._common import Context, affine


def run(ctx: Context):
    # Differentially private SGD (Abadi et al., 2016) changes one thing in a training
    # step: before the per-example gradients are summed, each is clipped to norm ≤ C,
    #
    #     ḡ = Σ_i min(1, C / ‖∇ℓ_i‖) ∇ℓ_i  +  N(0, σ² C² I),      θ ← θ − η ḡ / n,
    #
    # so no single example can move the parameters by more than C (before the noise).
    # The textbook way forms all n per-example gradients with jax.vmap(jax.grad(...)):
    # n copies of every weight. jaxlinear.clipped_grad gets ‖∇ℓ_i‖ from the layers'
    # structure (‖x_i‖·‖g_i‖ per dense layer) and the clipped sum as Xᵀ diag(c) G: no
    # per-example gradient is formed. Here both are run on the same data and noise.
    sizes, n, C, sigma, lr = [2, 16, 16, 1], 32, 2.0, 0.8, 0.5
    steps = 60 if ctx.small else 300
    rng = np.random.default_rng(22)  # data and noise drawn here, outside the compiled steps
    layers = [
        jaxlinear.Params(
            jnp.asarray(rng.normal(size=(d_in, d_out)) / np.sqrt(d_in)), jnp.zeros(d_out)
        )
        for d_in, d_out in itertools.pairwise(sizes)
    ]

    def batch():
        """Two Gaussian blobs in the plane, labels ±1: x (n, 2), y (n,)."""
        y = rng.choice([-1.0, 1.0], size=n)
        return rng.normal(size=(n, 2)) + y[:, None], y

    def noise():
        """N(0, σ² C² I), one draw per parameter, in the structure of ``layers``."""
        return jax.tree.map(lambda a: sigma * C * rng.normal(size=a.shape), layers)

    def loss(layers, x, y):
        """Per-example logistic loss log(1 + exp(−y f(x))): (n,). jaxlinear layers."""
        return jax.nn.softplus(-y * jaxlinear.mlp(layers, x, activation=jnp.tanh)[:, 0])

    @jax.jit
    def dp_step(layers, x, y, z):
        grads, norms = jaxlinear.clipped_grad(loss, layers, x, y, clip_norm=C)
        noisy = jax.tree.map(lambda g, z: (g + z) / n, grads, z)
        return jax.tree.map(lambda p, u: p - lr * u, layers, noisy), norms

    # The textbook step, on plain x @ W + b (no jaxlinear code): every per-example
    # gradient formed, each clipped, summed; then the same noise and update.
    def plain_loss(layers, x, y):
        h = x
        for i, p in enumerate(layers):
            h = affine(h, p.W, p.b)
            h = jnp.tanh(h) if i < len(layers) - 1 else h
        return jax.nn.softplus(-y * h[:, 0])

    @jax.jit
    def textbook_step(layers, x, y, z):
        per_example = jax.vmap(
            lambda x, y: jax.grad(lambda p: plain_loss(p, x[None], y[None])[0])(layers)
        )(x, y)  # every leaf (n, *shape): n copies of every weight
        flat = jnp.concatenate([a.reshape(n, -1) for a in jax.tree.leaves(per_example)], 1)
        norms = jnp.linalg.norm(flat, axis=1)
        factors = jnp.minimum(1.0, C / norms)
        clipped = jax.tree.map(lambda a: jnp.tensordot(factors, a, axes=1), per_example)
        clipped_norms = jnp.linalg.norm(flat * factors[:, None], axis=1)
        noisy = jax.tree.map(lambda g, z: (g + z) / n, clipped, z)
        return jax.tree.map(lambda p, u: p - lr * u, layers, noisy), norms, clipped_norms

    ctx.say(f"  MLP {' → '.join(map(str, sizes))}, tanh, batch n={n}, C={C}, σ={sigma}, η={lr}")
    step = (*batch(), noise())  # x, y and the noise: one draw, given to both paths
    after, norms = dp_step(layers, *step)
    want, want_norms, clipped_norms = textbook_step(layers, *step)
    norms, clipped_norms = np.asarray(norms), np.asarray(clipped_norms)
    clipped = int(np.sum(norms > C))
    ctx.say(
        f"  step 0: per-example gradient norms {norms.min():.3f} … {norms.max():.3f};"
        f" {clipped} of {n} are clipped to C"
    )
    ctx.close("the per-example norms equal the textbook ‖vmap(grad)‖", norms, want_norms)
    ctx.close("the DP-SGD update equals the textbook one (same noise)", after, want)
    ctx.check(
        f"after clipping every per-example gradient has norm ≤ C = {C}"
        f" (largest {clipped_norms.max():.15f})",
        np.all(clipped_norms <= C * (1 + 1e-12)),
    )
    ctx.check("clipping was active for some examples and not for others", 0 < clipped < n)

    # Train; then compare with the textbook step again, from the trained parameters.
    start = time.perf_counter()
    params, medians = layers, []
    for _ in range(steps):
        params, norms = dp_step(params, *batch(), noise())
        medians.append(norms)
    medians = np.median(np.asarray(jax.device_get(medians)), axis=1)
    seconds = time.perf_counter() - start
    h, y_test = batch()  # held-out points, through the trained MLP in NumPy
    for i, p in enumerate(params):
        h = h @ np.asarray(p.W) + np.asarray(p.b)[None, :]
        h = np.tanh(h) if i < len(params) - 1 else h
    accuracy = float(np.mean(np.sign(h[:, 0]) == y_test))
    ctx.say(
        f"  {steps} DP-SGD steps in {seconds:.2f} s; held-out accuracy {accuracy:.0%};"
        f" median per-example norm {medians[0]:.3f} → {medians[-1]:.3f}"
    )
    ctx.check("DP-SGD learned the two blobs (held-out accuracy ≥ 75%)", accuracy >= 0.75)
    step = (*batch(), noise())
    ctx.close(
        "a later step also equals the textbook one",
        dp_step(params, *step)[0],
        textbook_step(params, *step)[0],
    )
    # (The privacy budget ε for these σ, n and steps comes from an accountant, e.g. the
    # moments accountant; it is out of scope here: the step itself is what is checked.)
    return ctx.checks
