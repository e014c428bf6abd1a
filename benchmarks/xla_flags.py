"""XLA:CPU options that change how dots run, compared in one interleaved run.

``XLA_FLAGS`` is read once, when JAX starts its backend, so each variant lives in its
own worker process (``benchmarks.worker`` with that ``XLA_FLAGS``); PyTorch runs in one
more. The driver holds no JAX at all; it asks one process at a time to time one
item, round by round, so every variant sees the same machine conditions. A variant
whose flags XLA rejects is reported as such; the library calls in the optimized HLO
show whether an accepted flag changed anything.

Found in jaxlib 0.10.2 (``XLA_FLAGS=--help``): dots go to YNNPACK by default
(``__ynn_fusion``); ``--xla_cpu_experimental_ynn_fusion_type=-individual_dot`` sends
them back to XLA's Eigen runtime. ``--xla_cpu_use_thunk_runtime`` is deprecated (a
no-op); the oneDNN flags are accepted but this wheel routes no dot to oneDNN.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import statistics
import tempfile
import time

from benchmarks.cases import TWO_D, Case, cpu_suite
from benchmarks.report import fmt_time
from benchmarks.runner import WARM_BELOW_S, Worker, WorkerError

VARIANTS = (
    ("default (YNNPACK dots)", ""),
    # The same flags in a second process: the noise floor between processes (buffer
    # placement alone moves one compiled program by up to ~15% here).
    ("default, 2nd process", ""),
    ("Eigen dots", "--xla_cpu_experimental_ynn_fusion_type=-individual_dot"),
    (
        "Eigen dots, 1 thread",
        "--xla_cpu_experimental_ynn_fusion_type=-individual_dot --xla_cpu_multi_thread_eigen=false",
    ),
    ("YNN +dot fusions", "--xla_cpu_experimental_ynn_fusion_type=+dot"),
    ("YNN +dot,+eltwise,+reduce", "--xla_cpu_experimental_ynn_fusion_type=+dot,+eltwise,+reduce"),
    ("oneDNN", "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true"),
    (
        "XNN graph fusion",
        "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    ),
    ("XNNPACK off", "--xla_cpu_use_xnnpack=false"),
    ("thunk runtime off", "--xla_cpu_use_thunk_runtime=false"),
)


def _items() -> list[tuple[Case, str]]:
    """(case, impl) pairs timed under every variant."""
    by_name = {c.name: c for c in cpu_suite()}
    gemm_1024 = Case("gemm-1024", "layer", (1024,), (1024, 1024), rounds=0, tag=TWO_D)
    items = [
        (by_name["2d-256"], "gemm"),
        (gemm_1024, "gemm"),
        (by_name["2d-4096"], "gemm"),
        (by_name["2d-1024"], "linear"),
        (by_name["2d-1024"], "plain"),
        (by_name["3d"], "linear"),
        (by_name["3d"], "plain"),
        (by_name["mlp"], "linear"),
    ]
    return items


_TORCH_FOR = {"gemm": "torch_gemm", "linear": "torch", "plain": None}


def _label(case: Case, impl: str) -> str:
    if impl == "gemm":
        return f"GEMM {case.rows}×{case.d_in}×{case.d_out}"
    what = "train step" if case.kind == "mlp" else "fwd+bwd"
    return f"{impl} {what} {case.name}"


def main(args, log) -> int:
    t_start = time.perf_counter()
    rounds = max(1, round(10 * args.rounds))
    target_s = args.target_s or 0.05
    logdir = tempfile.mkdtemp(prefix="jaxlinear-xla-flags-")
    procs: dict[str, Worker] = {}
    rejected: dict[str, str] = {}
    for name, flags in VARIANTS:
        err = open(os.path.join(logdir, f"{len(procs) + len(rejected)}.log"), "w")
        env = {"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
        procs[name] = Worker(name, "jax", "cpu", env=env, stderr=err)
    from benchmarks import torch_impls

    torch_why = "--no-torch" if args.no_torch else torch_impls.available()
    if torch_why is None:
        procs["PyTorch"] = Worker("PyTorch", "torch", "cpu")
    else:
        log(f"note: skipping torch: {torch_why}")

    items = _items()
    prepared: dict[tuple[str, int], tuple[Worker, str, int, bool]] = {}
    library_calls: dict[str, dict[str, list[str]]] = {}
    hlo_hashes: dict[str, dict[str, str | None]] = {}
    descs: dict[str, dict] = {}
    for name, w in list(procs.items()):
        try:
            descs[name] = w.ready()
        except WorkerError as e:
            rejected[name] = str(e)
    for i, (case, impl) in enumerate(items):
        log(f"preparing {_label(case, impl)}")
        for name, w in list(procs.items()):
            if name in rejected:
                continue
            which = impl if name != "PyTorch" else _TORCH_FOR[impl]
            if which is None:
                continue
            key = f"{i}/{which}"
            try:
                info = w.prepare(key, which, case)
                t1 = min(w.time(key, 1), w.time(key, 1))
                reps = max(1, min(20000, round(target_s / max(t1, 1e-7))))
                warm = t1 < WARM_BELOW_S
                w.time(key, reps, warm)
            except WorkerError as e:
                rejected[name] = str(e)
                log(f"  ! {name}: {e}")
                continue
            prepared[name, i] = (w, key, reps, warm)
            library_calls.setdefault(name, {})[_label(case, impl)] = info.get("library_calls", [])
            hlo_hashes.setdefault(name, {})[_label(case, impl)] = info.get("hlo_hash")

    names = [n for n in procs if n not in rejected]
    samples: dict[tuple[str, int], list[float]] = {k: [] for k in prepared}
    rng = random.Random(0)
    for r in range(rounds):
        t_round = time.perf_counter()
        for i in range(len(items)):
            here = [n for n in names if (n, i) in prepared]
            for name in rng.sample(here, len(here)):
                w, key, reps, warm = prepared[name, i]
                samples[name, i].append(w.time(key, reps, warm))
        log(f"  round {r + 1}/{rounds} ({time.perf_counter() - t_round:.1f} s)")
    for w in procs.values():
        w.close()

    default = VARIANTS[0][0]
    table = []
    for name in names:
        flags = dict(VARIANTS).get(name, "(PyTorch, in its own process)")
        row = {"variant": name, "flags": flags, "items": {}}
        for i, (case, impl) in enumerate(items):
            s = samples.get((name, i))
            if not s:
                continue
            entry = {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s)}
            base = samples.get((default, i))
            if base:
                ratios = [a / b for a, b in zip(s, base, strict=True)]
                entry["vs_default"] = {
                    "median": statistics.median(ratios),
                    "min": min(ratios),
                    "max": max(ratios),
                }
            row["items"][_label(case, impl)] = entry
        row["library_calls"] = library_calls.get(name, {})
        base_hashes = hlo_hashes.get(default, {})
        row["same_program_as_default"] = {
            lab: h is not None and h == base_hashes.get(lab)
            for lab, h in hlo_hashes.get(name, {}).items()
        }
        table.append(row)

    labels = [_label(c, i) for c, i in items]
    lines = [f"XLA:CPU dot options, {rounds} interleaved rounds (median; × default, same round)"]
    for row in table:
        lines.append(f"{row['variant']}: {row['flags'] or '(none)'}")
        for lab in labels:
            e = row["items"].get(lab)
            if e:
                v = e.get("vs_default")
                rel = f"  ×{v['median']:.2f} ({v['min']:.2f}–{v['max']:.2f})" if v else ""
                calls = ", ".join(row["library_calls"].get(lab, []))
                same = " same program" if row["same_program_as_default"].get(lab) else ""
                lines.append(f"    {lab:28} {fmt_time(e['median_s']):>10}{rel}  [{calls}]{same}")
    for name, why in rejected.items():
        lines.append(f"{name}: rejected or failed: {why} (log: {logdir})")
    text = "\n".join(lines)
    log(text)

    meta = {
        "mode": "xla_flags",
        "date": datetime.date.today().isoformat(),
        "rounds": rounds,
        "target_sample_s": target_s,
        "workers": descs,
        "wall_s": time.perf_counter() - t_start,
    }
    base = os.path.join(args.out, "results_xla_flags")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "variants": table, "rejected": rejected}, f, indent=1)
    md = [
        f"### XLA:CPU dot options, {meta['date']} ({rounds} interleaved rounds, one process per"
        " variant)",
        "",
        "| variant | XLA_FLAGS | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for row in table:
        cells = []
        for lab in labels:
            e = row["items"].get(lab)
            if not e:
                cells.append("–")
                continue
            v = e.get("vs_default")
            same = "=" if row["same_program_as_default"].get(lab) else ""
            cells.append(fmt_time(e["median_s"]) + (f" (×{v['median']:.2f}{same})" if v else ""))
        md.append(f"| {row['variant']} | `{row['flags']}` | " + " | ".join(cells) + " |")
    md.append(
        "\n(×r: median over rounds of this variant's time ÷ the default's in the same round;"
        " `=`: XLA compiled exactly the same program as with the default flags.)"
    )
    md += [f"- {name}: rejected: {why}" for name, why in rejected.items()]
    with open(base + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    log(f"wrote {base}.json, .md in {meta['wall_s']:.0f} s")
    return 0
