"""What every demo shares: the run context, the record of checks, the reference map, figures.

Independent references only: a demo checks ``jaxlinear`` against hand-worked numbers,
against the plain ``x @ W + b`` below under JAX's own autodiff (in float64), or against
finite differences; never against ``jaxlinear`` itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_OUT = Path("figures")


def configure_jax() -> None:
    """float64 for the references; implicit rank promotion is an error, as in the tests.

    Matmuls run at full precision: on GPUs the default for float32 is TensorFloat-32,
    whose 10-bit mantissa would blur the identities the demos check.
    """
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_default_matmul_precision", "highest")


def affine(x, W, b):
    """The reference: plain ``x @ W + b`` differentiated by JAX itself (no jaxlinear code).

    ``x: (..., d_in)``, ``W: (d_in, d_out)``, ``b: (d_out,)`` -> ``(..., d_out)``. ``b`` is
    broadcast over the leading axes explicitly (implicit rank promotion is switched off).
    """
    y = x @ W  # (..., d_in) @ (d_in, d_out) -> (..., d_out)
    return y + b[(None,) * (y.ndim - 1)]  # (..., d_out) + (1, ..., 1, d_out)


def normal_like(key, tree):
    """A pytree of standard normal arrays with the structure, shapes and dtypes of ``tree``."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    new = [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves, strict=False)]
    return jax.tree.unflatten(treedef, new)


def one_line(error: BaseException, verdict: str = "as expected", width: int = 110) -> str:
    """``"TypeError as expected: can't apply forward-mode …"``: an exception in one line.

    The first line of its message, cut at ``width`` characters with an ellipsis; an expected
    error should read as a passing claim, not as a traceback.
    """
    lines = str(error).strip().splitlines()
    first = lines[0].strip() if lines else ""
    if len(first) > width:
        first = first[: width - 1].rstrip() + "…"
    elif len(lines) > 1:
        first += " …"
    return f"{type(error).__name__} {verdict}: {first}"


def fmt_shape(shape) -> str:
    """``(3, 2) -> "(3×2)"``."""
    return "(" + "×".join(str(d) for d in shape) + ")"


