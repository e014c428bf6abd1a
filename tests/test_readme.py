"""Every ```python block of README.md, CONTRIBUTING.md and the docs site (``docs/**/*.md``) runs.

The blocks of one file run top to bottom in one namespace (a reader pastes them in order;
README's blocks also stand alone), in JAX's default configuration (a subprocess that
does not read ``conftest.py``: x64 off, warnings as in plain Python), with most of XLA's
optimizations off (``JAX_DISABLE_MOST_OPTIMIZATIONS=1``: the blocks are small and their
cost is compilation). A file with a block that sets
``--xla_force_host_platform_device_count`` (simulated devices) must set it before JAX
starts, so such files run in a subprocess of their own; files that import Flax or Equinox
share a second one, and all the others a third. A block
preceded by the line ``<!-- readme-test: skip (reason) -->`` (or ``docs-test``) is not run;
use it sparingly, always with a reason. The docs pages generated at build time (demos, API)
are not here: the demos run in ``tests/test_demos.py``, the docstrings as doctests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = ("<!-- readme-test: skip", "<!-- docs-test: skip")
DEVICES = "xla_force_host_platform_device_count"

# Runs the blocks given as JSON [[file, line, source], ...], one namespace per file; stops
# at the first failure, printing the file and line where its block starts.
_RUNNER = """
import json, sys, time, traceback
namespaces = {}
for name, line, source in json.load(sys.stdin):
    namespace = namespaces.setdefault(name, {"__name__": "__main__"})
    start = time.process_time()
    try:
        exec(compile(source, f"{name}, block at line {line}", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"FAILED: the block at {name} line {line}", flush=True)
        sys.exit(1)
    cpu = time.process_time() - start
    print(f"ok: the block at {name} line {line}: {cpu:.1f} s CPU", flush=True)
"""


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(line, source, skipped)`` of every ```python block; ``line`` is the fence's, 1-based."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if re.fullmatch(r"```python(\s.*)?", lines[i].strip()):
            start, body = i + 1, []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            before = [line for line in lines[: start - 1] if line.strip()]
            skipped = bool(before) and before[-1].strip().startswith(SKIP)
            blocks.append((start, "\n".join(body) + "\n", skipped))
        i += 1
    return blocks


FILES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
# (file, line, source, skipped) of every block of every file
BLOCKS = [
    (str(path.relative_to(ROOT)), *block)
    for path in FILES
    for block in python_blocks(path.read_text(encoding="utf-8"))
]


def _group(name: str) -> str:
    """The subprocess a file's blocks run in: ``"simulated-devices"`` for a file that sets
    the device count (before JAX starts), ``"flax-equinox"`` for files that import those
    (the costly imports, shared), ``"plain"`` for the rest; three tests, so pytest-xdist
    can run them side by side."""
    sources = [source for n, _, source, skipped in BLOCKS if n == name and not skipped]
    if any(DEVICES in source for source in sources):
        return "simulated-devices"
    if any(re.search(r"^\s*(import|from) (flax|equinox)\b", source, re.M) for source in sources):
        return "flax-equinox"
    return "plain"


GROUPS = {name: _group(name) for name, *_ in BLOCKS}


def _run(blocks, tmp_path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    for name in ("JAX_ENABLE_X64", "XLA_FLAGS"):
        env.pop(name, None)
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # compile time is the cost; the values hold
    payload = json.dumps([[name, line, source] for name, line, source, _ in blocks])
    return subprocess.run(
        [sys.executable, "-c", _RUNNER], input=payload, cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_blocks_found():
    """The parser sees the blocks (README's, and the guides'); a skipped one states its reason."""
    assert sum(name == "README.md" for name, *_ in BLOCKS) >= 1
    assert sum(name.startswith("docs") for name, *_ in BLOCKS) >= 5
    for path in FILES:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip().startswith(SKIP):
                assert re.fullmatch(r"<!-- (readme|docs)-test: skip \(.+\) -->", line.strip()), line


@pytest.mark.parametrize("group", ["plain", "flax-equinox", "simulated-devices"])
def test_readme_blocks_run(group, tmp_path):
    blocks = [b for b in BLOCKS if not b[3] and GROUPS[b[0]] == group]
    if not blocks:
        pytest.skip("no such block")
    proc = _run(blocks, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok: the block") == len(blocks)


def test_python_blocks_parser():
    text = (
        "x\n```python\na = 1\n```\n<!-- readme-test: skip (needs a GPU) -->\n\n```python\nb\n```\n"
        '```python title="c.py"\nc\n```\n<!-- docs-test: skip (slow) -->\n```python\nd\n```\n'
    )
    assert python_blocks(text) == [
        (2, "a = 1\n", False), (7, "b\n", True), (10, "c\n", False), (14, "d\n", True)
    ]  # fmt: skip
