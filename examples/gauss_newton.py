"""Forward mode pays: Levenberg–Marquardt through ``jax.linearize`` on ``dual_linear``, vs Adam.

A small tanh network (10 -> 12 -> 1, 145 parameters) fitted by least squares to
scikit-learn's bundled diabetes data (442 patients, 10 features; no download). Each
Levenberg–Marquardt step needs the Jacobian ``J`` of the ``n`` residuals in the ``p``
parameters: ``jax.linearize`` gives the pushforward ``v -> J v`` once, and ``p`` pushes of
the unit vectors (one ``vmap``) give ``J``: ``p`` forward-mode products instead of ``n``
reverse-mode ones, fewer here since ``p = 145 < n = 331``. Forward mode needs the dual
binding: ``jaxlinear.mlp(..., layer=jaxlinear.dual_linear)``, whose JVP rule is the
pushforward; ``jaxlinear.linear`` (a ``custom_vjp``) refuses it, as the script shows.

The step solves ``(JᵀJ + λI) δ = -Jᵀ r`` and keeps it if the loss goes down (then λ /= 3),
else raises λ (×2). Adam (optax) runs the same number of full-batch steps from the same
initial weights, and also 10× as many, for reference.

    python -m examples.gauss_newton            # full run
    python -m examples.gauss_newton --smoke    # a few steps, seconds
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python examples/gauss_newton.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import jaxlinear
from examples import _common


def diabetes(seed: int = 0):
    """Standardized features ``(n, 10)`` and target ``(n, 1)``, split 75/25 (float32)."""
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split

    x, y = load_diabetes(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y[:, None], test_size=0.25, random_state=seed)
    mx, sx, my, sy = x_tr.mean(0), x_tr.std(0), y_tr.mean(0), y_tr.std(0)
    return tuple(
        np.asarray(a, np.float32)
        for a in ((x_tr - mx) / sx, (y_tr - my) / sy, (x_te - mx) / sx, (y_te - my) / sy)
    )


def main(argv=None) -> dict:
    p = _common.parser(__doc__.splitlines()[0], steps=40)
    p.add_argument("--hidden", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate")
    args = _common.parse(p, argv)

    x_tr, y_tr, x_te, y_te = diabetes(args.seed)
    layers = jaxlinear.init_mlp(args.seed, [x_tr.shape[1], args.hidden, 1])
    theta0, unravel = ravel_pytree(layers)  # (p,) flat parameters
    n, n_params = len(x_tr), theta0.size
    print(f"diabetes: {n} training, {len(x_te)} test rows; network 10 -> {args.hidden} -> 1,"
          f" p = {n_params} parameters, n = {n} residuals")  # fmt: skip

    def predict(theta, x, layer=jaxlinear.dual_linear):  # (m, 10) -> (m, 1)
        return jaxlinear.mlp(unravel(theta), x, activation=jnp.tanh, layer=layer)

    def residuals(theta):  # (n,): ‖r‖² is the training MSE
        return (predict(theta, x_tr) - y_tr)[:, 0] / np.sqrt(n)

    def mse(theta, x, y):
        return jnp.mean((predict(theta, x) - y) ** 2)

    try:  # forward mode into the custom_vjp binding: JAX refuses it
        jax.linearize(lambda t: predict(t, x_tr, jaxlinear.linear), theta0)
    except TypeError as e:
        print(f"jax.linearize through jaxlinear.linear raises TypeError as expected:"
              f" {str(e).splitlines()[0][:70]}")  # fmt: skip

    def jacobian_fwd(theta):  # (n, p): p pushforwards through dual_linear
        r, push = jax.linearize(residuals, theta)
        return r, jax.vmap(push, out_axes=1)(jnp.eye(theta.size, dtype=theta.dtype))

    @jax.jit
    def lm_step(theta, lam):
        r, J = jacobian_fwd(theta)  # (n,), (n, p)
        A = J.T @ J + lam * jnp.eye(theta.size)  # (p, p)
        delta = jnp.linalg.solve(A, -J.T @ r)  # (p,)
        old, new = r @ r, jnp.sum(residuals(theta + delta) ** 2)
        better = new < old
        theta = jnp.where(better, theta + delta, theta)
        return theta, jnp.where(better, lam / 3, lam * 2), jnp.minimum(new, old)

    def run_lm(steps):
        theta, lam, curve = theta0, jnp.float32(1e-2), []
        progress = _common.Progress(steps, lines=5)
        for i in range(1, steps + 1):
            theta, lam, loss = lm_step(theta, lam)
            curve.append(float(loss))
            if progress.due(i):
                progress(i, curve[-1], lam=float(lam))
        return theta, curve, progress.seconds

    optimizer = optax.adam(args.lr)

    @jax.jit
    def adam_step(theta, state):
        loss, g = jax.value_and_grad(lambda t: mse(t, x_tr, y_tr))(theta)
        updates, state = optimizer.update(g, state, theta)
        return optax.apply_updates(theta, updates), state, loss

    def run_adam(steps, *, quiet=False):
        step = adam_step
        theta, state, curve = theta0, optimizer.init(theta0), []
        progress = _common.Progress(steps, lines=5)
        for i in range(1, steps + 1):
            theta, state, loss = step(theta, state)
            curve.append(float(loss))
            if progress.due(i) and not quiet:
                progress(i, curve[-1])
        # the loss after the last update, to compare with the LM curve's last point
        curve.append(float(adam_step(theta, state)[2]))
        return theta, curve[1:], progress.seconds

    print("-- Levenberg–Marquardt, Jacobian by forward mode (jax.linearize + vmap)")
    theta_lm, lm_curve, lm_s = run_lm(args.steps)
    print(f"-- Adam (optax, lr {args.lr}), the same {args.steps} steps")
    theta_adam, adam_curve, adam_s = run_adam(args.steps)
    long = 10 * args.steps
    theta_long, long_curve, _ = run_adam(long, quiet=True)
    print(f"-- Adam, {long} steps: training MSE {long_curve[-1]:.4f}")

    # What forward mode buys: building J by p pushforwards vs n pullbacks (not a benchmark).
    jac_fwd = jax.jit(lambda t: jacobian_fwd(t)[1])
    jac_rev = jax.jit(jax.jacrev(residuals))
    np.testing.assert_allclose(jac_fwd(theta0), jac_rev(theta0), rtol=1e-4, atol=1e-5)
    times, repeats = {}, 1 if args.smoke else 20
    for name, f in (("forward", jac_fwd), ("reverse", jac_rev)):
        f(theta0).block_until_ready()
        start = time.perf_counter()
        for _ in range(repeats):
            f(theta0).block_until_ready()
        times[name] = (time.perf_counter() - start) / repeats
    print(
        f"Jacobian ({n}×{n_params}): jacfwd via linearize {times['forward'] * 1e3:.2f} ms,"
        f" jacrev {times['reverse'] * 1e3:.2f} ms (same values; one machine, one run)"
    )

    test_mse = jax.jit(lambda t: mse(t, x_te, y_te))
    test = {k: float(test_mse(t)) for k, t in (("lm", theta_lm), ("adam", theta_adam),
                                                       ("long", theta_long))}  # fmt: skip
    print(f"LM {lm_s:.1f} s, Adam {adam_s:.1f} s for {args.steps} steps")
    print(
        f"final: training MSE after {args.steps} steps: Levenberg–Marquardt {lm_curve[-1]:.4f},"
        f" Adam {adam_curve[-1]:.4f} (Adam after {long}: {long_curve[-1]:.4f});"
        f" test MSE {test['lm']:.4f} vs {test['adam']:.4f} ({test['long']:.4f})"
    )

    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(np.arange(1, long + 1), long_curve, color="0.7", lw=0.8, label=f"Adam, {long} steps")
    ax.plot(np.arange(1, args.steps + 1), adam_curve, marker=".", label="Adam")
    ax.plot(np.arange(1, args.steps + 1), lm_curve, marker=".", label="Levenberg–Marquardt")
    ax.set(xlabel="step", ylabel="training MSE (standardized target)", xscale="log", yscale="log")
    ax.legend()
    ax.set_title(
        f"10→{args.hidden}→1 tanh net on diabetes: LM via jax.linearize on dual_linear",
        fontsize=10,
    )
    _common.save(fig, args.out, "gauss_newton.png")
    return {"lm_mse": lm_curve[-1], "adam_mse": adam_curve[-1], "test_mse_lm": test["lm"]}


if __name__ == "__main__":
    main()
