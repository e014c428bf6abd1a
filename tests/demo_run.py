"""One run of ``python -m demos --small --out figures``, shared by the whole test session.

The demos take about a third of the suite's CPU time, so ``conftest.py`` starts them in
the background as the session begins (on the pytest-xdist controller, before the workers
start) and the tests in ``test_demos.py`` wait for the result; the run overlaps the rest of
the suite instead of adding to it. The run directory is passed to the workers in the
environment variable ``JAXLINEAR_DEMO_RUN``; when no run was started (a selection that
does not include the whole ``tests`` folder or ``test_demos.py``), ``result`` starts one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = "JAXLINEAR_DEMO_RUN"
ROOT = Path(__file__).resolve().parents[1]
COMMAND = ("-m", "demos", "--small", "--out", "figures")

# Runs the demos with cwd=<run>/cwd, then writes the exit status last, atomically: a reader
# that sees <run>/rc sees complete stdout and stderr files.
_WRAPPER = """
import os, subprocess, sys
run = sys.argv[1]
with open(os.path.join(run, "stdout"), "w") as out, open(os.path.join(run, "stderr"), "w") as err:
    rc = subprocess.call([sys.executable, *sys.argv[2:]], cwd=os.path.join(run, "cwd"),
                         stdout=out, stderr=err)
with open(os.path.join(run, "rc.tmp"), "w") as f:
    f.write(str(rc))
os.replace(os.path.join(run, "rc.tmp"), os.path.join(run, "rc"))
"""


def start() -> tuple[Path, subprocess.Popen]:
    """Start the run in the background; return its directory and process."""
    run = Path(tempfile.mkdtemp(prefix="jaxlinear-demos-"))
    (run / "cwd").mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, str(run), *COMMAND], env=env)
    return run, proc


def selected(args, rootdir) -> bool:
    """Whether the command line's paths include ``tests/test_demos.py`` (or a folder above it)."""
    target = (ROOT / "tests" / "test_demos.py").resolve()
    for arg in args or ["."]:
        path = (Path(rootdir) / arg.split("::", 1)[0]).resolve()
        if path == target or path in target.parents:
            return True
    return False


def result(timeout: float = 900.0) -> subprocess.CompletedProcess:
    """The run's exit status and output, waiting for it (and starting it if nobody did)."""
    run = os.environ.get(ENV)
    if run is None:
        run, _ = start()
        os.environ[ENV] = str(run)
    run = Path(run)
    deadline = time.monotonic() + timeout
    while not (run / "rc").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"python -m demos did not finish in {timeout:.0f} s ({run})")
        time.sleep(0.5)
    return subprocess.CompletedProcess(
        [sys.executable, *COMMAND],
        int((run / "rc").read_text()),
        (run / "stdout").read_text(),
        (run / "stderr").read_text(),
    )
