"""DP-SGD on scikit-learn's digits: ``jaxlinear.clipped_grad``, Gaussian noise, and the ε spent.

The CNN of ``cnn_digits`` trained with differential privacy (Abadi et al., 2016):

- **Sampling: Poisson.** At every step each training example joins the batch independently
  with probability ``q = batch / n`` (expected batch ``batch``; the actual size varies).
  The sampled examples are padded to a fixed buffer with a mask (masked examples have
  zero loss, hence zero gradient), so the step compiles once; the buffer holds
  ``q·n + 8σ_binomial`` examples, and a larger draw stops the run rather than truncate it
  (probability below 1e-15 per step).
- **Clipping:** ``jaxlinear.clipped_grad`` gives ``Σ_i min(1, C/‖∇ℓ_i‖) ∇ℓ_i`` over the
  sampled examples (per-example norms from the layers' structure where it applies, a
  ``vmap`` of per-example gradients for the rest, ``fallback="vmap"``).
- **Noise:** ``N(0, σ²C²)`` added to every coordinate of that sum, which is then divided
  by the *expected* batch size ``q·n`` and handed to Adam (post-processing).
- **Accounting:** ``dp_accounting``'s PLD (privacy loss distribution) accountant for
  ``T`` compositions of the Poisson-subsampled Gaussian mechanism (noise multiplier σ,
  rate q), add-or-remove-one adjacency, converted to (ε, δ) (its RDP accountant gives a
  looser ε, about 10% larger here). Not accounted: choosing the hyperparameters (they were
  set by hand, with test-set feedback), which a rigorous release would also have to pay for.

The non-private run trains the same network on the same Poisson batches with the plain
mean gradient (no clipping, no noise).

    python -m examples.dp_digits            # full run
    python -m examples.dp_digits --smoke    # a few steps, seconds
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python examples/dp_digits.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlinear
from examples import _common
from examples.cnn_digits import accuracy, init_cnn, per_example_loss


def epsilon(*, q: float, sigma: float, steps: int, delta: float) -> float:
    """ε of ``steps`` Poisson-subsampled Gaussian mechanisms (rate ``q``, noise multiplier
    ``sigma``) at ``delta``, from ``dp_accounting``'s PLD accountant."""
    from dp_accounting import dp_event, pld

    accountant = pld.PLDAccountant()
    event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
    accountant.compose(event, steps)
    return accountant.get_epsilon(delta)


def poisson_batches(n: int, q: float, steps: int, *, seed: int):
    """Per step: ``(indices, mask)``, both ``(buffer,)``: example ``i`` is in the batch with
    probability ``q``, independently of the others and of the other steps."""
    sd = math.sqrt(n * q * (1 - q))
    buffer = min(n, math.ceil(n * q + 8 * sd))  # P(Binomial > buffer) < 1e-15
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        chosen = np.flatnonzero(rng.random(n) < q)
        if len(chosen) > buffer:  # would bias the sampling: stop instead of truncating
            raise RuntimeError(f"sampled {len(chosen)} > buffer {buffer} examples")
        idx = np.zeros(buffer, np.int64)
        idx[: len(chosen)] = chosen
        yield idx, np.arange(buffer) < len(chosen)