@contextlib.contextmanager
def count_calls(module, name: str) -> Iterator[list]:
    """Temporarily wrap ``module.name`` so every call is recorded; yields the record.

    Used to show *which* rule JAX ran: e.g. wrapping ``jaxlinear._src.formulas.pullback``
    and watching its count go up when ``jax.vjp``'s backward function is called.
    """
    original = getattr(module, name)
    calls: list = []

    def wrapper(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    setattr(module, name, wrapper)
    try:
        yield calls
    finally:
        setattr(module, name, original)


@dataclasses.dataclass
class Check:
    """One claim and its verdict; ``residual`` is the max abs difference where one applies."""

    claim: str
    passed: bool
    residual: float | None = None
    tol: float | None = None


@dataclasses.dataclass
class Context:
    """What a demo's ``run(ctx)`` gets: where figures go, how big to go, and the check log.

    Attributes:
      out_dir: folder for figures, or ``None`` for no figures at all.
      small: smaller sizes and fewer repeats (the tests use this).
      log: where the narration goes (``print``).
    """

    out_dir: Path | None = DEFAULT_OUT
    small: bool = False
    log: Callable[..., None] = print
    checks: list[Check] = dataclasses.field(default_factory=list)
    figures: list[Path] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        configure_jax()

    @property
    def plots(self) -> bool:
        return self.out_dir is not None

    # -- narration ----------------------------------------------------------------------

    def say(self, *lines: str) -> None:
        for line in lines:
            self.log(line)

    def show(self, name: str, value) -> None:
        """Print an array (or a pytree of them) under ``name``, compactly."""
        with np.printoptions(precision=4, suppress=True, linewidth=100):
            for path, leaf in jax.tree_util.tree_leaves_with_path(value):
                label = name + jax.tree_util.keystr(path)
                text = str(np.asarray(leaf))
                if "\n" in text:
                    self.log(f"  {label} {fmt_shape(np.shape(leaf))} =")
                    self.log("    " + text.replace("\n", "\n    "))
                else:
                    self.log(f"  {label} {fmt_shape(np.shape(leaf))} = {text}")

    # -- checks -------------------------------------------------------------------------

    def check(self, claim: str, passed, *, residual: float | None = None, tol=None) -> Check:
        """Record a claim with a yes/no verdict (``residual`` optional, for the table)."""
        check = Check(claim, bool(passed), residual, tol)
        self.checks.append(check)
        mark = "ok  " if check.passed else "FAIL"
        extra = ""
        if residual is not None and tol == 0:
            extra = "   [exact]" if check.passed else f"   [residual {residual:.1e}, not exact]"
        elif residual is not None:
            bound = "" if tol is None else f" ≤ {tol:.0e}" if check.passed else f" > {tol:.0e}"
            extra = f"   [residual {residual:.1e}{bound}]"
        self.log(f"  [{mark}] {claim}{extra}")
        return check

    def close(self, claim: str, actual, expected, *, tol: float = 1e-12) -> Check:
        """Claim ``actual == expected`` to within ``tol`` (max abs difference over a pytree).

        Structures and shapes must match exactly: no broadcasting can make a check pass.
        """
        actual_def, expected_def = jax.tree.structure(actual), jax.tree.structure(expected)
        if actual_def != expected_def:
            self.log(f"    structure {actual_def} != {expected_def}")
            return self.check(claim, False)
        diffs = [0.0]
        for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
            a, e = np.asarray(a), np.asarray(e)
            if a.shape != e.shape:
                self.log(f"    shape {a.shape} != {e.shape}")
                return self.check(claim, False)
            if a.size:
                diffs.append(np.max(np.abs(a.astype(np.complex128) - e.astype(np.complex128))))
        residual = float(np.max(diffs))  # NaN propagates: a NaN anywhere fails the check
        passed = math.isfinite(residual) and residual <= tol
        return self.check(claim, passed, residual=residual, tol=tol)

    def raises(self, claim: str, exc_type, fn: Callable, *, match: str = ""):
        """Claim that ``fn()`` raises ``exc_type`` (a type or a tuple of them) with ``match``
        in its message; the check line, then the error in one line (``one_line``)."""
        try:
            fn()
        except exc_type as e:
            check = self.check(claim, match in str(e))
            verdict = "as expected" if check.passed else f"without {match!r} in its message"
            self.log(f"         raises {one_line(e, verdict)}")
            return check
        return self.check(claim + " (it did not raise)", False)

    # -- figures ------------------------------------------------------------------------

    def pyplot(self):
        """``matplotlib.pyplot`` on the non-interactive Agg backend (imported on demand)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt

    def save(self, fig, name: str) -> Path:
        """Save ``fig`` as ``out_dir/name`` (PNG), close it, and log the path."""
        assert self.out_dir is not None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / name
        fig.savefig(path, dpi=110, bbox_inches="tight")
        self.pyplot().close(fig)
        self.figures.append(path)
        self.log(f"  figure: {path}")
        return path


def matrix_figure(
    ctx: Context, rows: list[list], *, title: str = "", fmt: str = "{:g}", cell: float = 0.42
):
    """Draw rows of matrix equations, e.g. ``[("X", X), "·", ("W", W), "=", ("Y", Y)]``.

    A ``(label, array)`` item is drawn as a grid with every entry written in it (1-D arrays
    as one row), coloured by sign and size; a ``str`` item is an operator between them.
    Returns the figure.
    """
    plt = ctx.pyplot()
    op_width, label_height, gap = 0.4, 0.45, 0.2  # inches

    def size(item):
        if isinstance(item, str):
            return op_width, 0.0
        shape = np.atleast_2d(np.asarray(item[1])).shape
        return shape[1] * cell, shape[0] * cell

    row_sizes = [[size(item) for item in row] for row in rows]
    widths = [sum(w for w, _ in sizes) + 0.15 * (len(sizes) - 1) for sizes in row_sizes]
    heights = [max(h for _, h in sizes) + label_height for sizes in row_sizes]
    title_height = 0.5 if title else 0.1
    fig_w, fig_h = max(widths) + 0.4, sum(heights) + gap * (len(rows) - 1) + title_height + 0.1
    fig = plt.figure(figsize=(fig_w, fig_h))
    vmax = max(
        float(np.max(np.abs(np.asarray(item[1]))))
        for row in rows
        for item in row
        if not isinstance(item, str)
    )
    top = fig_h - title_height
    for row, sizes, row_h in zip(rows, row_sizes, heights, strict=True):
        x = 0.2
        mid = top - label_height - (row_h - label_height) / 2  # vertical centre of the matrices
        for item, (w, h) in zip(row, sizes, strict=True):
            if isinstance(item, str):
                fig.text(
                    (x + w / 2) / fig_w, mid / fig_h, item, ha="center", va="center", fontsize=15
                )
            else:
                label, M = item
                shape = np.shape(M)
                M = np.atleast_2d(np.asarray(M, dtype=float))
                ax = fig.add_axes(((x) / fig_w, (mid - h / 2) / fig_h, w / fig_w, h / fig_h))
                ax.imshow(M, cmap="RdBu_r", vmin=-1.6 * vmax, vmax=1.6 * vmax, aspect="auto")
                for (i, j), value in np.ndenumerate(M):
                    ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=9)
                ax.set_xticks(np.arange(M.shape[1] + 1) - 0.5, minor=True)
                ax.set_yticks(np.arange(M.shape[0] + 1) - 0.5, minor=True)
                ax.grid(which="minor", color="0.6", lw=0.6)
                ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
                ax.set_title(f"{label}  {'×'.join(map(str, shape))}", fontsize=10)
            x += w + 0.15
        top -= row_h + gap
    if title:
        fig.suptitle(title, y=1 - 0.15 / fig_h, va="top", fontsize=11)
    return fig


def as_f64(tree):
    """Every floating leaf of ``tree`` as float64 (the reference precision)."""
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
