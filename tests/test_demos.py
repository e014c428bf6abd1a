"""The demos run, every claim they make holds, and ``python -m demos`` exits 0.

Each demo's checks compare against independent references (hand-worked numbers, plain
``x @ W + b`` under JAX's autodiff in float64, finite differences), so a demo passing
here is a test of the library, not only of the demo.

Every demo runs once: ``python -m demos --small --out figures`` in a subprocess (a fresh
interpreter, as a reader runs it), started in the background when the session begins
(``tests/demo_run.py``) and shared by all the tests below through a session-scoped
fixture. The per-demo tests read its output: one section per demo (``=== N. name: ...``,
one ``[ok  ]`` or ``[FAIL]`` line per check, ``figure: path`` lines), then the summary.
"""

import os
import re
from pathlib import Path

import demo_run as _demo_run
import jax.numpy as jnp
import pytest

from demos import _runner
from demos._common import Context, one_line

ROOT = Path(__file__).resolve().parents[1]

FIGURES = {
    "d01_worked_example": ["worked_example.png"],
    "d05_jacobian": ["jacobian.png"],
    "d07_batch": ["batch.png"],
    "d08_training": ["training.png"],
    "d09_forward_vs_reverse": ["forward_vs_reverse.png"],
    "d12_conv": ["conv_jacobian.png"],
    "d13_embedding": ["embedding.png"],
    "d14_attention": ["softmax_jacobian.png"],
    "d15_rnn_bptt": ["rnn_gradient_norms.png"],
    "d17_finite_differences": ["finite_differences.png"],
    "d19_loss_scaling": ["loss_scaling.png"],
    "d20_init_gradient_flow": ["init_gradient_flow.png"],
}


def _quiet(*_):
    pass


@pytest.fixture(scope="session")
def demo_run():
    """``python -m demos --small --out figures``, run once: ``(process, cwd, sections)``.

    The run starts in the background as the session begins (``tests/demo_run.py``);
    ``sections`` maps each demo's short name to the lines of its part of the output.
    """
    proc = _demo_run.result()
    cwd = Path(os.environ[_demo_run.ENV]) / "cwd"
    sections, name = {}, None
    for line in proc.stdout.splitlines():
        header = re.match(r"=== (?:\d+\. (\w+): |summary)", line)
        if header:
            name = header.group(1)  # None for the summary
            if name is not None:
                sections[name] = []
        elif name is not None:
            sections[name].append(line)
    return proc, cwd, sections


@pytest.mark.parametrize("module_name", _runner.DEMOS)
def test_demo_checks_pass(demo_run, module_name):
    proc, cwd, sections = demo_run
    short = module_name.split("_", 1)[1]
    assert short in sections, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = sections[short]
    text = "\n".join(lines)
    assert "Traceback (most recent call last)" not in text, text[-4000:]
    passed = [line for line in lines if line.startswith("  [ok  ] ")]
    failed = [line.strip() for line in lines if line.startswith("  [FAIL] ")]
    assert not failed, f"{module_name}: failed checks {failed}"
    assert len(passed) >= 3, "a demo must check its claims"
    row = re.search(
        rf"^\s*{_runner.number(module_name)}\s+{short}\s+(\d+)/(\d+)\s", proc.stdout, re.M
    )
    assert row and row.groups() == (str(len(passed)),) * 2, "the summary row counts the same checks"
    n = len(passed)
    assert any(line.startswith(f"  --- {short}: {n}/{n} checks passed (") for line in lines)
    assert not any(re.match(r"\s*\w*(Error|Exception): ", line) for line in lines), (
        "an expected error prints as one line `raises TypeError as expected: ...`"
    )
    figures = [line.split("figure: ", 1)[1] for line in lines if line.startswith("  figure: ")]
    assert sorted(Path(f).name for f in figures) == sorted(FIGURES.get(module_name, []))
    for figure in figures:
        path = cwd / figure
        assert path.parent == cwd / "figures"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_python_m_demos(demo_run):
    """The one command a reader runs: it ends with the table, exits 0, writes only figures."""
    proc, cwd, sections = demo_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = proc.stdout.split("=== summary", 1)[1]
    for module_name in _runner.DEMOS:
        assert module_name.split("_", 1)[1] in summary
    assert "all checks passed" in proc.stdout
    assert "[FAIL]" not in proc.stdout and "FAIL" not in summary  # (narration may say FAIL)
    assert sorted(sections) == sorted(m.split("_", 1)[1] for m in _runner.DEMOS)  # each once
    assert [p.name for p in cwd.iterdir()] == ["figures"]
    expected = sorted(name for names in FIGURES.values() for name in names)
    assert sorted(p.name for p in (cwd / "figures").iterdir()) == expected


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


def test_one_line_error():
    assert one_line(TypeError("first line\nsecond")) == "TypeError as expected: first line …"
    long = one_line(ValueError("x" * 300), width=20)
    assert long == "ValueError as expected: " + "x" * 19 + "…"


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

    out_dirs = []

    def failing(ctx):
        out_dirs.append(ctx.out_dir)
        ctx.check("a claim that is false", False)
        return ctx.checks

    monkeypatch.setattr(module, "run", failing)
    assert _runner.main(["1", "--no-plots"]) == 1
    out = capsys.readouterr()
    assert "FAIL" in out.out and "FAILED: worked_example" in out.err
    assert out_dirs == [None]  # --no-plots: the demo gets no folder, so it makes no figures


def test_main_exception_is_a_failure_and_later_demos_still_run(monkeypatch, capsys):
    module = _runner.load("d01_worked_example")

    def crashing(ctx):
        raise RuntimeError("demo crashed")

    def passing(ctx):  # a stand-in for demo 7: every demo runs only once, in demo_run
        ctx.check("a true claim", True)
        return ctx.checks

    monkeypatch.setattr(module, "run", crashing)
    monkeypatch.setattr(_runner.load("d07_batch"), "run", passing)
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


def test_summary_row_compares_each_residual_with_its_own_bound():
    """Issue #30: a float64 check (residual 1e-15, bound 1e-12) and a bfloat16 one (9e-3 within
    2e-2) are not one "max residual"; the "all" row gives the worst residual/bound."""
    from demos._common import Check

    f64 = _runner.Result(1, "f64", [Check("a", True, 1e-15, 1e-12)], 0.1)
    bf16 = _runner.Result(2, "bf16", [Check("b", True, 9e-3, 2e-2), Check("c", True, 0.0, 0)], 0.1)
    lines = _runner.summary([f64, bf16]).splitlines()
    assert (
        lines[0].split()[-3:] == ["residual/bound", "time"][-2:]
        or "worst residual/bound" in lines[0]
    )
    all_row = lines[-1].split()
    assert all_row[:2] == ["all", "3/3"] and all_row[2] == "0.45"  # max(1e-3, 0.45, 0)
    assert "9.0e-03" not in lines[-1]
