"""``python -m benchmarks.bench_quant``: the fp8 and int8 recipes, forward + backward.

On a CPU (the default) it reports numerics only: the relative error ``‖a − â‖ / ‖a‖`` of
``y``, ``x̄`` and ``w̄`` for each recipe against float32 at the highest precision, for a
dense layer and a stack of three 3×3 convolutions (XLA:CPU runs fp8 and int8 products
but has no fast kernels for them: a CPU timing says nothing about an accelerator).

``--gpu`` adds timings: ``jit(grad)`` of ``½‖y‖²`` (one forward, two backward products per
layer), each recipe against bfloat16 (``compute_dtype``, float32 accumulation), at
4096² and 8192² (dense, ``m = n = k``) and on the convolution stack at ResNet sizes;
interleaved rounds, medians, TFLOP/s (``6·m·n·k`` per dense fwd+bwd) and the ratio to
bfloat16. Not yet run on a GPU (no device was lent to the round that wrote it).

Options: ``--gpu``, ``--smoke`` (tiny shapes, 2 rounds), ``--rounds N``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import jaxlinear

RECIPES = ("fp8_hybrid", "fp8_rowwise", "int8")


def _loss(y):
    return 0.5 * jnp.sum(jnp.square(y.astype(jnp.float32)))


def _dense(params, x, **kw):
    return jaxlinear.linear(params, x, **kw)


def _conv_stack(params, x, **kw):
    for p in params:
        x = jax.nn.relu(jaxlinear.conv(p, x, **kw))
    return x


def _case(kind, size, seed=0):
    """``(model, params, x, flops of one fwd+bwd)``."""
    k = jax.random.split(jax.random.key(seed), 4)
    if kind == "dense":
        n = size
        params = jaxlinear.init(k[0], n, n)
        x = jax.random.normal(k[1], (n, n), jnp.float32)
        return _dense, params, x, 6.0 * n**3
    n, hw, c = size  # examples, height = width, channels
    params = [jaxlinear.init_conv(k[i], (3, 3), c, c) for i in range(3)]
    x = jax.random.normal(k[3], (n, hw, hw, c), jnp.float32)
    return _conv_stack, params, x, 3 * 6.0 * n * hw * hw * c * c * 9


def _grad_fn(model, **kw):
    return jax.jit(jax.value_and_grad(lambda p, x: _loss(model(p, x, **kw)), (0, 1)))


def numerics(kind, size):
    """Rows ``(case, recipe, rel. error y, x̄, w̄)`` against float32 at highest precision."""
    model, params, x, _ = _case(kind, size)
    with jax.default_matmul_precision("highest"):
        ref_y = jax.jit(model)(params, x)
        _, (ref_p, ref_x) = _grad_fn(model)(params, x)
    rel = lambda a, b: float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))  # noqa: E731
    rows = []
    for r in RECIPES:
        y = jax.jit(lambda p, x, r=r: model(p, x, quant=r))(params, x)
        _, (gp, gx) = _grad_fn(model, quant=r)(params, x)
        w_err = max(
            rel(a, b)
            for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(ref_p), strict=True)
            if a.ndim > 1
        )
        rows.append((f"{kind} {size}", r, rel(y, ref_y), rel(gx, ref_x), w_err))
    return rows


def timings(kind, size, rounds):
    """Rows ``(case, impl, median ms, TFLOP/s, ratio to bf16)``, interleaved rounds."""
    model, params, x, flops = _case(kind, size)
    impls = {"bfloat16": _grad_fn(model, compute_dtype=jnp.bfloat16)}
    impls.update({r: _grad_fn(model, quant=r) for r in RECIPES})
    for f in impls.values():
        jax.block_until_ready(f(params, x))  # compile
    times = {k: [] for k in impls}
    for _ in range(rounds):
        for k, f in impls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(params, x))
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return [
        (f"{kind} {size}", k, 1e3 * t, flops / t / 1e12, med["bfloat16"] / t)
        for k, t in med.items()
    ]


def _table(head, rows, fmt):
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(f.format(v) for f, v in zip(fmt, r, strict=True)) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="also time, at accelerator sizes")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 rounds")
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args(argv)
    if args.smoke:
        cases, rounds = [("dense", 64), ("conv", (2, 8, 8))], 2
    elif args.gpu:
        cases, rounds = [("dense", 4096), ("dense", 8192), ("conv", (32, 56, 64))], args.rounds
    else:
        cases, rounds = [("dense", 512), ("conv", (8, 16, 32))], args.rounds
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    rows = [r for kind, size in cases for r in numerics(kind, size)]
    _table(
        ["case", "recipe", "rel. err y", "rel. err x̄", "rel. err w̄"],
        rows,
        ["{}", "{}", "{:.2e}", "{:.2e}", "{:.2e}"],
    )
    if args.gpu or args.smoke:
        rows = [r for kind, size in cases for r in timings(kind, size, rounds)]
        print()
        _table(
            ["case", "impl", "median ms", "TFLOP/s", "× bf16 speed"],
            rows,
            ["{}", "{}", "{:.3f}", "{:.1f}", "{:.2f}"],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
