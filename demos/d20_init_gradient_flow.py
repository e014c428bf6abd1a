"""Initialization and gradient flow: through 20 layers the signal keeps, vanishes or explodes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxlinear
from demos._common import Context, affine

DEPTH = 20


def run(ctx: Context):
    # A 20-layer MLP, every layer d × d with zero bias, and a batch of n random inputs.
    # Each layer multiplies the signal by W (entries of variance c/d) and then applies the
    # activation; the backward pass multiplies the cotangent by the activation's slope and
    # then by Wᵀ: a chain of 20 transposes. Whether the signal survives depends on c.
    d, n = (128, 256) if not ctx.small else (128, 128)
    sizes = [d] * (DEPTH + 1)
    x = jnp.asarray(np.random.default_rng(20).standard_normal((n, d)), jnp.float32)
    r = jnp.asarray(np.random.default_rng(21).standard_normal((n, d)), jnp.float32)
    key = jax.random.key(20)

    # Every scheme in jaxlinear.SCHEMES, and two bad scales, all from the same key. For
    # d_in = d_out the variances are 1/d (LeCun, Glorot) and 2/d (He); "xavier_*" are other
    # names for "glorot_*" and draw the same weights.
    inits = {s: jaxlinear.init_mlp(key, sizes, scheme=s) for s in jaxlinear.SCHEMES}
    for alias in ("xavier_normal", "xavier_uniform"):
        glorot = alias.replace("xavier", "glorot")
        ctx.close(
            f"{alias} draws exactly the weights of {glorot}", inits[alias], inits[glorot], tol=0
        )
        del inits[alias]
    # The bad scales: the same truncated normal as he_normal, variance c/d with c = 1/2
    # (too small) and c = 8 (too large): their weights are √(c/2) times He's.
    for c in (0.5, 8.0):
        init = jax.nn.initializers.variance_scaling(c, "fan_in", "truncated_normal")
        inits[f"c = {c:g}"] = jaxlinear.init_mlp(key, sizes, scheme=init)
    c_of = {s: (2.0 if s.startswith("he") else 1.0) for s in inits} | {"c = 0.5": 0.5, "c = 8": 8.0}

    stats = {}  # (activation, scheme) -> (act std (DEPTH,), ‖δ_l‖ (DEPTH,), ‖dW_l‖ (DEPTH,))
    for act_name, act in (("tanh", jnp.tanh), ("relu", jax.nn.relu)):
        for s, layers in inits.items():
            stats[act_name, s] = tuple(np.asarray(a) for a in _profile(layers, x, r, act))

    # The numbers come from jaxlinear's layers; check one profile against JAX's own AD of
    # the plain network in float64.
    layers = inits["lecun_normal"]
    got = _profile(layers, x, r, jnp.tanh)
    want = _profile_ref(*map(_f64, (layers, x, r)))
    ctx.close(
        "act std, ‖δ_l‖ and ‖dW_l‖ (tanh, LeCun) = float64 plain AD, relative to 1e-5",
        [np.asarray(a) / np.asarray(b) for a, b in zip(got, want, strict=True)],
        [np.ones(DEPTH)] * 3,
        tol=1e-5,
    )

    # ReLU with He: the variance of relu(z) is half that of z, and c = 2 gives it back, so
    # the activations keep their size through all 20 layers, up to the fluctuation of each
    # random layer: its squared gain is 1 ± about √(2/d), a random walk over 20 layers. At
    # d = 128 that stays within a factor 2 (over 40 seeds we saw max/min from 1.2 to 2.1).
    for s in ("he_normal", "he_uniform"):
        std = stats["relu", s][0]
        spread = std.max() / std.min()
        ctx.check(
            f"ReLU, {s}: the activation std stays within a factor 2 over {DEPTH} layers"
            f" (max/min {spread:.2f})",
            spread <= 2,
        )

    # The normal schemes and the bad scales all draw the same truncated normal from the
    # same key, so their weights are exactly √(c/2) times He's (c = 1 for LeCun and
    # Glorot). ReLU is positively homogeneous (relu(a·z) = a·relu(z) for a > 0) and the
    # biases are zero, so layer l's activations are exactly √(c/2)^l times He's.
    # That is the predicted gain per layer, √(c/2): 1/√2 for LeCun and Glorot (vanishing
    # by 2^(−19/2) ≈ 1.4e-3 over the stack), 1/2 for c = 1/2, 2 for c = 8.
    he = stats["relu", "he_normal"]
    for s in ("lecun_normal", "glorot_normal", "c = 0.5", "c = 8"):
        gain = np.sqrt(c_of[s] / 2)
        std, _, dW = stats["relu", s]
        per_layer = (std / he[0]) / gain ** np.arange(1, DEPTH + 1)
        ctx.close(
            f"ReLU, {s}: activation std = He's × √(c/2)^l, gain {gain:.3f} per layer (relative)",
            per_layer,
            np.ones(DEPTH),
            tol=1e-4,
        )
        # The loss ⟨r, y⟩/n is linear in the output, and the net is homogeneous of degree
        # one in every W_l: so every ‖dW_l‖ is He's times √(c/2)^(L−1), the same factor for
        # every layer. The gradient vanishes or explodes all at once, not layer by layer.
        ctx.close(
            f"ReLU, {s}: ‖dW_l‖ = He's × √(c/2)^{DEPTH - 1} at every layer (relative)",
            dW / he[2] / gain ** (DEPTH - 1),
            np.ones(DEPTH),
            tol=1e-4,
        )

    # tanh is not homogeneous; the predictions come from the mean-field recursion for
    # the variance q of a pre-activation: q ← c·E[tanh(√q ξ)²], ξ ~ N(0, 1) (Gauss–Hermite
    # quadrature below, plain NumPy). With c = 1/2 the signal shrinks to the linear regime,
    # where tanh ≈ identity and the gain per layer is √c. With c = 8 it saturates at a
    # fixed point q*, and each layer multiplies the backward signal by
    # √χ, χ = c·E[tanh'(√q* ξ)²] > 1: gradients explode going back.
    std, delta, _ = stats["tanh", "c = 0.5"]
    last = np.exp(np.mean(np.log(std[DEPTH // 2 :] / std[DEPTH // 2 - 1 : -1])))
    ctx.check(
        f"tanh, c = 1/2: activations shrink by √c = {np.sqrt(0.5):.3f} per layer once small"
        f" (measured over layers {DEPTH // 2}–{DEPTH}: {last:.3f}, within 5%)",
        abs(last / np.sqrt(0.5) - 1) < 0.05,
    )
    q_star, chi = _mean_field(8.0)
    std, delta, _ = stats["tanh", "c = 8"]
    back = np.exp(np.mean(np.log(delta[:-1] / delta[1:])))  # per layer, going backward
    ctx.say(
        f"  tanh, c = 8: fixed point q* = {q_star:.2f},"
        f" predicted backward gain √χ = {np.sqrt(chi):.3f}"
    )
    # At the fixed point E[h²] = E[tanh(z)²] = q*/c: the activations neither vanish nor
    # explode, they saturate.
    late = np.mean(std[DEPTH // 2 :])
    ctx.check(
        f"tanh, c = 8: activations settle at std √(q*/c) = {np.sqrt(q_star / 8):.3f}"
        f" (layers {DEPTH // 2}–{DEPTH}: {late:.3f}, within 5%)",
        abs(late / np.sqrt(q_star / 8) - 1) < 0.05,
    )
    ctx.check(
        f"tanh, c = 8: ‖δ_l‖ grows by √χ = {np.sqrt(chi):.3f} per layer going back"
        f" (measured {back:.3f}, within 10%)",
        abs(back / np.sqrt(chi) - 1) < 0.1,
    )

    ctx.say(f"  {'':10} {'scheme':16} {'std(h_1)':>9} {'std(h_L)':>9} {'‖dW_1‖':>9} {'‖dW_L‖':>9}")
    for (act_name, s), (std, _, dW) in stats.items():
        ctx.say(f"  {act_name:10} {s:16} {std[0]:9.2e} {std[-1]:9.2e} {dW[0]:9.2e} {dW[-1]:9.2e}")

    if ctx.plots:
        _figure(ctx, stats, inits, d, n)
    return ctx.checks


@functools.partial(jax.jit, static_argnums=3)
def _profile(layers, x, r, act):
    """Per layer l = 1..L: std of the output h_l, ‖δ_l‖ = ‖∂loss/∂z_l‖ and ‖∂loss/∂W_l‖.

    ``z_l = h_{l−1} W_l + b_l`` (jaxlinear.linear), ``h_l = act(z_l)`` (the last layer too,
    so every layer is alike), ``loss = ⟨r, h_L⟩ / n``. ``δ_l`` is read by adding a zero
    probe to every ``z_l`` and differentiating with respect to the probes.
    """
    return _profile_with(lambda p, h: jaxlinear.linear(p, h), layers, x, r, act)


def _profile_ref(layers, x, r):
    """The same in float64 on plain x @ W + b (tanh), for the reference check."""
    return jax.jit(_profile_with, static_argnums=(0, 4))(
        lambda p, h: affine(h, p.W, p.b), layers, x, r, jnp.tanh
    )


def _profile_with(layer, layers, x, r, act):
    def loss(layers, probes):
        h, stds = x, []
        for p, probe in zip(layers, probes, strict=True):
            h = act(layer(p, h) + probe)  # (n, d)
            stds.append(jnp.std(h))
        return jnp.sum(r * h) / x.shape[0], jnp.stack(stds)

    probes = [jnp.zeros_like(x) for _ in layers]
    (g_layers, deltas), stds = jax.grad(loss, argnums=(0, 1), has_aux=True)(layers, probes)
    delta_norms = jnp.stack([jnp.linalg.norm(dz) for dz in deltas])
    dW_norms = jnp.stack([jnp.linalg.norm(g.W) for g in g_layers])
    return stds, delta_norms, dW_norms


def _f64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _mean_field(c, iters=200):
    """Fixed point q* of q ← c·E[tanh(√q ξ)²] and χ = c·E[tanh'(√q* ξ)²], ξ ~ N(0, 1)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)  # ∫ f(ξ) e^{−ξ²/2} dξ
    weights = weights / weights.sum()  # expectation under N(0, 1)
    q = 1.0
    for _ in range(iters):
        q = c * np.sum(weights * np.tanh(np.sqrt(q) * nodes) ** 2)
    chi = c * np.sum(weights * (1 - np.tanh(np.sqrt(q) * nodes) ** 2) ** 2)
    return q, chi


def _figure(ctx: Context, stats, inits, d, n):
    plt = ctx.pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), layout="constrained", sharex=True)
    layer = np.arange(1, DEPTH + 1)
    styles = {
        "lecun_normal": ("C0", "-", "o"),  # under glorot_*: the same variance here
        "lecun_uniform": ("C0", ":", "s"),
        "glorot_normal": ("C2", "-", "^"),
        "glorot_uniform": ("C2", ":", "v"),
        "he_normal": ("C1", "-", "o"),
        "he_uniform": ("C1", ":", "s"),
        "c = 0.5": ("C4", "--", "x"),
        "c = 8": ("C3", "--", "+"),
    }
    titles = (
        "activation std of $h_l$",
        r"backward signal $\|\partial L/\partial z_l\|$",
        r"weight gradient $\|\partial L/\partial W_l\|$",
    )
    for row, act_name in enumerate(("tanh", "relu")):
        for col in range(3):
            ax = axes[row, col]
            for s in inits:
                color, ls, marker = styles[s]
                ax.semilogy(
                    layer,
                    stats[act_name, s][col],
                    color=color,
                    ls=ls,
                    marker=marker,
                    ms=3.5,
                    lw=4 if s.startswith("lecun") else 1.5,  # LeCun = Glorot for square W
                    alpha=0.45 if s.startswith("lecun") else 1.0,
                    label=s,
                )
            ax.set_title(f"{act_name}: {titles[col]}", fontsize=10)
            ax.grid(True, which="major", alpha=0.3)
            if row == 1:
                ax.set_xlabel("layer l")
    axes[0, 0].legend(fontsize=8, ncol=2)
    axes[1, 0].set_xticks([1, 5, 10, 15, 20])
    fig.suptitle(
        f"A {DEPTH}-layer MLP, {d}×{d} layers, batch {n}: which init keeps the signal\n"
        "weights of variance c/d: LeCun and Glorot c = 1 (the same for square layers),"
        " He c = 2, and the bad scales c = 0.5 and c = 8"
    )
    ctx.save(fig, "init_gradient_flow.png")
