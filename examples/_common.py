"""What every example shares: its command line, progress lines, figures and the digits data.

Each example runs as ``python -m examples.NAME`` or ``python examples/NAME.py`` with
``--smoke`` (a few steps on tiny sizes, seconds; what the tests run), ``--steps`` and
``--out`` (the folder for its figure, default ``figures/examples/``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path("figures") / "examples"


def parser(description: str, *, steps: int, smoke_steps: int = 3) -> argparse.ArgumentParser:
    """The shared command line; ``args.steps`` is ``smoke_steps`` under ``--smoke`` unless
    ``--steps`` is given. Call ``parse(p, argv)`` to read it."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="a few steps on tiny sizes (seconds)")
    p.add_argument("--steps", type=int, default=None, help=f"training steps (default {steps})")
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"folder for the figure ({DEFAULT_OUT}/)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the init and the batches")
    p.set_defaults(default_steps=steps, smoke_steps=smoke_steps)
    return p


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Read the command line. ``--smoke`` also turns off most of XLA's optimizations
    (``jax_disable_most_optimizations``): a few steps on tiny arrays cost compilation
    only, and that halves it."""
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = args.smoke_steps if args.smoke else args.default_steps
    if args.smoke:
        import jax

        jax.config.update("jax_disable_most_optimizations", True)
    return args


class Progress:
    """Prints ``step   100/500  loss 0.1234  (41.2 steps/s)`` about ``lines`` times a run.

    ``steps/s`` is measured since the previous line, so the first line includes compilation.
    """

    def __init__(self, steps: int, *, lines: int = 10):
        self.steps = steps
        self.every = max(1, steps // lines)
        self.start = self.last = time.perf_counter()
        self.last_step = 0

    def due(self, step: int) -> bool:
        """Whether ``step`` (1-based) gets a line: every ``every`` steps and the last one."""
        return step % self.every == 0 or step == self.steps

    def __call__(self, step: int, loss: float, **extra: float) -> None:
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last, 1e-9)
        self.last, self.last_step = now, step
        more = "".join(f"  {k.replace('_', ' ')} {v:.4g}" for k, v in extra.items())
        width = len(str(self.steps))
        print(f"step {step:>{width}}/{self.steps}  loss {loss:.4f}{more}  ({rate:.1f} steps/s)")

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, out: Path, name: str) -> Path:
    """Save ``fig`` as ``out/name`` (PNG), close it and print the path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    print(f"figure: {path}")
    return path


def digits(*, smoke: bool = False, seed: int = 0):
    """scikit-learn's bundled 8×8 digits (1797 images, no download), split 75/25, stratified.

    Returns ``(x_train, y_train, x_test, y_test)``: images ``(n, 8, 8, 1)`` float32 in
    ``[0, 1]``, labels ``(n,)`` int32. ``smoke``: 200 training and 100 test images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]  # (1797, 8, 8, 1)
    y = data.target.astype(np.int32)  # (1797,)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    if smoke:
        x_tr, y_tr, x_te, y_te = x_tr[:200], y_tr[:200], x_te[:100], y_te[:100]
    return x_tr, y_tr, x_te, y_te


def shuffled_batches(n: int, batch_size: int, steps: int, *, seed: int = 0) -> np.ndarray:
    """``(steps, batch_size)`` indices: epochs of a random permutation, cut into batches
    (the last partial batch of each epoch dropped)."""
    rng = np.random.default_rng(seed)
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    rows = [
        rng.permutation(n)[: per_epoch * batch_size].reshape(per_epoch, -1) for _ in range(epochs)
    ]
    return np.concatenate(rows)[:steps]
