"""``python -m benchmarks``: jaxlinear against plain JAX AD, Flax, Equinox and PyTorch.

Modes:
  (default)      the full CPU suite (4-9 minutes on 2 cores, depending on other load)
  --smoke        tiny shapes, one round: every available implementation runs (CI)
  --gpu          the accelerator suite, float32 and bfloat16 (--dtypes to choose), then
                 the fp8 / int8 recipes against bfloat16 (benchmarks.bench_quant --gpu)
  --xla-flags    XLA:CPU dot options, each in its own process, interleaved (about 2 min)

Writes ``results_<mode>.json``, ``results_<mode>.md`` and ``results_<mode>.png`` under
``--out`` (default: ``benchmarks/out``), the JSON and Markdown again after every case.
Missing peers (flax, equinox, torch) are skipped with a printed note.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time


def _parse(argv):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny shapes, one round (CI)")
    mode.add_argument("--gpu", action="store_true", help="run the accelerator suite")
    mode.add_argument("--xla-flags", action="store_true", help="compare XLA:CPU dot options")
    p.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"),
        help="directory for the JSON, Markdown and plot (default: benchmarks/out, git-ignored)",
    )
    p.add_argument("--only", default="", help="comma-separated case names to run (default all)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="gpu suite: compute dtypes")
    p.add_argument(
        "--suite",
        choices=("cpu", "gpu", "smoke"),
        default=None,
        help="the case list (default: the mode's own; e.g. --suite gpu on a CPU to test it)",
    )
    p.add_argument("--rounds", type=float, default=1.0, help="scale every case's round count")
    p.add_argument("--target-s", type=float, default=None, help="seconds per timing sample")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    p.add_argument(
        "--budget-s", type=float, default=None, help="start no new case after this many seconds"
    )
    p.add_argument(
        "--precision",
        choices=("default", "highest"),
        default="default",
        help="float32 matmul precision for every framework (GPU: default means TF32)",
    )
    return p.parse_args(argv)


def _machine(backend: str) -> str:
    if backend == "gpu":
        import jax

        return f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{os.cpu_count()}-core {platform.machine()} ({model}){mem}"


def _loadavg() -> float | None:
    """The 1-minute load average (other processes share the machine), if the OS tells."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def main(argv=None) -> int:
    args = _parse(argv)
    mode = (
        "smoke" if args.smoke else "gpu" if args.gpu else "xla_flags" if args.xla_flags else "cpu"
    )
    # Environment first: JAX reads these when it starts.
    if args.gpu:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for torch
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    load_start = _loadavg()

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.xla_flags:
        from benchmarks import xla_flags

        return xla_flags.main(args, log)

    import jax

    from benchmarks import cases as cases_mod
    from benchmarks import jax_impls, report, runner, torch_impls

    precision = None if args.precision == "default" else args.precision
    if precision:
        jax.config.update("jax_default_matmul_precision", precision)
    backend = jax.default_backend()
    if args.gpu and backend != "gpu":
        log(f"--gpu: JAX found no GPU (default backend: {backend}); nothing to do")
        return 2
    device = "gpu" if args.gpu else "cpu"

    suite_name = args.suite or ("smoke" if args.smoke else "gpu" if args.gpu else "cpu")
    if suite_name == "smoke":
        suite = cases_mod.smoke_suite()
    elif suite_name == "gpu":
        suite = cases_mod.gpu_suite(tuple(args.dtypes.split(",")))
    else:
        suite = cases_mod.cpu_suite()
    if args.only:
        wanted = set(args.only.split(","))
        suite = [c for c in suite if c.name in wanted]
    if args.rounds != 1.0:
        import dataclasses

        suite = [
            dataclasses.replace(c, rounds=max(1, round(c.rounds * args.rounds))) for c in suite
        ]
    target_s = args.target_s or (0.002 if args.smoke else 0.02 if args.gpu else 0.05)

    skipped = {impl: why for impl, why in jax_impls.available().items() if why}
    torch_why = "--no-torch" if args.no_torch else torch_impls.available()
    worker = None
    if torch_why is None:
        worker = runner.Worker("torch", "torch", device, precision)
    else:
        skipped["torch"] = torch_why
    for impl, why in skipped.items():
        log(f"note: skipping {impl}: {why}")

    local = runner.Local()
    versions = jax_impls.versions()
    if worker is not None:
        try:
            versions.update({k: v for k, v in worker.ready().items() if k != "torch_threads"})
        except runner.WorkerError as e:
            log(f"note: skipping torch: {e}")
            skipped["torch"] = str(e)
            worker.close()
            worker = None

    def write(summaries: list[dict], final: bool) -> tuple[dict, str | None]:
        """Write JSON + Markdown (after every case, so a killed run leaves what it did)."""
        target_rows = [] if args.smoke else report.targets(summaries)  # 1 round decides nothing
        meta = {
            "mode": mode,
            "complete": final,
            "date": datetime.date.today().isoformat(),
            "machine": _machine(backend),
            "backend": backend,
            "versions": versions,
            "python": platform.python_version(),
            "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "precision": args.precision,
            "target_sample_s": target_s,
            "skipped": skipped,
            "wall_s": time.perf_counter() - t_start,
            "loadavg_1min_start_end": [load_start, _loadavg()],
        }
        results = {
            "meta": meta,
            "implementations": sorted({impl for s in summaries for impl in s["impls"]}),
            "cases": summaries,
            "targets": target_rows,
            "errors": {f"{s['name']}/{k}": v for s in summaries for k, v in s["errors"].items()},
        }
        with open(base + ".json", "w") as f:
            json.dump(results, f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(report.markdown(meta, summaries, target_rows))
        note = None
        if final:
            title = f"jaxlinear benchmarks ({mode}, {meta['machine']})"
            note = report.plot(summaries, base + ".png", title)
        return results, note

    base = os.path.join(args.out, f"results_{mode}")
    summaries: list[dict] = []
    try:
        for i, case in enumerate(suite):
            elapsed = time.perf_counter() - t_start
            if args.budget_s and elapsed > args.budget_s:
                log(f"note: time budget ({args.budget_s:.0f} s) spent: skipping {case.name} on")
                skipped["cases"] = ", ".join(c.name for c in suite[i:])
                break
            head = f"[{i + 1}/{len(suite)}] {case.name}: {case.label}"
            log(f"{head} {case.dtype}, {case.rounds} rounds ({elapsed:.0f} s so far)")
            jax_names = jax_impls.LAYER_IMPLS if case.kind == "layer" else jax_impls.MLP_IMPLS
            executors = {impl: local for impl in jax_names if impl not in skipped}
            if worker is not None:
                torch_names = (
                    torch_impls.LAYER_IMPLS if case.kind == "layer" else torch_impls.MLP_IMPLS
                )
                executors.update({impl: worker for impl in torch_names})
            res = runner.run_case(case, executors, target_s=target_s, log=log)
            summaries.append(report.summarize(res))
            log(report.format_case(summaries[-1], gpu=args.gpu))
            write(summaries, final=False)
    finally:
        if worker is not None:
            worker.close()

    results, note = write(summaries, final=True)
    log("")
    if args.smoke:
        log("Targets: not evaluated in --smoke mode (one round decides nothing).")
    else:
        log(report.format_targets(results["targets"]))
    if note:
        log(f"note: {note}")
    wall = results["meta"]["wall_s"]
    log(f"wrote {base}.json, .md{'' if note else ', .png'} in {wall:.0f} s")
    if args.gpu and not args.only:  # the quantization recipes' rows (printed, not in the JSON)
        from benchmarks import bench_quant

        log("\nfp8 / int8 recipes against bfloat16 (python -m benchmarks.bench_quant --gpu):")
        bench_quant.main(["--gpu"])
    if results["errors"]:
        log(f"{len(results['errors'])} implementation(s) failed: {', '.join(results['errors'])}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
