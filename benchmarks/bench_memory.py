"""``python -m benchmarks.bench_memory``: memory and time of an MLP step, by residual policy.

One training step (forward, mean-squared-error loss, backward, SGD update; the step of
``benchmarks.jax_impls``) of a 2-layer ReLU MLP, float32 and bfloat16 (float32 params and
data, bfloat16 matmul operands with float32 accumulation), for:

- ``linear (exact)``: ``jaxlinear.linear``, residuals ``x`` and ``W`` as given (float32);
- ``linear (compute)``: ``residuals="compute"``: their bfloat16 copies (the forward's casts);
- ``plain``: ``x @ W + b`` under JAX's own autodiff;
- ``flax nnx``: ``flax.nnx.Linear(param_dtype=float32, dtype=bfloat16)``.

Memory is XLA's own accounting of the compiled step (``compiled.memory_analysis()``):
``temp`` (scratch, residuals included) and ``peak = arguments + outputs + temp - aliased``.
``residuals`` are the arrays the forward pass keeps for the backward pass
(``saved_residuals``), and how many of them are new (not arguments, which live anyway).
Time: interleaved rounds (every implementation once per round, in rotating order),
median seconds per step and the ratio to plain JAX AD in the same run.

Modes: (default) two shapes, 9 rounds (about 2-4 minutes on 2 busy cores);
``--smoke``: one tiny shape, one round (the tests). ``--out DIR`` writes
``memory_<mode>.json`` and ``memory_<mode>.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxlinear
from benchmarks.cases import Case, make_data
from benchmarks.jax_impls import _mlp_plain, _train_step, program_fingerprint, residuals

IMPLS = ("linear (exact)", "linear (compute)", "plain", "flax nnx")
SHAPES = {  # name: (leading axes of x, layer sizes)
    "2d": ((2048,), (512, 2048, 512)),
    "3d": ((8, 256), (512, 1536, 512)),
}
SMOKE_SHAPES = {"smoke": ((8,), (16, 32, 16))}


def _mlp_jaxlinear(policy: str, cd, layers):
    params = [jaxlinear.Params(W, b) for W, b in layers]

    def layer(p, x, **kw):
        return jaxlinear.linear(p, x, residuals=policy, **kw)

    return (lambda ps, x: jaxlinear.mlp(ps, x, layer=layer, compute_dtype=cd)), params


def _mlp_nnx(cd, layers):
    """Flax NNX ``Linear`` layers as users write them, applied through ``split``/``merge``."""
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self):
            for i, (W, b) in enumerate(layers):
                d_in, d_out = W.shape
                lin = nnx.Linear(
                    d_in,
                    d_out,
                    dtype=cd or jnp.float32,
                    param_dtype=jnp.float32,
                    rngs=nnx.Rngs(i),
                )
                lin.kernel.value, lin.bias.value = W, b
                setattr(self, f"layer{i}", lin)

        def __call__(self, x):
            for i in range(len(layers)):
                x = getattr(self, f"layer{i}")(x)
                if i < len(layers) - 1:
                    x = jax.nn.relu(x)
            return x

    graphdef, state = nnx.split(MLP())
    return (lambda state, x: nnx.merge(graphdef, state)(x)), state


def build(impl: str, case: Case, layers):
    """``(apply, params)`` of ``impl`` for ``case``."""
    cd = None if case.dtype == "float32" else jnp.dtype(case.dtype)
    if impl.startswith("linear"):
        return _mlp_jaxlinear(impl.split("(")[1].rstrip(")"), cd, layers)
    if impl == "plain":
        return _mlp_plain(case, layers)
    return _mlp_nnx(cd, layers)


def measure(case: Case, impls=IMPLS, rounds: int = 9) -> dict:
    """Compile every ``impl``'s step on ``case``; memory from XLA, time interleaved."""
    data = make_data(case, 0)
    x, target = jnp.asarray(data["x"]), jnp.asarray(data["target"])
    layers = [(jnp.asarray(W), jnp.asarray(b)) for W, b in data["layers"]]
    out, calls = {}, {}
    for impl in impls:
        apply, params = build(impl, case, layers)
        step = _train_step(apply)
        compiled = step.lower(params, x, target).compile()
        m = compiled.memory_analysis()
        res = residuals(apply, params, x)
        out[impl] = {
            "temp_bytes": m.temp_size_in_bytes,
            "peak_bytes": m.argument_size_in_bytes
            + m.output_size_in_bytes
            + m.temp_size_in_bytes
            - m.alias_size_in_bytes,
            "residual_bytes": res["residual_bytes"],
            "residual_bytes_new": res["residual_bytes_new"],
            "residuals": res["residuals"],
            "hlo_hash": program_fingerprint(compiled.as_text()),
            "samples_s": [],
        }
        calls[impl] = lambda step=step, params=params: jax.block_until_ready(
            step(params, x, target)
        )
        calls[impl]()  # warm up
    for r in range(rounds):
        order = list(impls[r % len(impls) :]) + list(impls[: r % len(impls)])
        for impl in order:
            t0 = time.perf_counter()
            calls[impl]()
            out[impl]["samples_s"].append(time.perf_counter() - t0)
    for d in out.values():
        d["median_s"] = statistics.median(d["samples_s"])
    for d in out.values():
        d["time_vs_plain"] = d["median_s"] / out["plain"]["median_s"] if "plain" in out else None
    return out


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def table(results: dict) -> str:
    """Markdown: one row per (shape, dtype, implementation)."""
    lines = [
        "| shape | dtype | implementation | temp MiB | peak MiB | residuals MiB (new) |"
        " median ms | time / plain | same program as |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, impls in results.items():
        shape, dtype = key.rsplit(" ", 1)
        hashes = {}
        for impl, d in impls.items():
            same = hashes.get(d["hlo_hash"], "")
            hashes.setdefault(d["hlo_hash"], impl)
            lines.append(
                f"| {shape} | {dtype} | {impl} | {_mib(d['temp_bytes'])} |"
                f" {_mib(d['peak_bytes'])} | {_mib(d['residual_bytes'])}"
                f" ({_mib(d['residual_bytes_new'])}) | {1e3 * d['median_s']:.1f} |"
                f" {d['time_vs_plain'] or float('nan'):.2f} | {same} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_memory", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="one tiny shape, one round")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--out", default=None, help="folder for memory_<mode>.json/.md")
    args = p.parse_args(argv)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    rounds = 1 if args.smoke else args.rounds
    devices = jax.devices()
    print(f"jax {jax.__version__}, {devices[0].platform} ({len(devices)} device(s))")
    results = {}
    for (name, (batch, sizes)), dtype in itertools.product(shapes.items(), ("float32", "bfloat16")):
        case = Case(f"mlp-{name}", "mlp", batch, sizes, dtype, rounds)
        t0 = time.perf_counter()
        shape = f"x {'×'.join(map(str, batch))}, {'→'.join(map(str, sizes))}"
        results[f"{shape} {dtype}"] = measure(case, rounds=rounds)
        print(f"  {name} {dtype}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    text = table(results)
    print(text)
    if args.out:
        mode = "smoke" if args.smoke else "cpu"
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"memory_{mode}.json"), "w") as f:
            json.dump(results, f, indent=1, default=lambda o: np.asarray(o).tolist())
        with open(os.path.join(args.out, f"memory_{mode}.md"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
