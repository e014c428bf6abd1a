"""The docs site's generated pages (run by mkdocs-gen-files during ``mkdocs build``).

Nothing here is copied by hand; every page below comes from the repository as it is:

- ``demos/*.md``: one page per literate demo in ``demos/``: its comments as prose, its
  code, and under each piece of code what it printed (checks included) and the figures it
  drew, from a ``--small`` run (``tools/docs_demos.py``, cached in ``build/docs-demos/``
  by a hash of ``demos/`` and ``jaxlinear/``);
- ``benchmarks.md``: ``benchmarks/RESULTS.md`` with the plots in ``benchmarks/results/``;
- ``api/*.md``: the API reference, one ``::: name`` per name of ``jaxlinear.__all__``
  (grouped; a name in no group lands on "Other") and one page per public submodule
  (``jaxlinear/nnx.py``, ``jaxlinear/equinox.py``, ``jaxlinear/linen.py`` once it exists);
- ``changelog.md``, ``contributing.md``, ``license.md``: the files at the repository root;
- ``SUMMARY.md``: the navigation (mkdocs-literate-nav), with every ``docs/guides/*.md``
  listed from its first heading, so a new guide needs no edit here or in ``mkdocs.yml``.

Environment: ``JAXLINEAR_DOCS_DEMOS=skip`` renders the demo pages without running them
(prose and code only; a fast preview); ``JAXLINEAR_DOCS_DEMOS=DIR`` reuses the records of a
``python tools/docs_demos.py DIR`` run.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Guides in reading order; any other docs/guides/*.md follows, sorted by file name.
GUIDE_ORDER = [
    "math.md",
    "bindings.md",
    "family.md",
    "dp.md",
    "dp-real-models.md",
    "adapters.md",
    "bring-your-model.md",
    "many-devices.md",
    "fsdp.md",
    "precision.md",
    "quantization.md",
]

# API pages: title -> names of jaxlinear.__all__ (a name in none of them goes to "Other").
API_GROUPS = {
    "The linear layer": [
        "Params", "init", "init_mlp", "SCHEMES", "linear", "dual_linear", "mlp",
        "pushforward", "pullback",
    ],
    "The family": [
        "dot_general", "dual_dot_general", "einsum", "dual_einsum", "conv_general_dilated",
        "dual_conv_general_dilated", "conv", "dual_conv", "init_conv", "conv_transpose",
        "dual_conv_transpose", "embed", "dual_embed", "bilinear_op", "BilinearOp", "BatchRule",
    ],
    "Per-example gradients": [
        "per_example_grad_norms", "clipped_grad", "per_example_routes", "RouteReport", "Route",
        "PlanEstimate",
    ],
    "Many devices": [
        "data_parallel_linear", "column_parallel_linear", "row_parallel_linear",
        "tensor_parallel_mlp", "fsdp_linear", "fsdp_gather", "fsdp_gather_tree", "Gather",
    ],
    "Low precision": ["Recipe", "Operand", "Product", "RECIPES"],
    "Parameters across libraries": ["from_torch", "to_torch", "from_flax", "to_flax"],
    "Jacobians and the adjoint test": [
        "dense_jacobian", "jacobian_blocks", "adjoint_test", "AdjointTestResult",
    ],
}  # fmt: skip

SUBMODULE_TITLES = {
    "nnx": "Flax NNX: jaxlinear.nnx",
    "equinox": "Equinox: jaxlinear.equinox",
    "linen": "Flax linen: jaxlinear.linen",
}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def first_heading(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem.replace("-", " ").capitalize()


# -- the demos --------------------------------------------------------------------------


def _source_hash() -> str:
    h = hashlib.sha256()
    for folder in ("demos", "jaxlinear"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    h.update((ROOT / "tools" / "docs_demos.py").read_bytes())
    return h.hexdigest()[:16]


def demo_records(modules: list[str]) -> tuple[dict[str, dict] | None, Path | None]:
    """Each demo's record (``tools/docs_demos.py``) and the run's folder, running the demos
    if not cached."""
    setting = os.environ.get("JAXLINEAR_DOCS_DEMOS", "")
    if setting == "skip":
        return None, None
    if setting:
        out = Path(setting)
    else:
        out = ROOT / "build" / "docs-demos" / _source_hash()
        if not (out / "done").exists():
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
            env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # see docs_demos.py
            print(f"docs: running the demos (--small) into {out}", file=sys.stderr)
            proc = subprocess.run(
                [sys.executable, str(ROOT / "tools" / "docs_demos.py"), str(out)],
                cwd=ROOT, env=env, capture_output=True, text=True,
            )  # fmt: skip
            if proc.returncode != 0:
                raise RuntimeError(
                    "docs: a demo failed; the site shows no failing demo\n"
                    + proc.stdout[-3000:] + proc.stderr[-3000:]
                )  # fmt: skip
            (out / "done").write_text("ok\n")
    return {m: json.loads((out / f"{m}.json").read_text(encoding="utf-8")) for m in modules}, out


def _prose_lines(source: str) -> set[int]:
    """Lines (1-based) that are prose: whole-line comments at bracket depth 0, indented by
    at most 4 spaces (module level, or the body of a top-level function)."""
    depth, prose = 0, set()
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif tok.type == tokenize.COMMENT and depth == 0:
            row, col = tok.start
            if col <= 4 and lines[row - 1][:col].strip() == "":
                prose.add(row)
    return prose


def _segments(source: str) -> list[tuple[str, int, int]]:
    """``(kind, first, last)`` line ranges (1-based, inclusive), kind ``"prose"``/``"code"``,
    of the module after its docstring and imports."""
    tree = ast.parse(source)
    body = tree.body
    start = 1
    for node in body:
        is_doc = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        if is_doc or isinstance(node, ast.Import | ast.ImportFrom):
            start = node.end_lineno + 1
        else:
            break
    lines = source.splitlines()
    prose = _prose_lines(source)
    segments: list[list] = []
    for i in range(start, len(lines) + 1):
        kind = "prose" if i in prose else "code"
        if not lines[i - 1].strip():
            kind = segments[-1][0] if segments else "code"  # a blank line joins its segment
        if segments and segments[-1][0] == kind:
            segments[-1][2] = i
        else:
            segments.append([kind, i, i])
    return [tuple(s) for s in segments]


def _narrative(source: str) -> list[tuple[int, int]]:
    """The line ranges of the top-level functions that have prose (``run``, and helpers such
    as ``d11``'s ``_demo``): an output goes under the innermost line on its call stack that
    lies in one of them (a helper without prose prints under the line that called it)."""
    prose = _prose_lines(source)
    ranges = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef):
            first, last = node.lineno, node.end_lineno
            if node.name == "run" or any(first <= i <= last for i in prose):
                ranges.append((first, last))
    return ranges


def _placed_line(stack: list[int], ranges: list[tuple[int, int]]) -> int | None:
    for line in reversed(stack):
        if any(first <= line <= last for first, last in ranges):
            return line
    return stack[0] if stack else None


def _run_body(source: str) -> tuple[int, int, int]:
    """The line of ``def run(ctx)`` and the lines of its body: the page leaves the ``def``
    line out and shows the body dedented by 4, as a script."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == "run":
            return node.lineno, node.body[0].lineno, node.end_lineno
    return 0, 0, -1


def _prose(lines: list[str]) -> str:
    """Comment lines to Markdown: ``# text`` to ``text``; indented lines (``#   a = b``: a
    formula, a worked sum) become a text block; blank comment lines separate paragraphs."""
    out, block = [], []

    def flush():
        if block:
            out.extend(["", "```text", *textwrap.dedent("\n".join(block)).splitlines(), "```", ""])
            block.clear()

    for line in lines:
        text = line.strip()
        if not text:
            continue
        text = text[1:]  # the "#"
        rule = re.fullmatch(r"\s*-- (.+?) -{3,}\s*", text)
        if rule:  # a section rule, "# -- 1. data parallel ------": a heading
            flush()
            out.extend(["", f"### {rule[1]}", ""])
        elif text.startswith("  "):  # indented: a formula, a worked sum, a table
            block.append(text[1:].rstrip())
        elif not text.strip():
            flush()
            out.append("")
        else:
            flush()
            out.append(text.strip())
    flush()
    return "\n".join(out).strip()


def _output(records: list[tuple[int | None, str]], figure_dir: str) -> str:
    text, figures = [], []
    for _, line in records:
        for part in line.split("\n"):
            if part.strip().startswith("figure: "):
                figures.append(Path(part.strip()[len("figure: ") :]).name)
            elif part.strip():
                text.append(part.rstrip())
    md = []
    if text:
        md += ['```text title="printed"', *textwrap.dedent("\n".join(text)).splitlines(), "```"]
    for name in figures:
        md += ["", f"![{name}]({figure_dir}/{name})"]
    return "\n".join(md)


def demo_page(module: str, record: dict | None) -> str:
    path = ROOT / "demos" / f"{module}.py"
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    doc = ast.get_docstring(ast.parse(source)) or module
    number, name = int(module[1:3]), module.split("_", 1)[1]
    run_def, run_first, _ = _run_body(source)
    ranges = _narrative(source)
    bodies = [(first + 1, last) for first, last in ranges]  # shown dedented by 4
    md = [
        "---\nhide:\n  - toc\n---",  # the code is 100 columns wide: no table of contents
        f"# {number}. {name}",
        "",
        doc.strip().splitlines()[0],
        "",
        f"Source: `demos/{module}.py`. Run it: `python -m demos {name}`"
        + (f" ({record['verdict']} in the docs build, `--small`)." if record else "."),
        "",
    ]
    records = (
        [(_placed_line(stack, ranges), text) for stack, text in record["records"]] if record else []
    )
    placed: set[int] = set()
    for kind, first, last in _segments(source):
        chunk = lines[first - 1 : last]
        if kind == "prose":
            md += [_prose(chunk), ""]
            continue
        chunk = [
            line[4:] if any(a <= i <= b for a, b in bodies) and line.startswith("    ") else line
            for i, line in enumerate(chunk, start=first)
            if not run_def <= i < run_first
        ]
        while chunk and not chunk[-1].strip():
            chunk.pop()
        while chunk and not chunk[0].strip():
            chunk.pop(0)
        if not chunk:
            continue
        md += ["```python", *chunk, "```", ""]
        here = [
            (i, r) for i, r in enumerate(records)
            if i not in placed and r[0] is not None and first <= r[0] <= last
        ]  # fmt: skip
        if here:
            placed.update(i for i, _ in here)
            md += [_output([r for _, r in here], "figures"), ""]
    rest = [r for i, r in enumerate(records) if i not in placed and r[0] is not None]
    if rest:
        md += ["Printed elsewhere:", "", _output(rest, "figures"), ""]
    if record:
        md += ["## Checks", "", f"{record['verdict']}:", ""]
        md += [f"- {'✓' if ok else '✗'} {claim.strip()}" for claim, ok in record["checks"]]
    return "\n".join(md).rstrip() + "\n"


def _demo_index(rows: list[tuple]) -> str:
    """``docs/_snippets/demos.md`` with each demo's name in its table linked to its page,
    and a row (from the docstring) for a demo the table does not list yet."""
    lines = (DOCS / "_snippets" / "demos.md").read_text(encoding="utf-8").splitlines()
    pages = {number: (name, page) for number, name, page, _, _ in rows}
    seen, last_row = set(), None
    for k, line in enumerate(lines):
        m = re.match(r"\| (\d+) \| (\w+) \|", line)
        if m and int(m[1]) in pages:
            name, page = pages[int(m[1])]
            seen.add(int(m[1]))
            lines[k] = line.replace(f"| {m[2]} |", f"| [{name}]({page}) |", 1)
            last_row = k
    extra = [f"| {n} | [{name}]({page}) | {title} |" for n, name, page, title, _ in rows
             if n not in seen]  # fmt: skip
    if last_row is None:
        lines += ["", "| # | demo | what it shows |", "|---|---|---|", *extra]
    else:
        lines[last_row + 1 : last_row + 1] = extra
    return "\n".join(lines) + "\n"


def demos_pages() -> list[tuple[str, str]]:
    modules = sorted(p.stem for p in (ROOT / "demos").glob("d[0-9][0-9]_*.py"))
    records, out = demo_records(modules)
    nav = []
    rows = []
    for module in modules:
        record = records[module] if records else None
        page = f"demos/{module[1:3]}-{module.split('_', 1)[1].replace('_', '-')}.md"
        with mkdocs_gen_files.open(page, "w") as f:
            f.write(demo_page(module, record))
        mkdocs_gen_files.set_edit_path(page, f"../demos/{module}.py")
        number, name = int(module[1:3]), module.split("_", 1)[1]
        doc = ast.get_docstring(ast.parse((ROOT / "demos" / f"{module}.py").read_text()))
        checks = ""
        if record:
            checks = f"{sum(ok for _, ok in record['checks'])}/{len(record['checks'])}"
        rows.append((number, name, Path(page).name, doc.splitlines()[0], checks))
        nav.append((f"{number}. {name}", page))
        if record:
            for fig in record["figures"]:
                src = out / "figures" / fig
                with mkdocs_gen_files.open(f"demos/figures/{fig}", "wb") as f:
                    f.write(src.read_bytes())
    with mkdocs_gen_files.open("demos/index.md", "w") as f:
        f.write(_demo_index(rows))
    return nav


# -- benchmarks, root files ------------------------------------------------------------


def benchmarks_page() -> None:
    """``docs/_snippets/benchmarks.md`` (how to run them, the headlines), then
    ``benchmarks/RESULTS.md`` one heading level down, then the plots."""
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8").splitlines()
    results = [line for line in results if not line.startswith("# ")]
    results = ["#" + line if re.match(r"#+ ", line) else line for line in results]
    text = (DOCS / "_snippets" / "benchmarks.md").read_text(encoding="utf-8")
    text += "\n## Results: `benchmarks/RESULTS.md`\n" + "\n".join(results)
    plots = sorted((ROOT / "benchmarks" / "results").glob("*.png"))
    text += "\n\n## Plots\n"
    for png in plots:
        with mkdocs_gen_files.open(f"benchmarks/{png.name}", "wb") as f:
            f.write(png.read_bytes())
        text += f"\n`benchmarks/results/{png.name}`:\n\n![{png.stem}]({png.name})\n"
    with mkdocs_gen_files.open("benchmarks/index.md", "w") as f:
        f.write(text)
    mkdocs_gen_files.set_edit_path("benchmarks/index.md", "../benchmarks/RESULTS.md")


def root_pages() -> None:
    for name, page in [("CHANGELOG.md", "changelog.md"), ("CONTRIBUTING.md", "contributing.md")]:
        if (ROOT / name).exists():
            text = (ROOT / name).read_text(encoding="utf-8")
            text = text.replace("](docs/", "](")  # links from the root into docs/ (GitHub)
            with mkdocs_gen_files.open(page, "w") as f:
                f.write(text)
    if (ROOT / "LICENSE").exists():
        with mkdocs_gen_files.open("license.md", "w") as f:
            f.write("# License\n\n```text\n" + (ROOT / "LICENSE").read_text() + "\n```\n")


# -- the API reference -----------------------------------------------------------------


def public_names() -> list[str]:
    tree = ast.parse((ROOT / "jaxlinear" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise RuntimeError("jaxlinear/__init__.py has no __all__")


def api_pages() -> list[tuple[str, str]]:
    names = public_names()
    grouped = {n for group in API_GROUPS.values() for n in group}
    groups = {title: [n for n in group if n in names] for title, group in API_GROUPS.items()}
    other = [n for n in names if n not in grouped]
    if other:
        groups["Other"] = other
    nav = []
    for title, members in groups.items():
        if not members:
            continue
        page = f"api/{slug(title)}.md"
        body = [f"# {title}", ""]
        body += [f"::: jaxlinear.{n}\n" for n in members]
        with mkdocs_gen_files.open(page, "w") as f:
            f.write("\n".join(body))
        nav.append((title, page))
    for path in sorted((ROOT / "jaxlinear").glob("*.py")):
        if path.name.startswith("_"):
            continue
        title = SUBMODULE_TITLES.get(path.stem, f"jaxlinear.{path.stem}")
        page = f"api/{path.stem}.md"
        with mkdocs_gen_files.open(page, "w") as f:
            f.write(f"# {title}\n\n::: jaxlinear.{path.stem}\n")
        nav.append((title, page))
    with mkdocs_gen_files.open("api/index.md", "w") as f:
        lines = [
            "# API reference",
            "",
            "Every public name, generated from the docstrings. `import jaxlinear` gives "
            "the names below; the adapters are submodules that import their library.",
            "",
        ]
        for title, page in nav:
            lines.append(f"- [{title}]({Path(page).name})")
        f.write("\n".join(lines) + "\n")
    return nav


# -- the navigation --------------------------------------------------------------------


def guides() -> list[tuple[str, str]]:
    found = {p.name: p for p in (DOCS / "guides").glob("*.md")}
    order = [n for n in GUIDE_ORDER if n in found] + sorted(set(found) - set(GUIDE_ORDER))
    return [(first_heading(found[n]), f"guides/{n}") for n in order]


def main() -> None:
    demo_nav = demos_pages()
    benchmarks_page()
    root_pages()
    api_nav = api_pages()
    nav = [
        "* [Home](index.md)",
        "* [Getting started](getting-started.md)",
        "* Guides",
        *[f"    * [{t}]({p})" for t, p in guides()],
        "* [Demos](demos/index.md)",
        *[f"    * [{t}]({p})" for t, p in demo_nav],
        "* [Examples](examples.md)",
        "* [Benchmarks](benchmarks/index.md)",
        "* [API reference](api/index.md)",
        *[f"    * [{t}]({p})" for t, p in api_nav],
        "* Project",
        "    * [Design](DESIGN.md)",
        "    * [Contributing](contributing.md)",
        "    * [Changelog](changelog.md)",
        "    * [License](license.md)",
    ]
    with mkdocs_gen_files.open("SUMMARY.md", "w") as f:
        f.write("\n".join(nav) + "\n")


main()
