"""A small CNN on scikit-learn's 8×8 digits with ``jaxlinear.conv``, ``jaxlinear.linear``, optax.

Two 3×3 convolutions (the second with stride 2), then two dense layers, trained with Adam
on cross-entropy. Every layer is a jaxlinear op: its backward pass is the explicit
transpose rules (for the convolutions, a convolution with the flipped kernel for the input
and a correlation of input and cotangent for the kernel).

    python -m examples.cnn_digits            # full run: test accuracy ≥ 95%
    python -m examples.cnn_digits --smoke    # a few steps, seconds
    python -m examples.cnn_digits --quant int8          # every product in int8
    python -m examples.cnn_digits --quant fp8 --keep-ends  # fp8, first/last layer float32

``--quant`` trains with a low-precision recipe (``fp8`` is ``fp8_hybrid``; see
``docs/guides/quantization.md``): the forward product and both transposes of every layer
run in that format with dynamic scales; ``--keep-ends`` keeps ``conv1`` and ``fc2`` in
float32.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python examples/cnn_digits.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlinear
from examples import _common

TARGET = 0.95  # test accuracy the full run must reach


@functools.partial(jax.jit, static_argnames="width")  # one compilation, not one per shape
def init_cnn(key, *, width: int = 16) -> dict:
    """Parameters of the CNN: two conv layers (``width``, ``2·width`` channels), two dense."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "conv1": jaxlinear.init_conv(k1, (3, 3), 1, width),  # W: (3, 3, 1, 16)
        "conv2": jaxlinear.init_conv(k2, (3, 3), width, 2 * width),  # W: (3, 3, 16, 32)
        "fc1": jaxlinear.init(k3, 4 * 4 * 2 * width, 64),  # W: (512, 64)
        "fc2": jaxlinear.init(k4, 64, 10),  # W: (64, 10)
    }


def cnn(params: dict, x: jax.Array, quant=None, keep_ends: bool = False) -> jax.Array:
    """``(n, 8, 8, 1)`` images -> ``(n, 10)`` logits; ``quant``: a recipe for every layer
    (``keep_ends``: not for the first and the last)."""
    q_end = None if keep_ends else quant
    h = jax.nn.relu(jaxlinear.conv(params["conv1"], x, quant=q_end))  # (n, 8, 8, 16)
    h = jax.nn.relu(jaxlinear.conv(params["conv2"], h, strides=2, quant=quant))  # (n, 4, 4, 32)
    h = h.reshape(h.shape[0], -1)  # (n, 512)
    h = jax.nn.relu(jaxlinear.linear(params["fc1"], h, quant=quant))  # (n, 64)
    return jaxlinear.linear(params["fc2"], h, quant=q_end)  # (n, 10)


def per_example_loss(params: dict, x: jax.Array, y: jax.Array, **quant) -> jax.Array:
    """Cross-entropy of each example: ``(n,)``."""
    return optax.softmax_cross_entropy_with_integer_labels(cnn(params, x, **quant), y)


@functools.partial(jax.jit, static_argnames=("quant", "keep_ends"))
def accuracy(params: dict, x: jax.Array, y: jax.Array, **quant) -> jax.Array:
    return jnp.mean(jnp.argmax(cnn(params, x, **quant), axis=-1) == y)


QUANT = {"fp8": "fp8_hybrid", "fp8_hybrid": "fp8_hybrid", "fp8_rowwise": "fp8_rowwise"}
QUANT["int8"] = "int8"


def main(argv=None) -> dict:
    p = _common.parser(__doc__.splitlines()[0], steps=600)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--quant", choices=sorted(QUANT), default=None, help="low-precision recipe")
    p.add_argument("--keep-ends", action="store_true", help="first/last layer in float32")
    args = _common.parse(p, argv)
    quant = {"quant": QUANT.get(args.quant), "keep_ends": args.keep_ends}
    if args.quant:
        print(f"quantized: {quant['quant']}" + (" (conv1, fc2 in float32)" * args.keep_ends))

    x_tr, y_tr, x_te, y_te = _common.digits(smoke=args.smoke, seed=args.seed)
    print(f"digits: {len(x_tr)} training, {len(x_te)} test images, 8×8")
    params = init_cnn(jax.random.key(args.seed), width=4 if args.smoke else 16)
    optimizer = optax.adam(args.lr)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: per_example_loss(p, x, y, **quant).mean())(
            params
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batches = _common.shuffled_batches(len(x_tr), args.batch, args.steps, seed=args.seed)
    progress = _common.Progress(args.steps)
    losses, evals = [], []
    for i, idx in enumerate(batches, start=1):
        params, opt_state, loss = step(params, opt_state, x_tr[idx], y_tr[idx])
        losses.append(float(loss))
        if progress.due(i):
            acc = float(accuracy(params, x_te, y_te, **quant))
            evals.append((i, acc))
            progress(i, losses[-1], test_acc=acc)
    acc = evals[-1][1]
    print(f"trained {args.steps} steps in {progress.seconds:.1f} s")
    print(f"final: test accuracy {acc:.1%} (target ≥ {TARGET:.0%})")

    plt = _common.pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.3))
    a1.plot(np.arange(1, len(losses) + 1), losses, lw=0.8)
    a1.set(xlabel="step", ylabel="training loss (cross-entropy)", yscale="log")
    a2.plot(*zip(*evals, strict=True), marker="o", label="test accuracy")
    a2.axhline(TARGET, color="0.6", ls="--", lw=0.8, label=f"target {TARGET:.0%}")
    a2.set(xlabel="step", ylabel="test accuracy", ylim=(0, 1))
    a2.legend(loc="lower right")
    tag = f", quant={quant['quant']}" + (" (ends float32)" * args.keep_ends) if args.quant else ""
    fig.suptitle(f"CNN on digits, jaxlinear.conv + linear, Adam{tag}: test accuracy {acc:.1%}")
    name = f"cnn_digits_{args.quant}{'_keep_ends' * args.keep_ends}" if args.quant else "cnn_digits"
    _common.save(fig, args.out, f"{name}.png")
    return {"test_accuracy": acc, "seconds": progress.seconds}


if __name__ == "__main__":
    main()
