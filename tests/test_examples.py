"""Every example runs in smoke mode: ``python -m examples --smoke`` in one subprocess.

One interpreter runs all the examples in sequence (a few steps on tiny sizes each, XLA's
optimizations off), as a reader would from a clone, in JAX's default configuration (x64
off: the subprocess does not read ``conftest.py``). The tests read its output: per
example, progress lines with ``steps/s``, a ``final:`` line, and a PNG figure. The full
runs' numbers are in docs/examples.md; no metric is asserted here (3 steps learn nothing).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from examples.__main__ import EXAMPLES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """``(process, figures folder, {name: lines of its section})``."""
    cwd = tmp_path_factory.mktemp("examples")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("JAX_ENABLE_X64", None)
    proc = subprocess.run(
        [sys.executable, "-m", "examples", "--smoke", "--out", "figs"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    sections, name = {}, None
    for line in proc.stdout.splitlines():
        header = re.fullmatch(r"=== examples\.(\w+)", line)
        if header:
            name = header.group(1)
            sections[name] = []
        elif name is not None:
            sections[name].append(line)
    return proc, cwd / "figs", sections


def test_all_examples_run(smoke):
    proc, figures, sections = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(sections) == list(EXAMPLES)
    assert sorted(p.name for p in figures.iterdir()) == sorted(f"{n}.png" for n in EXAMPLES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_output(smoke, name):
    _, figures, sections = smoke
    lines = sections.get(name, [])
    text = "\n".join(lines)
    assert any(
        re.match(r"step +\d+/\d+ +loss \d", line) and "steps/s)" in line for line in lines
    ), text
    assert sum(line.startswith("final: ") for line in lines) == 1, text
    assert f"figure: figs/{name}.png" in lines, text
    assert (figures / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nnx_matches_plain_flax(smoke):
    """The NNX model on jaxlinear's rules trains exactly as plain Flax (3 steps here)."""
    lines = smoke[2]["nnx_digits"]
    match = [re.search(r"max \|plain - explicit\| = (\S+) ", line) for line in lines]
    values = [float(m.group(1)) for m in match if m]
    assert values == [0.0], lines


def test_dp_reports_epsilon(smoke):
    lines = smoke[2]["dp_digits"]
    assert any(
        re.match(r"privacy: \(ε, δ\) = \(\d+\.\d+, 1e-05\), PLD accountant", line) for line in lines
    )


def test_printed_figures_say_what_they_are(smoke):
    """Each DP progress line labels its clipping figure as the fraction of the batch."""
    steps = [line for line in smoke[2]["dp_digits"] if line.startswith("step ")]
    private = steps[: len(steps) // 2]  # DP-SGD runs first, then the non-private run
    assert private and all(re.search(r"fraction clipped [\d.]+", line) for line in private)
    assert not any("fraction clipped" in line for line in steps[len(steps) // 2 :])


def test_cnn_figure_labels_its_target_line():
    """The dashed line of the digits CNN figure is in its legend, as the target (a source
    check: the smoke run's figure is a PNG)."""
    source = (ROOT / "examples" / "cnn_digits.py").read_text()
    assert re.search(r"axhline\(TARGET, [^)]*label=f\"target", source)
    assert "a2.legend(" in source
