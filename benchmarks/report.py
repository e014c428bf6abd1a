"""Statistics, targets, and the three outputs: a printed table, JSON, a plot (+ Markdown).

Every ratio is formed per round (same round, same conditions) and then summarized as
median and min–max over the rounds.
"""

from __future__ import annotations

import statistics

from benchmarks.cases import LARGE, ND, TINY, TWO_D
from benchmarks.runner import CaseResult

LABELS = {
    "linear": "jaxlinear.linear",
    "dual_linear": "jaxlinear.dual_linear",
    "plain": "JAX AD x@W+b",
    "flax": "flax.linen.Dense",
    "equinox": "equinox.nn.Linear+vmap",
    "torch": "PyTorch (eager)",
    "gemm": "1 GEMM, XLA",
    "torch_gemm": "1 GEMM, PyTorch",
}
ORDER = tuple(LABELS)
OURS = ("linear", "dual_linear")
TINY_OVERHEAD_S = 10e-6  # tiny shapes: at most plain jax.jit + 10 µs per call


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _paired(a: list[float], b: list[float], op=lambda a, b: a / b) -> dict:
    """``op`` of the same round's samples, summarized over rounds."""
    return _stats([op(x, y) for x, y in zip(a, b, strict=True)])


def summarize(res: CaseResult) -> dict:
    case = res.case
    impls = {}
    for impl in ORDER:
        if impl not in res.samples:
            continue
        s = res.samples[impl]
        st = _stats(s)
        d = {
            "label": LABELS[impl],
            "median_s": st["median"],
            "min_s": st["min"],
            "max_s": st["max"],
            "samples_s": s,
            "reps_per_sample": res.reps[impl],
            **res.info.get(impl, {}),
        }
        flops = case.gemm_flops if impl.endswith("gemm") else case.flops
        d["tflops"] = flops / st["median"] / 1e12
        if "plain" in res.samples:
            d["vs_plain"] = _paired(s, res.samples["plain"])
        # Against 3 GEMMs of the implementation's own matmul library (PyTorch's for PyTorch).
        gemm = "torch_gemm" if impl == "torch" else "gemm"
        if case.kind == "layer" and gemm in res.samples and not impl.endswith("gemm"):
            d["vs_3gemm"] = _paired(s, res.samples[gemm], lambda a, g: a / (3 * g))
            d["gemm_fraction"] = 1 / d["vs_3gemm"]["median"]
            if gemm != "gemm" and "gemm" in res.samples:
                d["vs_3gemm_xla"] = _paired(s, res.samples["gemm"], lambda a, g: a / (3 * g))
        if case.kind == "mlp":
            d["samples_per_s"] = case.rows / st["median"]
        impls[impl] = d
    return {
        "name": case.name,
        "label": case.label,
        "case": case.to_json(),
        "flops": case.flops,
        "gemm_flops": case.gemm_flops if case.kind == "layer" else None,
        "rounds": case.rounds,
        "impls": impls,
        "errors": res.errors,
        "wall_s": res.wall_s,
    }


# ----------------------------------------------------------------------------------------
# Targets (issue 5), evaluated on the measured medians of per-round ratios.


