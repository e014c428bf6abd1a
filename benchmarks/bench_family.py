"""``python -m benchmarks.bench_family``: the family's ops, forward + backward, against JAX AD.

Each benchmark is one function returning table rows; ``BENCHES`` lists them (add yours
there: a new op's benchmark is a new function, not an edit of another's). Timings are
medians over interleaved rounds (every implementation once per round, in turn), so
machine load hits them alike; the ratio is to JAX's AD of the plain op in the same run.

Options: ``--smoke`` (tiny shapes, 2 rounds: checks that everything runs),
``--only NAME[,NAME]``, ``--rounds N``; ``--vmap`` runs ``benchmarks.bench_vmap`` (the
family under ``jax.vmap``) with the other options.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxlinear


def _loss(y):
    return jnp.sum(y * y) * 0.5


def _timed(fn, args):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def _dots(fn, args):
    """The number of dot/convolution instructions in the optimized HLO (where XLA differs)."""
    hlo = fn.lower(*args).compile().as_text()
    return len(re.findall(r"\s(dot|convolution)\(", hlo))


def bench_einsum_projection(smoke=False, rounds=15):
    """Attention projection ``"btd,dhk->bthk"``: grad in x and W of ``½‖y‖²``, float32."""
    sizes = [(2, 8, 16, 2, 8)] if smoke else [(8, 128, 256, 8, 32), (4, 512, 512, 8, 64)]
    spec = "btd,dhk->bthk"
    rows = []
    for b, t, d, h, k in sizes:
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
        W = jnp.asarray(rng.standard_normal((d, h, k)) / np.sqrt(d), jnp.float32)

        def grad_of(einsum):
            return jax.jit(jax.grad(lambda a, w: _loss(einsum(spec, a, w)), (0, 1)))

        impls = {
            "JAX AD (jnp.einsum)": grad_of(jnp.einsum),
            "jaxlinear.einsum": grad_of(jaxlinear.einsum),
            "jaxlinear.dual_einsum": grad_of(jaxlinear.dual_einsum),
        }
        args = {name: (x, W) for name in impls}
        try:
            from flax import nnx

            for label, op in (("Flax nnx.Einsum", jnp.einsum), ("nnx.Einsum+jaxlinear", None)):
                module = nnx.Einsum(
                    spec, (d, h, k), rngs=nnx.Rngs(0), einsum_op=op or jaxlinear.einsum
                )
                graphdef, state = nnx.split(module)

                def step(state, x, graphdef=graphdef):
                    return jax.grad(lambda s, x: _loss(nnx.merge(graphdef, s)(x)), (0, 1))(state, x)

                impls[label] = jax.jit(step)
                args[label] = (state, x)
        except ImportError:
            print("flax not installed: skipping the Flax rows")
        base = "JAX AD (jnp.einsum)"
        medians, ratios = _interleaved_ratios(impls, args, 2 if smoke else rounds, base)
        size = f"x ({b},{t},{d}), W ({d},{h},{k})"
        rows += _rows("einsum_projection", size, impls, args, medians, ratios)
    return rows


def _interleaved_ratios(impls, args, rounds, base, seed=0):
    """Medians of seconds per call and of the per-round ratio to ``impls[base]``.

    Every round times each implementation once, in a fresh random order; a ratio is formed
    within one round, so load from other processes moves numerator and denominator alike.
    """
    import random

    for name, fn in impls.items():  # compile and warm up
        jax.block_until_ready(fn(*args[name]))
    order, rng = list(impls), random.Random(seed)
    samples = {name: [] for name in impls}
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            samples[name].append(_timed(impls[name], args[name]))
    ratios = {
        name: statistics.median(a / b for a, b in zip(s, samples[base], strict=True))
        for name, s in samples.items()
    }
    return {name: statistics.median(s) for name, s in samples.items()}, ratios


def _rows(bench, size, impls, args, medians, ratios):
    """Table rows: bench, size, implementation, median ms, ratio to the base, dots/convs."""
    return [
        (
            bench,
            size,
            name,
            f"{medians[name] * 1e3:.3f}",
            f"{ratios[name]:.3f}×",
            str(_dots(fn, args[name])),
        )
        for name, fn in impls.items()
    ]


def bench_conv(smoke=False, rounds=15, flax=True):
    """3×3 conv, 64 -> 64 channels, NHWC, stride 1, "SAME": grad in x and W of ``½‖y‖²``.

    ``flax=False`` leaves out the two Flax ``nnx.Conv`` rows.
    """
    sizes = [(2, 8, 8, 8)] if smoke else [(8, 32, 32, 64), (32, 16, 16, 64), (2, 64, 64, 64)]
    dn = ("NHWC", "HWIO", "NHWC")
    rows = []
    for n, h, w, c in sizes:
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
        W = jnp.asarray(rng.standard_normal((3, 3, c, c)) / np.sqrt(9 * c), jnp.float32)

        def grad_of(conv):
            def loss(a, k):
                return _loss(conv(a, k, (1, 1), "SAME", dimension_numbers=dn))

            return jax.jit(jax.grad(loss, (0, 1)))

        impls = {
            "JAX AD (lax.conv_general_dilated)": grad_of(jax.lax.conv_general_dilated),
            "jaxlinear.conv_general_dilated": grad_of(jaxlinear.conv_general_dilated),
            "jaxlinear.dual_conv_general_dilated": grad_of(jaxlinear.dual_conv_general_dilated),
        }
        args = {name: (x, W) for name in impls}
        try:
            if not flax:
                raise ImportError
            from flax import nnx

            for label, op in (("Flax nnx.Conv", None), ("nnx.Conv+jaxlinear", jaxlinear)):
                kw = {} if op is None else {"conv_general_dilated": op.conv_general_dilated}
                module = nnx.Conv(c, c, (3, 3), use_bias=False, rngs=nnx.Rngs(0), **kw)
                graphdef, state = nnx.split(module)

                def step(state, x, graphdef=graphdef):
                    return jax.grad(lambda s, x: _loss(nnx.merge(graphdef, s)(x)), (0, 1))(state, x)

                impls[label] = jax.jit(step)
                args[label] = (state, x)
        except ImportError:
            print("flax not installed or not asked for: skipping the Flax rows")
        base = "JAX AD (lax.conv_general_dilated)"
        medians, ratios = _interleaved_ratios(impls, args, 2 if smoke else rounds, base)
        size = f"x ({n},{h},{w},{c}), W (3,3,{c},{c})"
        rows += _rows("conv", size, impls, args, medians, ratios)
    return rows


BENCHES = {"einsum_projection": bench_einsum_projection, "conv": bench_conv}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--vmap" in argv:
        from benchmarks import bench_vmap

        return bench_vmap.main([a for a in argv if a != "--vmap"])
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_family", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 rounds")
    p.add_argument("--only", default="", help="comma-separated benchmark names")
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args(argv)
    names = [n for n in a.only.split(",") if n] or list(BENCHES)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; medians of interleaved rounds")
    print("| bench | shape | implementation | ms (fwd+bwd) | vs JAX AD | dots in HLO |")
    print("|---|---|---|---|---|---|")
    for name in names:
        for row in BENCHES[name](smoke=a.smoke, rounds=a.rounds):
            print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
