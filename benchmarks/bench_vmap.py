"""``python -m benchmarks.bench_vmap``: the family under ``jax.vmap``, against JAX AD and Equinox.

Equinox models (and much functional JAX) are written per example and run under
``jax.vmap``, often with a second ``vmap`` inside. Three tables, every time a median of
interleaved rounds (each implementation once per round, in a fresh order) and every ratio
formed within a round against JAX's AD of the same program (``jax.jit(jax.grad(...))``
of ``½‖y‖²``, float32):

1. ``grid``: each op (dense, ``dot_general``, ``einsum``, conv, ``conv_transpose``,
   embedding) in both bindings, under ``vmap`` over ``x`` (one level, and two levels
   over the same examples split 4 × 8), over ``w`` only, over both, and ``vmap`` of
   ``grad`` (per-example gradients), against JAX's AD of the plain ``lax``/``jnp`` op.
2. ``equinox``: Equinox layers (``Linear``, ``Embedding``, ``Conv2d``,
   ``ConvTranspose2d``) vmapped as an Equinox user does, against the same layers after
   ``jaxlinear.equinox.explicit`` (default binding and both bindings).
3. ``models``: a ViT in the style of Equinox's ``vision_transformer`` example and a
   transformer language model with ``eqx.nn.Embedding``, per example under ``vmap``.

Before timing, each implementation's gradient is checked against the first one's
(1e-3 relative, float32), so a wrong route cannot report a fast number. Wall and CPU
time (of this process, all threads) are both reported: on a shared machine the CPU time
moves less.

Options: ``--smoke`` (tiny shapes, 2 rounds), ``--only grid,equinox,models``,
``--rounds N``. ``python -m benchmarks.bench_family --vmap`` runs this module.
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxlinear

BASE = "JAX AD"


def _half_sq(y):
    return 0.5 * jnp.sum(jnp.square(y.astype(jnp.float32)))


def _check(impls, args, base):
    """Every implementation's result equals ``impls[base]``'s (1e-3 of its largest entry)."""
    want = jax.tree.leaves(impls[base](*args[base]))
    for name, fn in impls.items():
        got = jax.tree.leaves(fn(*args[name]))
        for a, b in zip(got, want, strict=True):
            scale = float(jnp.max(jnp.abs(b))) or 1.0
            err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
            if err > 1e-3 * scale:
                raise AssertionError(f"bench_vmap: {name} differs from {base}: {err} / {scale}")


def _time(impls, args, rounds, base=BASE):
    """Medians of (wall ms, CPU ms) per call and of the per-round ratios to ``base``.

    The CPU time is this process's (every thread's) ``time.process_time``: on a machine
    shared with other work it moves less than the wall time, which also counts waiting.
    """
    _check(impls, args, base)
    for name, fn in impls.items():  # compile and warm up
        jax.block_until_ready(fn(*args[name]))
    order, rng = list(impls), random.Random(0)
    wall, cpu = ({k: [] for k in impls} for _ in range(2))
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(impls[name](*args[name]))
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)

    def ratio(s, name):
        return statistics.median(a / b for a, b in zip(s[name], s[base], strict=True))

    return {
        k: (
            1e3 * statistics.median(wall[k]),
            ratio(wall, k),
            1e3 * statistics.median(cpu[k]),
            ratio(cpu, k),
        )
        for k in impls
    }


# --- 1. the op grid ---------------------------------------------------------------------


def _ops(smoke):
    """name -> (plain op, custom_vjp op, dual op, one example's x, w, make x); ``op(x, w)``."""
    s = 4 if smoke else 1  # smoke: every size divided by 4
    dn = ("NHWC", "HWIO", "NHWC")

    def conv(f):
        return lambda x, w: f(x[None], w, (1, 1), "SAME", dimension_numbers=dn)[0]

    def conv_t(f):
        return lambda x, w: f(x[None], w, (2, 2), "SAME", dimension_numbers=dn)[0]

    dims = (((2,), (0,)), ((0,), (1,)))  # heads batched: x (h, t, d), w (d, h, k)
    P = jaxlinear.Params
    return {
        "dense": (
            lambda x, w: x @ w[0] + w[1, 0],
            lambda x, w: jaxlinear.linear(P(w[0], w[1, 0]), x),
            lambda x, w: jaxlinear.dual_linear(P(w[0], w[1, 0]), x),
            (64 // s, 128 // s),
            (2, 128 // s, 256 // s),  # W = w[0], b = w[1, 0] (one array: one vmapped leaf)
            None,
        ),
        "dot_general": (
            lambda x, w: lax.dot_general(x, w, dims),
            lambda x, w: jaxlinear.dot_general(x, w, dims),
            lambda x, w: jaxlinear.dual_dot_general(x, w, dims),
            (4, 64 // s, 64 // s),
            (64 // s, 4, 64 // s),
            None,
        ),
        "einsum": (
            functools.partial(jnp.einsum, "td,dhk->thk"),
            functools.partial(jaxlinear.einsum, "td,dhk->thk"),
            functools.partial(jaxlinear.dual_einsum, "td,dhk->thk"),
            (64 // s, 128 // s),
            (128 // s, 4, 32 // s),
            None,
        ),
        "conv": (
            conv(lax.conv_general_dilated),
            conv(jaxlinear.conv_general_dilated),
            conv(jaxlinear.dual_conv_general_dilated),
            (16 // s, 16 // s, 32 // s),
            (3, 3, 32 // s, 64 // s),
            None,
        ),
        "conv_transpose": (
            conv_t(lax.conv_transpose),
            conv_t(jaxlinear.conv_transpose),
            conv_t(jaxlinear.dual_conv_transpose),
            (8 // s, 8 // s, 32 // s),
            (3, 3, 32 // s, 32 // s),
            None,
        ),
        "embed": (
            lambda ids, t: t[ids],
            lambda ids, t: jaxlinear.embed(t, ids),
            lambda ids, t: jaxlinear.dual_embed(t, ids),
            (64 // s,),
            (512 // s, 128 // s),
            lambda key, shape: jax.random.randint(key, shape, 0, 512 // s),
        ),
    }


# pattern -> (x batch shape, w batch shape, levels of vmap, vmap of grad)
PATTERNS = {
    "grad∘vmap, x": ((32,), (), 1, False),
    "grad∘vmap∘vmap, x": ((4, 8), (), 2, False),
    "grad∘vmap, w": ((), (8,), 1, False),
    "grad∘vmap, x and w": ((8,), (8,), 1, False),
    "vmap∘grad, x": ((32,), (), 1, True),
}


def _program(op, pattern, differentiable_x):
    x_batch, w_batch, levels, per_example = PATTERNS[pattern]
    axes = (0 if x_batch else None, 0 if w_batch else None)
    argnums = (0, 1) if differentiable_x else (1,)
    if per_example:  # per-example gradients: vmap of grad
        return jax.jit(jax.vmap(jax.grad(lambda x, w: _half_sq(op(x, w)), argnums), axes))
    f = op
    for _ in range(levels):
        f = jax.vmap(f, axes)
    return jax.jit(jax.grad(lambda x, w: _half_sq(f(x, w)), argnums))


def bench_grid(smoke=False, rounds=7):
    rows = []
    key = jax.random.key(0)
    for name, (plain, cv, dual, x_shape, w_shape, make_x) in _ops(smoke).items():
        for pattern, (x_batch, w_batch, _, _) in PATTERNS.items():
            kx, kw = jax.random.split(jax.random.fold_in(key, len(rows)))
            shape = (*x_batch, *x_shape)
            x = make_x(kx, shape) if make_x else jax.random.normal(kx, shape, jnp.float32)
            w = jax.random.normal(kw, (*w_batch, *w_shape), jnp.float32) / np.sqrt(w_shape[-2])
            impls = {
                BASE: _program(plain, pattern, make_x is None),
                "custom_vjp": _program(cv, pattern, make_x is None),
                "dual": _program(dual, pattern, make_x is None),
            }
            args = {k: (x, w) for k in impls}
            times = _time(impls, args, rounds)
            rows += [(name, pattern, k, *times[k]) for k in impls]
    return rows


# --- 2. Equinox layers, as an Equinox user runs them ----------------------------------------


def _eqx_layers(smoke):
    import equinox as eqx

    s = 4 if smoke else 1
    k = jax.random.key(1)
    ids = jax.random.randint(k, (32 // s, 64 // s), 0, 512 // s)
    return {  # name: (layer, inputs, levels of vmap)
        f"Linear({128 // s}, {256 // s}), vmap∘vmap over ({32 // s}, {64 // s})": (
            eqx.nn.Linear(128 // s, 256 // s, key=k),
            jax.random.normal(k, (32 // s, 64 // s, 128 // s)),
            2,
        ),
        f"Embedding({512 // s}, {128 // s}), vmap∘vmap over ({32 // s}, {64 // s}) ids": (
            eqx.nn.Embedding(512 // s, 128 // s, key=k),
            ids,
            2,
        ),
        f"Conv2d({32 // s}, {64 // s}, 3), vmap over {32 // s} images {16 // s}×{16 // s}": (
            eqx.nn.Conv2d(32 // s, 64 // s, 3, padding=1, key=k),
            jax.random.normal(k, (32 // s, 32 // s, 16 // s, 16 // s)),
            1,
        ),
        f"ConvTranspose2d({32 // s}, {32 // s}, 3, stride 2), vmap over {32 // s}": (
            eqx.nn.ConvTranspose2d(32 // s, 32 // s, 3, stride=2, key=k),
            jax.random.normal(k, (32 // s, 32 // s, 8 // s, 8 // s)),
            1,
        ),
    }


def _eqx_grad(levels):
    import equinox as eqx

    def loss(model, x):
        f = model
        for _ in range(levels):
            f = jax.vmap(f)
        return _half_sq(f(x))

    return eqx.filter_jit(eqx.filter_grad(loss))


def _explicit_impls(model):
    from jaxlinear import equinox as jle

    return {
        BASE + " (Equinox)": model,
        "explicit(m) (default)": jle.explicit(model),
        "explicit(m, binding='custom_vjp')": jle.explicit(model, binding="custom_vjp"),
        "explicit(m, binding='dual')": jle.explicit(model, binding="dual"),
    }


def bench_equinox(smoke=False, rounds=7):
    rows = []
    for name, (layer, x, levels) in _eqx_layers(smoke).items():
        models = _explicit_impls(layer)
        grad = _eqx_grad(levels)
        impls = {k: grad for k in models}
        args = {k: (m, x) for k, m in models.items()}
        times = _time(impls, args, rounds, BASE + " (Equinox)")
        rows += [(name, "", k, *times[k]) for k in impls]
    return rows


# --- 3. Equinox models ----------------------------------------------------------------------


def _models(smoke):
    """A ViT (Equinox's ``vision_transformer`` example's structure, inference mode) and a
    transformer language model with ``eqx.nn.Embedding``; both take one example."""
    import equinox as eqx

    class Block(eqx.Module):
        norm1: eqx.nn.LayerNorm
        norm2: eqx.nn.LayerNorm
        attention: eqx.nn.MultiheadAttention
        linear1: eqx.nn.Linear
        linear2: eqx.nn.Linear

        def __init__(self, d, hidden, heads, key):
            k1, k2, k3 = jax.random.split(key, 3)
            self.norm1, self.norm2 = eqx.nn.LayerNorm(d), eqx.nn.LayerNorm(d)
            self.attention = eqx.nn.MultiheadAttention(heads, d, key=k1)
            self.linear1 = eqx.nn.Linear(d, hidden, key=k2)
            self.linear2 = eqx.nn.Linear(hidden, d, key=k3)

        def __call__(self, x):  # (T, d) -> (T, d)
            h = jax.vmap(self.norm1)(x)
            x = x + self.attention(h, h, h)
            h = jax.nn.gelu(jax.vmap(self.linear1)(jax.vmap(self.norm2)(x)))
            return x + jax.vmap(self.linear2)(h)

    class ViT(eqx.Module):
        patch: eqx.nn.Linear
        pos: jax.Array
        cls: jax.Array
        blocks: list
        norm: eqx.nn.LayerNorm
        head: eqx.nn.Linear
        p: int = eqx.field(static=True)

        def __init__(self, d, hidden, heads, layers, p, patches, channels, classes, key):
            k1, k2, k3, k4, k5 = jax.random.split(key, 5)
            self.p = p
            self.patch = eqx.nn.Linear(p * p * channels, d, key=k1)
            self.pos = jax.random.normal(k2, (patches + 1, d))
            self.cls = jax.random.normal(k3, (1, d))
            self.blocks = [Block(d, hidden, heads, k) for k in jax.random.split(k4, layers)]
            self.norm, self.head = eqx.nn.LayerNorm(d), eqx.nn.Linear(d, classes, key=k5)

        def __call__(self, image):  # (c, h, w) -> (classes,)
            c, h, w = image.shape
            x = image.reshape(c, h // self.p, self.p, w // self.p, self.p)
            x = x.transpose(1, 3, 0, 2, 4).reshape((h // self.p) * (w // self.p), -1)
            x = jnp.concatenate([self.cls, jax.vmap(self.patch)(x)]) + self.pos
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x[0]))

    class LM(eqx.Module):
        embed: eqx.nn.Embedding
        pos: jax.Array
        blocks: list
        norm: eqx.nn.LayerNorm
        head: eqx.nn.Linear

        def __init__(self, vocab, d, hidden, heads, layers, seq, key):
            k1, k2, k3, k4 = jax.random.split(key, 4)
            self.embed = eqx.nn.Embedding(vocab, d, key=k1)
            self.pos = jax.random.normal(k2, (seq, d))
            self.blocks = [Block(d, hidden, heads, k) for k in jax.random.split(k3, layers)]
            self.norm, self.head = eqx.nn.LayerNorm(d), eqx.nn.Linear(d, vocab, key=k4)

        def __call__(self, ids):  # (T,) -> (T, vocab)
            x = jax.vmap(self.embed)(ids) + self.pos
            for block in self.blocks:
                x = block(x)
            return jax.vmap(self.head)(jax.vmap(self.norm)(x))

    s = 4 if smoke else 1
    n, d, key = 32 // s, 128 // s, jax.random.key(2)
    vit = ViT(d, 2 * d, 4, 2, 4, 64, 3, 10, key)
    lm = LM(512 // s, d, 2 * d, 4, 2, 64 // s, key)
    images = jax.random.normal(key, (n, 3, 32, 32))
    ids = jax.random.randint(key, (n, 64 // s), 0, 512 // s)
    return {
        f"ViT (Equinox example style): d={d}, 64 patches, 2 blocks, n={n}": (vit, images),
        f"Transformer LM with Embedding: V={512 // s}, d={d}, T={64 // s}, 2 blocks, n={n}": (
            lm,
            ids,
        ),
    }


def bench_models(smoke=False, rounds=7):
    rows = []
    for name, (model, x) in _models(smoke).items():
        models = _explicit_impls(model)
        grad = _eqx_grad(1)
        impls = {k: grad for k in models}
        args = {k: (m, x) for k, m in models.items()}
        times = _time(impls, args, rounds, BASE + " (Equinox)")
        rows += [(name, "", k, *times[k]) for k in impls]
    return rows


BENCHES = {"grid": bench_grid, "equinox": bench_equinox, "models": bench_models}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_vmap", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 rounds")
    p.add_argument("--only", default="", help="comma-separated: grid, equinox, models")
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args(argv)
    names = [n for n in a.only.split(",") if n] or list(BENCHES)
    rounds = 2 if a.smoke else a.rounds
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; medians of {rounds} interleaved")
    print("| bench | under vmap | implementation | wall ms | vs JAX AD | CPU ms | vs JAX AD |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        for bench, pattern, impl, t, r, c, rc in BENCHES[name](a.smoke, rounds):
            row = f"| {bench} | {pattern} | {impl} | {t:.3f} | {r:.2f}× | {c:.3f} | {rc:.2f}× |"
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