def targets(summaries: list[dict]) -> list[dict]:
    rows = []

    def add(target, s, impl, value, limit, met, unit="×"):
        rows.append(
            {
                "target": target,
                "case": s["name"],
                "dtype": s["case"]["dtype"],
                "impl": impl,
                "value": value,
                "limit": limit,
                "unit": unit,
                "met": bool(met),
            }
        )

    for s in summaries:
        im, case = s["impls"], s["case"]
        tag = case["tag"]
        for ours in OURS:
            if ours not in im:
                continue
            mine = im[ours]["samples_s"]

            def vs(other, mine=mine, im=im):
                return _paired(mine, im[other]["samples_s"])["median"]

            if tag == ND:
                for ref in ("plain", "flax"):
                    if ref in im:
                        add(f"N-D: ≤ 0.90× {LABELS[ref]}", s, ours, vs(ref), 0.90, vs(ref) <= 0.90)
            if tag in (TWO_D, LARGE, TINY) and "plain" in im:
                add("2-D: ≤ 1.03× JAX AD", s, ours, vs("plain"), 1.03, vs("plain") <= 1.03)
            if tag in (TWO_D, LARGE) and min(case["batch"][0], *case["sizes"]) >= 1024:
                if "vs_3gemm" in im[ours]:
                    v = im[ours]["vs_3gemm"]["median"]
                    add("2-D ≥1024: ≤ 1.10× 3 GEMMs", s, ours, v, 1.10, v <= 1.10)
            if tag == TINY and "plain" in im:
                diff = _paired(mine, im["plain"]["samples_s"], lambda a, b: a - b)["median"]
                add(
                    "tiny: ≤ JAX AD + 10 µs",
                    s,
                    ours,
                    diff * 1e6,
                    TINY_OVERHEAD_S * 1e6,
                    diff <= TINY_OVERHEAD_S,
                    "µs",
                )
            if "equinox" in im:
                add("ahead of Equinox", s, ours, vs("equinox"), 1.0, vs("equinox") < 1.0)
            if "torch" in im:
                add("vs PyTorch (info)", s, ours, vs("torch"), None, vs("torch") <= 1.0)
            rb = im[ours].get("residual_bytes")
            if case["kind"] == "layer" and rb is not None:
                n = 1
                for d in case["batch"]:
                    n *= d
                x_w = 4 * (n * case["sizes"][0] + case["sizes"][0] * case["sizes"][1])
                exact = rb == x_w and len(im[ours]["residuals"]) == 2
                add("residuals = x and W", s, ours, rb, x_w, exact, "B")
            if case["kind"] == "mlp" and rb is not None and "flax" in im:
                for key, what in (("residual_bytes", "all"), ("residual_bytes_new", "new")):
                    mine_b, flax_b = im[ours].get(key), im["flax"].get(key)
                    if mine_b is not None and flax_b is not None:
                        t = f"MLP residuals ({what}) ≤ Flax"
                        add(t, s, ours, mine_b, flax_b, mine_b <= flax_b, "B")
    return rows


# ----------------------------------------------------------------------------------------
# Printing.


