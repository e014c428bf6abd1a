"""Every ```python block of README.md runs, as a reader would paste it.

Each block runs in a fresh namespace, in JAX's default configuration (a subprocess that
does not read ``conftest.py``: x64 off, warnings as in plain Python), with most of XLA's
optimizations off (``JAX_DISABLE_MOST_OPTIMIZATIONS=1``: the blocks are small and their
cost is compilation). Blocks that set
``--xla_force_host_platform_device_count`` (simulated devices) must set it before JAX
starts, so they run in a second subprocess; all the others share the first. A block
preceded by the line ``<!-- readme-test: skip (reason) -->`` is not run; use it sparingly,
always with a reason.
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
SKIP = "<!-- readme-test: skip"
DEVICES = "xla_force_host_platform_device_count"

# Runs the blocks given as JSON [[line, source], ...], each in a fresh namespace; stops at
# the first failure, printing the README line where its block starts.
_RUNNER = """
import json, sys, time, traceback
for line, source in json.load(sys.stdin):
    start = time.process_time()
    try:
        exec(compile(source, f"README.md, block at line {line}", "exec"), {"__name__": "__main__"})
    except BaseException:
        traceback.print_exc()
        print(f"FAILED: the block at README.md line {line}", flush=True)
        sys.exit(1)
    cpu = time.process_time() - start
    print(f"ok: the block at README.md line {line}: {cpu:.1f} s CPU", flush=True)
"""


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(line, source, skipped)`` of every ```python block; ``line`` is the fence's, 1-based."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
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


BLOCKS = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))


def _run(blocks, tmp_path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    for name in ("JAX_ENABLE_X64", "XLA_FLAGS"):
        env.pop(name, None)
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # compile time is the cost; the values hold
    payload = json.dumps([[line, source] for line, source, _ in blocks])
    return subprocess.run(
        [sys.executable, "-c", _RUNNER], input=payload, cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_blocks_found():
    """The parser sees the README's blocks; a skipped one states its reason."""
    assert len(BLOCKS) >= 5
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for line in text.splitlines():
        if line.strip().startswith(SKIP):
            assert re.fullmatch(r"<!-- readme-test: skip \(.+\) -->", line.strip()), line


@pytest.mark.parametrize("devices", [False, True], ids=["plain", "simulated-devices"])
def test_readme_blocks_run(devices, tmp_path):
    blocks = [b for b in BLOCKS if not b[2] and (DEVICES in b[1]) == devices]
    if not blocks:
        pytest.skip("no such block")
    proc = _run(blocks, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok: the block") == len(blocks)


def test_python_blocks_parser():
    text = (
        "x\n```python\na = 1\n```\n<!-- readme-test: skip (needs a GPU) -->\n\n```python\nb\n```\n"
    )
    assert python_blocks(text) == [(2, "a = 1\n", False), (7, "b\n", True)]
