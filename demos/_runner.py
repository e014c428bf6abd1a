"""The command line: ``python -m demos [NAME ...] [--list] [--out DIR] [--no-plots]``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import pkgutil
import re
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType

from demos._common import DEFAULT_OUT, Check, Context, configure_jax


def _discover() -> tuple[str, ...]:
    """Every ``dNN_name.py`` module in this package, in number order.

    Adding a demo is adding a file: ``d12_something.py`` with a ``run(ctx)``.
    """
    names = (m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]))
    return tuple(sorted(n for n in names if re.fullmatch(r"d\d\d_\w+", n)))


# In order: each builds on the ones before it.
DEMOS = _discover()


def number(module_name: str) -> int:
    """``"d05_jacobian" -> 5``."""
    return int(module_name[1:3])


def load(module_name: str) -> ModuleType:
    return importlib.import_module(f"demos.{module_name}")


def title(module: ModuleType) -> str:
    return (module.__doc__ or "").strip().splitlines()[0]


def resolve(name: str) -> str:
    """The module of a demo given as ``5``, ``05``, ``d05``, ``jacobian`` or ``d05_jacobian``."""
    key = name.strip().lower().removesuffix(".py")
    for module_name in DEMOS:
        i, short = number(module_name), module_name.split("_", 1)[1]
        if key in (module_name, short, f"d{i:02d}", str(i), f"{i:02d}"):
            return module_name
    numbers = f"{number(DEMOS[0])}-{number(DEMOS[-1])}"
    choices = ", ".join(m.split("_", 1)[1] for m in DEMOS)
    raise ValueError(f"unknown demo {name!r}; choose a number {numbers} or one of: {choices}")


@dataclasses.dataclass
class Result:
    """One demo's outcome, for the summary table."""

    number: int
    name: str
    checks: list[Check]
    seconds: float
    error: str | None = None
    figures: list[Path] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(c.passed for c in self.checks)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.checks) and self.passed == len(self.checks)

    @property
    def max_residual(self) -> float | None:
        residuals = [c.residual for c in self.checks if c.residual is not None]
        return max(residuals) if residuals else None

    @property
    def worst_ratio(self) -> float | None:
        """The largest residual / bound over the checks that have both (≤ 1: within every
        check's own bound; an exact check's bound is 0: ratio 0 when exact, else inf)."""
        ratios = [
            (c.residual / c.tol if c.tol else 0.0 if c.residual == 0 else math.inf)
            for c in self.checks
            if c.residual is not None and c.tol is not None
        ]
        return max(ratios) if ratios else None


def run_one(module_name: str, *, out_dir: Path | None, small: bool = False, log=print) -> Result:
    """Run one demo in a fresh context; an exception counts as a failure, not a crash."""
    module = load(module_name)
    name = module_name.split("_", 1)[1]
    log(f"\n=== {number(module_name)}. {name}: {title(module)}")
    ctx = Context(out_dir=out_dir, small=small, log=log)
    start = time.perf_counter()
    error = None
    try:
        module.run(ctx)
    except Exception:  # report and go on to the next demo
        error = traceback.format_exc()
        log(error)
    result = Result(
        number(module_name), name, ctx.checks, time.perf_counter() - start, error, ctx.figures
    )
    log(f"  --- {name}: {verdict(result)}")
    return result


def verdict(r: Result) -> str:
    """One demo's outcome in one line: ``"5/5 checks passed (0.3 s)"``."""
    text = f"{r.passed}/{len(r.checks)} checks passed ({r.seconds:.1f} s)"
    if r.error is not None:
        return f"FAILED, raised an exception; {text}"
    return text if r.ok else f"FAILED; {text}"


def summary(results: list[Result]) -> str:
    """The table printed at the end: demo, checks passed, max residual, the worst residual
    against its own check's bound, time. The "all" row gives only the latter: residuals of
    float64 and bfloat16 checks are not comparable numbers, their ratios to bounds are."""
    rows = [("#", "demo", "checks passed", "max residual", "worst residual/bound", "time")]
    ratio = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in results:
        checks = f"{r.passed}/{len(r.checks)}" + ("" if r.ok else "  FAIL")
        if r.error is not None:
            checks += " (raised)"
        residual = "-" if r.max_residual is None else f"{r.max_residual:.1e}"
        rows.append(
            (str(r.number), r.name, checks, residual, ratio(r.worst_ratio), f"{r.seconds:.1f} s")
        )
    total_passed = sum(r.passed for r in results)
    total = sum(len(r.checks) for r in results)
    ratios = [r.worst_ratio for r in results if r.worst_ratio is not None]
    rows.append(
        (
            "",
            "all",
            f"{total_passed}/{total}",
            "",
            ratio(max(ratios) if ratios else None),
            f"{sum(r.seconds for r in results):.1f} s",
        )
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        cells = [
            c.rjust(w) if i in (0, 3, 4, 5) else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if k == 0 or k == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demos",
        description="Every identity of backprop through Y = X W + b, checked on real numbers.",
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="demos to run, by number (5) or name (jacobian); all of them if none is given",
    )
    parser.add_argument("--list", action="store_true", help="list the demos and exit")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"folder for figures (default: {DEFAULT_OUT}/)",
    )
    parser.add_argument(
        "--no-plots", action="store_true", help="make no figures (matplotlib not needed)"
    )
    parser.add_argument(
        "--small", action="store_true", help="smaller sizes and fewer timing repeats"
    )
    args = parser.parse_args(argv)

    if args.list:
        for module_name in DEMOS:
            short = module_name.split("_", 1)[1]
            print(f"{number(module_name):2d}  {short:<20} {title(load(module_name))}")
        return 0
    try:
        selected = [resolve(n) for n in args.names] if args.names else list(DEMOS)
    except ValueError as e:
        parser.error(str(e))

    configure_jax()
    out_dir = None if args.no_plots else args.out
    results = [run_one(m, out_dir=out_dir, small=args.small) for m in selected]

    print("\n=== summary\n" + summary(results))
    figures = [str(path) for r in results for path in r.figures]
    if figures:
        print("figures: " + ", ".join(figures))
    failed = [r.name for r in results if not r.ok]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0
