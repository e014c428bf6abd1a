"""Run the demos for the docs site and record what each printed, and from which line.

``python tools/docs_demos.py OUT [NAME ...]`` runs every demo (or the ones named) in
``--small`` mode, as ``python -m demos --small`` does, and writes ``OUT/NAME.json`` and the
figures into ``OUT/figures/``. Each printed line is recorded with the lines of the demo's
source on the call stack when it was printed (outermost first), so ``tools/docs_pages.py``
can put each output under the code that made it. Run from the repository root (the docs
build does), with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` so that the
many-device demos run in this process instead of a child (their output then has lines too).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _caller_lines(filename: str) -> list[int]:
    """The lines of ``filename`` on the call stack, outermost first."""
    frame, lines = sys._getframe(2), []
    while frame is not None:
        if frame.f_code.co_filename == filename:
            lines.append(frame.f_lineno)
        frame = frame.f_back
    return lines[::-1]


def record(module_name: str, out: Path) -> dict:
    """Run one demo, as ``python -m demos --small NAME`` would; its record as a dict."""
    from demos import _runner

    module = _runner.load(module_name)
    filename = module.__file__
    records: list[tuple[list[int], str]] = []

    def log(*parts):
        records.append((_caller_lines(filename), " ".join(str(p) for p in parts)))

    result = _runner.run_one(module_name, out_dir=out / "figures", small=True, log=log)
    return {
        "module": module_name,
        "title": _runner.title(module),
        "records": records,
        "checks": [[c.claim, c.passed] for c in result.checks],
        "seconds": result.seconds,
        "error": result.error,
        "figures": [p.name for p in result.figures],
        "verdict": _runner.verdict(result),
    }


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    from demos import _runner
    from demos._common import configure_jax

    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    names = [_runner.resolve(n) for n in argv[1:]] or list(_runner.DEMOS)
    configure_jax()
    failed = []
    for name in names:
        rec = record(name, out)
        (out / f"{name}.json").write_text(json.dumps(rec, ensure_ascii=False), encoding="utf-8")
        print(f"{name}: {rec['verdict']}", flush=True)
        if rec["error"] is not None or not all(ok for _, ok in rec["checks"]):
            failed.append(name)
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
