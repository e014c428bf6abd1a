"""The digits CNN in Flax NNX, put on jaxlinear's explicit rules, against plain Flax.

The network of ``cnn_digits`` written as an ``nnx.Module``. One copy is plain Flax; the
other is the same module put on jaxlinear's ops by ``jaxlinear.nnx.explicit(model)`` (its
convolutions and dense layers through Flax's injection points). Both start from the same
initial weights and see the same batches; the script checks that their loss curves agree
step for step.

    python -m examples.nnx_digits            # full run
    python -m examples.nnx_digits --smoke    # a few steps, seconds
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python examples/nnx_digits.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxlinear
import jaxlinear.nnx
from examples import _common

# The loss curves must agree to this, elementwise (absolute). Measured: they are bit for bit
# equal (the explicit rules compile to the same convolutions and matmuls as JAX's AD of the
# lax ops); the bound leaves room for a float32 reassociation in another XLA version, a
# few ulps of a loss of order 1 (float32 ulp at 1: 1.2e-7), which Adam can amplify a little.
TOLERANCE = 1e-5


class CNN(nnx.Module):
    """``(n, 8, 8, 1)`` images -> ``(n, 10)`` logits, in plain Flax."""

    def __init__(self, rngs: nnx.Rngs, *, width: int = 16):
        self.conv1 = nnx.Conv(1, width, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(width, 2 * width, (3, 3), strides=2, rngs=rngs)
        self.fc1 = nnx.Linear(4 * 4 * 2 * width, 64, rngs=rngs)
        self.fc2 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.conv1(x))  # (n, 8, 8, 16)
        h = jax.nn.relu(self.conv2(h))  # (n, 4, 4, 32)
        h = jax.nn.relu(self.fc1(h.reshape(h.shape[0], -1)))  # (n, 64)
        return self.fc2(h)  # (n, 10)


def explicit_cnn(rngs: nnx.Rngs, *, width: int = 16) -> CNN:
    """The CNN on jaxlinear's explicit rules: the plain Flax model, converted in one call
    (its ``Conv`` and ``Linear`` layers get jaxlinear's ops through their injection points;
    ``jaxlinear.nnx.report(model)`` lists what each module runs)."""
    return jaxlinear.nnx.explicit(CNN(rngs, width=width))


def train(model: CNN, x_tr, y_tr, x_te, y_te, batches, *, lr: float, label: str):
    """Adam on mean cross-entropy; returns the per-step losses and the final test accuracy."""
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def accuracy(model, x, y):
        return jnp.mean(jnp.argmax(model(x), axis=-1) == y)

    print(f"-- {label}")
    progress = _common.Progress(len(batches), lines=5)
    losses = []
    for i, idx in enumerate(batches, start=1):
        losses.append(float(step(model, optimizer, x_tr[idx], y_tr[idx])))
        if progress.due(i):
            progress(i, losses[-1])
    acc = float(accuracy(model, x_te, y_te))
    print(f"   {len(batches)} steps in {progress.seconds:.1f} s, test accuracy {acc:.1%}")
    return np.array(losses), acc


def main(argv=None) -> dict:
    p = _common.parser(__doc__.splitlines()[0], steps=400)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=64)
    args = _common.parse(p, argv)

    x_tr, y_tr, x_te, y_te = _common.digits(smoke=args.smoke, seed=args.seed)
    width = 4 if args.smoke else 16
    batches = _common.shuffled_batches(len(x_tr), args.batch, args.steps, seed=args.seed)
    # Same seed, same draws: the two models start from the same weights (checked below).
    plain = CNN(nnx.Rngs(args.seed), width=width)
    explicit = explicit_cnn(nnx.Rngs(args.seed), width=width)
    same_init = jax.tree.all(
        jax.tree.map(jnp.array_equal, nnx.state(plain, nnx.Param), nnx.state(explicit, nnx.Param))
    )
    assert same_init, "the two models must start from the same weights"

    data = (x_tr, y_tr, x_te, y_te, batches)
    loss_plain, acc_plain = train(plain, *data, lr=args.lr, label="plain Flax NNX (lax ops)")
    loss_expl, acc_expl = train(explicit, *data, lr=args.lr, label="NNX on jaxlinear's rules")
    diff = float(np.max(np.abs(loss_plain - loss_expl)))
    identical = bool(np.array_equal(loss_plain, loss_expl))
    print(
        f"loss curves: max |plain - explicit| = {diff:.1e} over {args.steps} steps"
        f" ({'bit for bit identical' if identical else f'bound {TOLERANCE:.0e}'})"
    )
    assert diff <= TOLERANCE, f"the loss curves differ by {diff:.1e} > {TOLERANCE:.0e}"
    print(f"final: test accuracy {acc_expl:.1%} (plain Flax: {acc_plain:.1%})")

    plt = _common.pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.3))
    steps = np.arange(1, args.steps + 1)
    a1.plot(steps, loss_plain, lw=2.5, color="0.75", label="plain Flax NNX")
    a1.plot(steps, loss_expl, lw=0.8, color="C3", label="NNX on jaxlinear rules")
    a1.set(xlabel="step", ylabel="training loss", yscale="log")
    a1.legend()
    a2.plot(steps, np.abs(loss_plain - loss_expl), lw=0.8)
    a2.set(xlabel="step", ylabel="|difference|", ylim=(-TOLERANCE / 10, TOLERANCE))
    a2.set_title(f"max {diff:.1e}" + (" (bit for bit)" if identical else ""), fontsize=10, pad=14)
    fig.suptitle(f"Flax NNX CNN on digits: test accuracy {acc_expl:.1%}, same curve as plain Flax")
    _common.save(fig, args.out, "nnx_digits.png")
    return {"test_accuracy": acc_expl, "max_loss_difference": diff, "identical": identical}


if __name__ == "__main__":
    main()