def train(args, data, *, private: bool):
    x_tr, y_tr, x_te, y_te = data
    n, expected = len(x_tr), args.batch
    q = expected / n
    params = init_cnn(jax.random.key(args.seed), width=4 if args.smoke else 16)
    optimizer = optax.adam(args.lr)
    opt_state = optimizer.init(params)
    C, sigma = args.clip, args.sigma

    def masked_loss(params, x, y, mask):  # (n_buffer,) per-example losses; 0 where masked
        return jnp.where(mask, per_example_loss(params, x, y), 0.0)

    @jax.jit
    def dp_step(params, opt_state, x, y, mask, key):
        clipped, norms = jaxlinear.clipped_grad(masked_loss, params, x, y, mask, clip_norm=C)
        leaves, treedef = jax.tree.flatten(clipped)
        keys = jax.random.split(key, len(leaves))
        noisy = [
            g + sigma * C * jax.random.normal(k, g.shape, g.dtype)
            for g, k in zip(leaves, keys, strict=True)
        ]
        grads = jax.tree.map(lambda g: g / expected, jax.tree.unflatten(treedef, noisy))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        loss = jnp.sum(masked_loss(params, x, y, mask)) / jnp.maximum(jnp.sum(mask), 1)
        clipped_frac = jnp.sum(mask & (norms > C)) / jnp.maximum(jnp.sum(mask), 1)
        return optax.apply_updates(params, updates), opt_state, loss, clipped_frac

    @jax.jit
    def plain_step(params, opt_state, x, y, mask, key):
        def loss_fn(p):
            return jnp.sum(masked_loss(p, x, y, mask)) / jnp.maximum(jnp.sum(mask), 1)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, jnp.zeros(())

    step = dp_step if private else plain_step
    print(
        f"-- {'DP-SGD' if private else 'non-private'}" + (f" (C={C}, σ={sigma})" if private else "")
    )
    progress = _common.Progress(args.steps, lines=5)
    key = jax.random.key(args.seed + 1)
    losses, evals = [], []
    batches = poisson_batches(n, q, args.steps, seed=args.seed)
    for i, (idx, mask) in enumerate(batches, start=1):
        key, k = jax.random.split(key)
        params, opt_state, loss, frac = step(params, opt_state, x_tr[idx], y_tr[idx], mask, k)
        losses.append(float(loss))
        if progress.due(i):
            acc = float(accuracy(params, x_te, y_te))
            evals.append((i, acc))
            extra = {"fraction_clipped": float(frac)} if private else {}  # of the batch
            progress(i, losses[-1], test_acc=acc, **extra)
    return np.array(losses), evals, progress.seconds


def main(argv=None) -> dict:
    p = _common.parser(__doc__.splitlines()[0], steps=400)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--batch", type=int, default=64, help="expected batch size q·n")
    p.add_argument("--clip", type=float, default=1.0, help="clip norm C")
    p.add_argument("--sigma", type=float, default=1.2, help="noise multiplier σ")
    p.add_argument("--delta", type=float, default=1e-5)
    args = _common.parse(p, argv)
    if args.smoke:
        args.batch = 16

    data = _common.digits(smoke=args.smoke, seed=args.seed)
    n = len(data[0])
    q = args.batch / n
    eps = epsilon(q=q, sigma=args.sigma, steps=args.steps, delta=args.delta)
    print(
        f"digits: {n} training images; Poisson sampling q = {args.batch}/{n} = {q:.4f},"
        f" {args.steps} steps ({args.steps * q:.1f} epochs in expectation)"
    )
    dp_loss, dp_evals, dp_s = train(args, data, private=True)
    plain_loss, plain_evals, plain_s = train(args, data, private=False)
    dp_acc, plain_acc = dp_evals[-1][1], plain_evals[-1][1]
    print(f"DP-SGD {dp_s:.1f} s, non-private {plain_s:.1f} s")
    print(
        f"privacy: (ε, δ) = ({eps:.2f}, {args.delta:g}), PLD accountant, Poisson-subsampled"
        f" Gaussian, σ = {args.sigma}, q = {q:.4f}, {args.steps} steps"
    )
    print(f"final: test accuracy {dp_acc:.1%} at ε = {eps:.2f} (non-private: {plain_acc:.1%})")

    plt = _common.pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.3))
    steps = np.arange(1, args.steps + 1)
    a1.plot(steps, plain_loss, lw=0.8, label="non-private")
    a1.plot(steps, dp_loss, lw=0.8, label=f"DP-SGD, ε = {eps:.2f}")
    a1.set(xlabel="step", ylabel="training loss (sampled batch)", yscale="log")
    a1.legend()
    a2.plot(*zip(*plain_evals, strict=True), marker="o", label="non-private")
    a2.plot(*zip(*dp_evals, strict=True), marker="o", label="DP-SGD")
    a2.set(xlabel="step", ylabel="test accuracy", ylim=(0, 1))
    a2.legend()
    fig.suptitle(
        f"DP-SGD on digits: {dp_acc:.1%} at (ε, δ) = ({eps:.2f}, {args.delta:g});"
        f" non-private {plain_acc:.1%}"
    )
    _common.save(fig, args.out, "dp_digits.png")
    return {"test_accuracy": dp_acc, "epsilon": eps, "non_private_accuracy": plain_acc}


if __name__ == "__main__":
    main()
