"""Run the demos for the docs site and record what each printed, and from which line.

``python tools/docs_demos.py OUT [NAME ...]`` runs every demo (or the ones named) in
``--small`` mode, as ``python -m demos --small`` does, and writes ``OUT/NAME.json`` and the
figures into ``OUT/figures/``. Each printed line is recorded with the line of the demo's
source that printed it (the outermost frame in the demo's file: for a helper called from
``run``, the line in ``run`` that called it), so ``tools/docs_pages.py`` can put each output
under the code that made it. Run from the repository root (the docs build does).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _caller_line(filename: str) -> int | None:
    """The line of ``filename`` in the outermost frame of the stack that is in it."""
    frame, line = sys._getframe(2), None
    while frame is not None:
        if frame.f_code.co_filename == filename:
            line = frame.f_lineno
        frame = frame.f_back
    return line


def record(module_name: str, out: Path) -> dict:
    """Run one demo, as ``python -m demos --small NAME`` would; its record as a dict."""
    from demos import _runner

    module = _runner.load(module_name)
    filename = module.__file__
    records: list[tuple[int | None, str]] = []

    def log(*parts):
        records.append((_caller_line(filename), " ".join(str(p) for p in parts)))

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
