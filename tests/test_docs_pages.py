"""The docs site's page generator (``tools/docs_pages.py``), without building the site.

The strict build itself runs in CI (``.ci/run``); these checks are pure Python (no JAX
program is compiled) and catch what a build would only show as a wrong page: a demo whose
source the generator cannot split into prose and code, output placed under the wrong code,
a stale name in the API groups.
"""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pages():
    """``tools/docs_pages.py`` as a namespace, with mkdocs-gen-files stubbed out and its
    ``main()`` (which writes the site's files) not run."""
    stub = types.SimpleNamespace(open=None, set_edit_path=None)
    saved = sys.modules.get("mkdocs_gen_files")
    sys.modules["mkdocs_gen_files"] = stub
    try:
        source = (ROOT / "tools" / "docs_pages.py").read_text(encoding="utf-8")
        assert source.rstrip().endswith("\nmain()")
        namespace = {"__file__": str(ROOT / "tools" / "docs_pages.py"), "__name__": "docs_pages"}
        exec(compile(source.rstrip()[: -len("main()")], "docs_pages.py", "exec"), namespace)
    finally:
        if saved is None:
            del sys.modules["mkdocs_gen_files"]
        else:
            sys.modules["mkdocs_gen_files"] = saved
    return types.SimpleNamespace(**namespace)


DEMO = '''"""A demo: its first line."""

import jax


def run(ctx):
    # Prose, first paragraph,
    # on two lines.
    #
    # -- 1. a section ------------------------------------------
    # Formula below:
    #   y = x + 1
    x = 1  # a comment in the code
    ctx.say("one")
    _helper(ctx)
    # More prose.
    for i in range(2):
        # a comment inside the loop stays code
        ctx.say(f"loop {i}")
    _story(ctx)


def _helper(ctx):
    ctx.say("from the helper")


def _story(ctx):
    # A helper with prose is part of the story: its output stays in it.
    ctx.say("in the story")
'''


def test_demo_page_prose_code_and_output(pages, tmp_path, monkeypatch):
    demos = tmp_path / "demos"
    demos.mkdir()
    (demos / "d99_toy.py").write_text(DEMO)
    monkeypatch.setitem(pages.demo_page.__globals__, "ROOT", tmp_path)
    lines = DEMO.splitlines()
    say_one = lines.index('    ctx.say("one")') + 1
    call_helper = lines.index("    _helper(ctx)") + 1
    in_helper = lines.index('    ctx.say("from the helper")') + 1
    in_loop = lines.index('        ctx.say(f"loop {i}")') + 1
    call_story = lines.index("    _story(ctx)") + 1
    in_story = lines.index('    ctx.say("in the story")') + 1
    record = {
        "verdict": "1/1 checks passed (0.1 s)",
        "checks": [["a claim", True]],
        "records": [
            [[say_one], "  one"],
            [[call_helper, in_helper], "  from the helper"],  # under the call in run
            [[in_loop], "  loop 0"],
            [[in_loop], "  loop 1"],
            [[call_story, in_story], "  in the story"],  # under its line in _story
        ],
    }
    md = pages.demo_page("d99_toy", record)
    assert md.startswith("---\nhide:\n  - toc\n---\n# 99. toy\n")
    assert "A demo: its first line." in md
    assert "Prose, first paragraph,\non two lines." in md
    assert "### 1. a section" in md
    assert "```text\ny = x + 1\n```" in md
    assert "def run" not in md  # run's body is shown as a script
    assert "```python\nx = 1  # a comment in the code\n" in md  # dedented by 4
    assert "    # a comment inside the loop stays code" in md
    # Each output right under the code chunk that printed it, in order.
    first_code = md.index("x = 1")
    first_out = md.index('```text title="printed"\none\nfrom the helper\n```')
    more_prose = md.index("More prose.")
    loop_out = md.index('```text title="printed"\nloop 0\nloop 1\n```')
    story_prose = md.index("A helper with prose is part of the story")
    story_out = md.index('```text title="printed"\nin the story\n```')
    assert first_code < first_out < more_prose < loop_out < story_prose < story_out
    assert "- ✓ a claim" in md


def test_every_demo_renders(pages):
    """Each demo in demos/ splits into prose and code, and every line of its ``run`` body
    reaches the page (no record: as with ``JAXLINEAR_DOCS_DEMOS=skip``)."""
    modules = sorted(p.stem for p in (ROOT / "demos").glob("d[0-9][0-9]_*.py"))
    assert len(modules) >= 24
    for module in modules:
        source = (ROOT / "demos" / f"{module}.py").read_text(encoding="utf-8")
        md = pages.demo_page(module, None)
        assert md.count("```python") >= 1, module
        run = next(n for n in ast.parse(source).body if getattr(n, "name", "") == "run")
        body = source.splitlines()[run.body[0].lineno - 1 : run.end_lineno]
        for line in body:
            if line.strip() and not line.lstrip().startswith("#"):
                assert line.removeprefix("    ") in md, (module, line)


def test_api_groups_name_public_names(pages):
    """A name in ``API_GROUPS`` that left ``jaxlinear.__all__`` would vanish from the API
    reference silently; a name in no group lands on "Other" (allowed, but listed here)."""
    names = set(pages.public_names())
    grouped = [n for group in pages.API_GROUPS.values() for n in group]
    assert sorted(set(grouped) - names) == []
    assert len(grouped) == len(set(grouped))


def test_guides_listed_with_titles(pages):
    """Every docs/guides/*.md is in the navigation, titled by its first heading."""
    listed = pages.guides()
    files = sorted(p.name for p in (ROOT / "docs" / "guides").glob("*.md"))
    assert sorted(Path(page).name for _, page in listed) == files
    for title, page in listed:
        assert f"# {title}" in (ROOT / "docs" / page).read_text(encoding="utf-8").splitlines()
