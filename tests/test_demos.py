"""The demos run, every claim they make holds, and ``python -m demos`` exits 0.

Each demo's checks compare against independent references (hand-worked numbers, plain
``x @ W + b`` under JAX's autodiff in float64, finite differences), so a demo passing
here is a test of the library, not only of the demo.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from demos import _runner
from demos._common import Context

ROOT = Path(__file__).resolve().parents[1]

FIGURES = {
    "d01_worked_example": ["worked_example.png"],
    "d05_jacobian": ["jacobian.png"],
    "d07_batch": ["batch.png"],
    "d08_training": ["training.png"],
    "d09_forward_vs_reverse": ["forward_vs_reverse.png"],
}


def _quiet(*_):
    pass


@pytest.mark.parametrize("module_name", _runner.DEMOS)
def test_demo_checks_pass(module_name, tmp_path):
    ctx = Context(out_dir=tmp_path, small=True, log=_quiet)
    checks = _runner.load(module_name).run(ctx)
    assert checks is ctx.checks
    assert len(checks) >= 3, "a demo must check its claims"
    failed = [c.claim for c in checks if not c.passed]
    assert not failed, f"{module_name}: failed checks {failed}"
    expected = FIGURES.get(module_name, [])
    assert sorted(p.name for p in ctx.figures) == sorted(expected)
    for path in ctx.figures:
        assert path.parent == tmp_path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the check helpers must be able to fail --------------------------------------------


def test_close_fails_on_a_difference():
    ctx = Context(out_dir=None, log=_quiet)
    assert not ctx.close("differs", jnp.array([1.0, 2.0]), jnp.array([1.0, 2.1])).passed
    assert ctx.close("equal", jnp.array([1.0, 2.0]), jnp.array([1.0, 2.0 + 1e-14])).passed


def test_close_does_not_broadcast():
    ctx = Context(out_dir=None, log=_quiet)
    assert not ctx.close("shape", jnp.ones((3, 2)), jnp.ones(2)).passed
    assert not ctx.close("structure", (jnp.ones(2),), [jnp.ones(2)]).passed
    assert not ctx.close("nan", jnp.array([jnp.nan]), jnp.array([jnp.nan])).passed


def test_raises_fails_when_nothing_is_raised():
    ctx = Context(out_dir=None, log=_quiet)
    assert not ctx.raises("no error", TypeError, lambda: None).passed
    assert not ctx.raises("wrong message", TypeError, _raise_type_error, match="other").passed
    assert ctx.raises("right", TypeError, _raise_type_error, match="boom").passed
    with pytest.raises(ValueError):
        ctx.raises("other type propagates", TypeError, _raise_value_error)


def _raise_type_error():
    raise TypeError("boom")


def _raise_value_error():
    raise ValueError("boom")


# -- the runner ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "module_name"),
    [
        ("5", "d05_jacobian"),
        ("05", "d05_jacobian"),
        ("d05", "d05_jacobian"),
        ("jacobian", "d05_jacobian"),
        ("d10_two_bindings", "d10_two_bindings"),
        ("Pullback", "d03_pullback"),
    ],
)
def test_resolve(name, module_name):
    assert _runner.resolve(name) == module_name


def test_resolve_unknown():
    with pytest.raises(ValueError, match="unknown demo 'nope'; choose a number 1-"):
        _runner.resolve("nope")


def test_main_exit_status_on_failure(monkeypatch, capsys):
    module = _runner.load("d01_worked_example")

    def failing(ctx):
        ctx.check("a claim that is false", False)
        return ctx.checks

    monkeypatch.setattr(module, "run", failing)
    assert _runner.main(["1", "--no-plots"]) == 1
    out = capsys.readouterr()
    assert "FAIL" in out.out and "FAILED: worked_example" in out.err


def test_main_exception_is_a_failure_and_later_demos_still_run(monkeypatch, capsys):
    module = _runner.load("d01_worked_example")

    def crashing(ctx):
        raise RuntimeError("demo crashed")

    monkeypatch.setattr(module, "run", crashing)
    assert _runner.main(["1", "7", "--no-plots"]) == 1
    out = capsys.readouterr().out
    assert "RuntimeError: demo crashed" in out
    assert "0/0  FAIL (raised)" in out
    batch_rows = [line for line in out.splitlines() if line.split()[:2] == ["7", "batch"]]
    assert batch_rows and "FAIL" not in batch_rows[0]  # demo 7 ran after the crash


def test_main_list(capsys):
    assert _runner.main(["--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(_runner.DEMOS)
    assert lines[4].split()[:2] == ["5", "jacobian"]


def test_main_unknown_name_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        _runner.main(["nope"])
    assert info.value.code == 2
    assert "unknown demo 'nope'" in capsys.readouterr().err


def test_python_m_demos_no_plots(tmp_path):
    """The one command a reader runs; it must end with the table, exit 0, write nothing."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "demos", "--no-plots"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = proc.stdout.split("=== summary", 1)[1]
    for module_name in _runner.DEMOS:
        assert module_name.split("_", 1)[1] in summary
    assert "all checks passed" in proc.stdout
    assert "FAIL" not in proc.stdout
    assert list(tmp_path.iterdir()) == []  # --no-plots: no figures folder
