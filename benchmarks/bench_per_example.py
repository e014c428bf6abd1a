"""Per-example gradient norms and clipping: jaxlinear against the vmap(grad) path.

``python -m benchmarks.bench_per_example [--smoke] [--rounds R] [--json PATH]``

Cases (float32, CPU unless JAX has another default device):

- ``mlp``: ``n = 128``, MLP 512 → 512 → 512 → 10 (ReLU), per-example softmax
  cross-entropy on 2-D inputs ``(n, 512)``.
- ``seq_T<…>``: the same kind of MLP on inputs ``(n, T, d)``, loss summed over the
  ``T`` positions, once with ``T`` below and once above ``sqrt(d_in·d_out) = d``, so
  both routes of the sequence formula run (``gram`` and ``per_example``; see
  ``jaxlinear._src.per_example.sequence_route``).

Implementations, each ``jax.jit``-ed, all on the same data:

- ``norms``: ``jaxlinear.per_example_grad_norms``;
- ``naive_norms``: ``jax.vmap(jax.grad(loss of one example))``, then the norms;
- ``clipped``: ``jaxlinear.clipped_grad``;
- ``naive_clipped``: the textbook DP-SGD clip from ``vmap(grad)``;
- ``grad``: one plain ``jax.grad`` of the summed loss (the baseline for clipping).

Method: compile and warm up everything first; calibrate each implementation's calls per
sample to about ``--target-s``; then, round by round, take one sample of each in a fresh
random order. Ratios are formed per round and reported as median (min–max). Temp bytes:
``memory_analysis().temp_size_in_bytes`` of each compiled program.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxlinear
from jaxlinear._src.per_example import sequence_route

IMPLS = ("norms", "naive_norms", "clipped", "naive_clipped", "grad")
CLIP_NORM = 1.0


def cases(smoke: bool) -> list[dict]:
    """``name``, ``n``, ``sizes``, ``T`` (None: 2-D inputs)."""
    if smoke:
        return [
            dict(name="mlp", n=8, sizes=[16, 16, 16, 4], T=None),
            dict(name="seq_T2", n=4, sizes=[8, 8, 8, 4], T=2),
            dict(name="seq_T16", n=4, sizes=[8, 8, 8, 4], T=16),
        ]
    return [
        dict(name="mlp", n=128, sizes=[512, 512, 512, 10], T=None),
        dict(name="seq_T16", n=32, sizes=[128, 128, 128, 10], T=16),
        dict(name="seq_T512", n=32, sizes=[128, 128, 128, 10], T=512),
    ]


def build(case: dict):
    """Params, args and the per-example loss of a case."""
    n, sizes, T = case["n"], case["sizes"], case["T"]
    rng = np.random.default_rng(0)
    layers = [
        jaxlinear.Params(
            jnp.asarray(rng.normal(size=(a, b)) * np.sqrt(2.0 / a), jnp.float32),
            jnp.asarray(rng.normal(size=b) * 0.1, jnp.float32),
        )
        for a, b in itertools.pairwise(sizes)
    ]
    lead = (n,) if T is None else (n, T)
    x = jnp.asarray(rng.normal(size=(*lead, sizes[0])), jnp.float32)
    labels = jnp.asarray(rng.integers(0, sizes[-1], size=lead), jnp.int32)

    def loss(layers, x, labels):
        """Softmax cross-entropy per example, summed over positions: ``(n,)``."""
        logits = jaxlinear.mlp(layers, x)  # (n, [T,] classes)
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
        return -picked.reshape(picked.shape[0], -1).sum(axis=1)

    return layers, (x, labels), loss


def impls(loss):
    """The five implementations as functions of ``(layers, x, labels)``."""

    def per_example_grads(layers, *args):
        one = lambda *ex: jax.grad(lambda p: loss(p, *(a[None] for a in ex))[0])(layers)  # noqa: E731
        return jax.vmap(one)(*args)  # every leaf (n, *shape)

    def flat_norms(g):
        n = jax.tree.leaves(g)[0].shape[0]
        return jnp.sqrt(sum(jnp.sum(a.reshape(n, -1) ** 2, axis=1) for a in jax.tree.leaves(g)))

    def naive_clipped(layers, *args):
        g = per_example_grads(layers, *args)
        norms = flat_norms(g)
        c = jnp.minimum(1.0, CLIP_NORM / norms)
        return jax.tree.map(lambda a: jnp.tensordot(c, a, axes=1), g), norms

    return {
        "norms": lambda layers, *a: jaxlinear.per_example_grad_norms(loss, layers, *a),
        "naive_norms": lambda layers, *a: flat_norms(per_example_grads(layers, *a)),
        "clipped": lambda layers, *a: jaxlinear.clipped_grad(loss, layers, *a, clip_norm=CLIP_NORM),
        "naive_clipped": naive_clipped,
        "grad": jax.grad(lambda layers, *a: jnp.sum(loss(layers, *a))),
    }


def _time(fn, reps: int) -> float:
    """Seconds per call over ``reps`` calls (one untimed call first)."""
    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(reps):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / reps


def run_case(case: dict, rounds: int, target_s: float, seed: int) -> dict:
    layers, args, loss = build(case)
    fns, temp, compile_s = {}, {}, {}
    for name, f in impls(loss).items():
        start = time.perf_counter()
        compiled = jax.jit(f).lower(layers, *args).compile()
        compile_s[name] = time.perf_counter() - start
        temp[name] = int(compiled.memory_analysis().temp_size_in_bytes)
        fns[name] = lambda compiled=compiled: compiled(layers, *args)
    # Agreement (float32): the same norms on both paths.
    norms, naive = np.asarray(fns["norms"]()), np.asarray(fns["naive_norms"]())
    rel_err = float(np.max(np.abs(norms - naive) / np.maximum(np.abs(naive), 1e-30)))
    reps = {name: max(1, round(target_s / max(_time(f, 1), 1e-6))) for name, f in fns.items()}
    samples = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            samples[name].append(_time(fns[name], reps[name]))

    def ratio(a, b):
        r = [x / y for x, y in zip(samples[a], samples[b], strict=True)]
        return {"median": statistics.median(r), "min": min(r), "max": max(r)}

    d = case["sizes"]
    T = case["T"] or 1
    return {
        "case": case,
        "routes": [sequence_route(T, a, b) for a, b in itertools.pairwise(d)],
        "median_s": {name: statistics.median(s) for name, s in samples.items()},
        "samples_s": samples,
        "reps": reps,
        "compile_s": compile_s,
        "temp_bytes": temp,
        "norms_rel_err_vs_naive": rel_err,
        "ratios": {
            "norms / naive_norms": ratio("norms", "naive_norms"),
            "clipped / grad": ratio("clipped", "grad"),
            "clipped / naive_clipped": ratio("clipped", "naive_clipped"),
        },
    }


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} µs"


def _fmt_b(b: int) -> str:
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB"


def report(results: list[dict]) -> str:
    lines = [
        "| case | routes | norms | vmap(grad)+norms | clipped_grad | vmap(grad) clip | jax.grad |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c, m = r["case"], r["median_s"]
        shape = (
            f"({c['n']}, {c['sizes'][0]})"
            if c["T"] is None
            else (f"({c['n']}, {c['T']}, {c['sizes'][0]})")
        )
        lines.append(
            f"| {c['name']} {shape}, {'→'.join(map(str, c['sizes']))} | {', '.join(r['routes'])} | "
            + " | ".join(_fmt_s(m[k]) for k in IMPLS)
            + " |"
        )
    lines += [
        "",
        "| case | norms ÷ naive (speed-up) | clipped ÷ grad | temp bytes: norms / clipped /"
        " grad / naive (clipped ÷ grad) | max rel. diff of norms vs naive |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        q, t = r["ratios"], r["temp_bytes"]
        nn, cg = q["norms / naive_norms"], q["clipped / grad"]
        lines.append(
            f"| {r['case']['name']} | {nn['median']:.3f} ({nn['min']:.3f}–{nn['max']:.3f});"
            f" {1 / nn['median']:.1f}× faster"
            f" | {cg['median']:.3f} ({cg['min']:.3f}–{cg['max']:.3f})"
            f" | {_fmt_b(t['norms'])} / {_fmt_b(t['clipped'])} / {_fmt_b(t['grad'])} /"
            f" {_fmt_b(t['naive_clipped'])} ({t['clipped'] / max(t['grad'], 1):.2f}×)"
            f" | {r['norms_rel_err_vs_naive']:.1e} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_per_example", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one round")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 30; smoke 1)")
    p.add_argument("--target-s", type=float, default=None, help="seconds per sample (0.03)")
    p.add_argument("--only", default="", help="comma-separated case names")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    rounds = a.rounds or (1 if a.smoke else 30)
    target_s = a.target_s or (0.001 if a.smoke else 0.03)
    selected = [c for c in cases(a.smoke) if not a.only or c["name"] in a.only.split(",")]
    start, load0 = time.time(), os.getloadavg()[0]
    results = []
    for i, case in enumerate(selected):
        results.append(run_case(case, rounds, target_s, seed=i))
        print(f"  {case['name']}: done ({time.time() - start:.0f} s)", file=sys.stderr)
    meta = {
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "rounds": rounds,
        "load_avg_1min": [load0, os.getloadavg()[0]],
        "seconds": time.time() - start,
    }
    out = {"meta": meta, "cases": results}
    print(report(results))
    print(
        f"\njax {meta['jax']}, {meta['device']}, {meta['cpus']} CPUs, {rounds} rounds,"
        f" 1-min load average {load0:.1f} → {meta['load_avg_1min'][1]:.1f},"
        f" {meta['seconds']:.0f} s"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