def fmt_time(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _residuals(d: dict) -> str:
    """Bytes saved for the backward pass; in brackets those not already alive as arguments."""
    total = d.get("residual_bytes")
    if total is None:
        return "–"
    new = d.get("residual_bytes_new")
    return fmt_bytes(total) + ("" if new is None else f" ({fmt_bytes(new)})")


def _ratio(d: dict | None) -> str:
    if not d:
        return "–"
    return f"{d['median']:.3f} ({d['min']:.2f}–{d['max']:.2f})"


def _rate(s: dict, d: dict, gpu: bool) -> str:
    if s["case"]["kind"] == "mlp":
        return f"{d['samples_per_s']:,.0f} samples/s"
    return f"{d['tflops']:.1f} TFLOP/s" if gpu else f"{d['tflops'] * 1e3:.0f} GFLOP/s"


def case_rows(s: dict, gpu: bool) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one case's table (shared by the printed and Markdown forms)."""
    header = ["implementation", "median", "min–max", "× JAX AD", "× 3 GEMMs", "rate"]
    if gpu:
        header.append("of GEMM rate")  # this implementation's FLOP/s ÷ one GEMM's FLOP/s
    header += ["compile", "residuals (new)"]
    rows = []
    plain_program = s["impls"].get("plain", {}).get("hlo_hash")
    for impl, d in s["impls"].items():
        same = impl != "plain" and plain_program and d.get("hlo_hash") == plain_program
        rows.append(
            [
                d["label"],
                fmt_time(d["median_s"]),
                f"{fmt_time(d['min_s'])}–{fmt_time(d['max_s'])}",
                _ratio(d.get("vs_plain")) + (" =" if same else ""),
                f"{d['vs_3gemm']['median']:.3f}" if "vs_3gemm" in d else "–",
                _rate(s, d, gpu),
                *([f"{d['gemm_fraction']:.0%}" if "gemm_fraction" in d else "–"] if gpu else []),
                fmt_time(d.get("compile_s")),
                _residuals(d),
            ]
        )
    return header, rows


def _title(s: dict) -> str:
    c = s["case"]
    reps = {d["reps_per_sample"] for d in s["impls"].values()}
    reps_s = f"{min(reps)}–{max(reps)}" if len(reps) > 1 else f"{reps.pop()}" if reps else "0"
    return (
        f"{s['name']}: {s['label']} {c['dtype']}, {c['rounds']} rounds × {reps_s} calls/sample"
        f" ({s['wall_s']:.0f} s)"
    )


def format_case(s: dict, gpu: bool) -> str:
    header, rows = case_rows(s, gpu)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [_title(s)]
    for r in [header, *rows]:
        lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    for impl, err in s["errors"].items():
        lines.append(f"  ! {impl}: {err}")
    return "\n".join(lines)


def _target_value(t: dict) -> str:
    if t["unit"] == "B":
        return fmt_bytes(t["value"])
    if t["unit"] == "µs":
        return f"{t['value']:+.1f} µs"
    return f"{t['value']:.3f}×"


def _target_limit(t: dict) -> str:
    if t["limit"] is None:
        return "(info)"
    if t["unit"] == "B":
        return fmt_bytes(t["limit"])
    return f"{t['limit']:g} {t['unit']}"


def _verdict(t: dict) -> str:
    if t["limit"] is None:
        return "faster" if t["met"] else "slower"
    return "met" if t["met"] else "NOT met"


def format_targets(rows: list[dict]) -> str:
    lines = ["Targets (median of per-round ratios):"]
    for t in rows:
        lines.append(
            f"  {_verdict(t):8} {t['target']:28} {t['case']:14} {t['impl']:12}"
            f" {_target_value(t):>12}  limit {_target_limit(t)}"
        )
    return "\n".join(lines)


def markdown(meta: dict, summaries: list[dict], target_rows: list[dict]) -> str:
    gpu = meta.get("mode") == "gpu"
    out = [
        f"### {meta['mode'].upper()} run, {meta['date']}",
        "",
        f"- machine: {meta['machine']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        f"- command: `{meta['command']}`; total {meta['wall_s'] / 60:.1f} min",
    ]
    if meta.get("xla_flags"):
        out.append(f"- XLA_FLAGS: `{meta['xla_flags']}`")
    for impl, why in meta.get("skipped", {}).items():
        out.append(f"- skipped {impl}: {why}")
    for s in summaries:
        header, rows = case_rows(s, gpu)
        out += ["", f"**{_title(s)}**", ""]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        out += ["| " + " | ".join(r) + " |" for r in rows]
        out += [f"- {impl} failed: {err}" for impl, err in s["errors"].items()]
    out += [
        "",
        '(`=` after "× JAX AD": XLA compiled exactly the same program as for JAX AD, names aside.)',
    ]
    out += ["", "**Targets** (median of per-round ratios)", ""]
    out += [
        "| target | case | dtype | impl | measured | limit | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in target_rows:
        out.append(
            f"| {t['target']} | {t['case']} | {t['dtype']} | {t['impl']} | {_target_value(t)}"
            f" | {_target_limit(t)} | {_verdict(t)} |"
        )
    return "\n".join(out) + "\n"


def plot(summaries: list[dict], path: str, title: str) -> str | None:
    """Two panels: time ÷ JAX AD (median, min–max whiskers) and 3·GEMM ÷ time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    impls = [i for i in ORDER if not i.endswith("gemm")]
    impls = [i for i in impls if any(i in s["impls"] for s in summaries)]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.3 * len(summaries) + 3), 8))
    width = 0.8 / max(1, len(impls))
    names = [s["name"] for s in summaries]
    for k, impl in enumerate(impls):
        xs, ys, lo, hi, xs2, eff = [], [], [], [], [], []
        for i, s in enumerate(summaries):
            d = s["impls"].get(impl)
            if d is None:
                continue
            if "vs_plain" in d:
                r = d["vs_plain"]
                xs.append(i + k * width)
                ys.append(r["median"])
                lo.append(r["median"] - r["min"])
                hi.append(r["max"] - r["median"])
            if "gemm_fraction" in d:
                xs2.append(i + k * width)
                eff.append(d["gemm_fraction"])
        axes[0].bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=LABELS[impl])
        axes[1].bar(xs2, eff, width, label=LABELS[impl])
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_ylabel("time ÷ JAX AD (same round)")
    axes[0].set_title(title)
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set_ylabel("3 own GEMMs ÷ time (1 = GEMM bound)")
    for ax in axes:
        ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=30, ha="right")
    axes[0].legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
