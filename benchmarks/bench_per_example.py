"""Per-example gradient norms and DP-SGD clipping: jaxlinear against vmap(grad) and jax_privacy.

``python -m benchmarks.bench_per_example [--smoke] [--only CASES] [--rounds R] [--route R]
[--no-breakdown] [--json PATH]``

Cases (float32, CPU unless JAX has another default device):

- ``mlp``: ``n = 128``, MLP 512 → 512 → 512 → 10 (ReLU), per-example softmax
  cross-entropy on 2-D inputs ``(n, 512)``.
- ``seq_T16``, ``seq_T512``: the same kind of MLP (128 → 128 → 128 → 10) on inputs
  ``(32, T, 128)``, loss summed over the ``T`` positions: the Gram route at ``T = 16``,
  the per-example route at ``T = 512`` (``2T² > d_in·d_out``).
- ``cnn``: CIFAR-shaped ``(128, 32, 32, 3)``; 3×3 "SAME" convs 3→32, 32→64 (stride 2),
  64→64, 64→128 (stride 2), ReLU, global average pool, dense head to 10 classes.
- ``transformer``: a 2-block pre-LayerNorm character LM, vocabulary 512, d = 128, 4 heads,
  T = 64, n = 32: ``jaxlinear.embed`` for tokens and positions, ``jaxlinear.einsum``
  attention projections, ``jaxlinear.linear`` MLP (4d) and head, LayerNorm in plain jnp
  (its scales and biases take the per-leaf fallback), loss = mean over positions.
- ``transformer_ln_einsum``: the same model with LayerNorm's scale written as
  ``jaxlinear.einsum("btd,d->btd", x̂, scale)`` and its bias added right after: every leaf
  structural, no fallback. (Models: ``benchmarks/dp_models.py``.)
- ``nnx_decoder``: a Gemma-style decoder in plain Flax NNX (RMSNorm ``x * (1 + scale)``,
  GQA ``nnx.Einsum``s, the embedding tied via ``attend``, ``nnx.vmap``-made blocks run by
  ``nnx.scan`` + ``nnx.remat``), n = 32, T = 64, V = 512, d = 128, 4 heads (2 KV).
- ``eqx_vit``: a ViT in plain Equinox run under ``jax.vmap`` (patch ``Conv2d``, class
  token, positions, ``MultiheadAttention``, LayerNorm), 32×32×3 images, patch 4,
  d = 128, 4 heads, n = 32. (Models: ``benchmarks/dp_real_models.py``.)

Implementations, each ``jax.jit``-ed, all on the same data and the same loss function:

- ``grad``: one plain ``jax.grad`` of the summed loss (the baseline for clipping);
- ``clipped``: ``jaxlinear.clipped_grad``;
- ``norms``: ``jaxlinear.per_example_grad_norms``;
- ``naive_clipped``: the textbook DP-SGD clip: ``jax.vmap(jax.grad(loss of one
  example))``, the norms, ``Σ_i min(1, C/‖∇ℓ_i‖) ∇ℓ_i``;
- ``naive_norms``: ``vmap(grad)``, then the norms;
- ``jax_privacy``: ``jax_privacy.clipped_grad`` (2.0; ``vmap`` of ``grad``, no
  microbatching), when it is installed (``pip install jax-privacy==2.0.0``);
- ``clipped_structural`` (models with fallback leaves only): ``clipped_grad`` with the
  fallback leaves held constant, so the difference to ``clipped`` is their cost.

``C`` is the median per-example norm at the initial parameters, so clipping is active for
half of each batch. Before anything is timed, every implementation's result is checked
against the ``vmap(grad)`` path (norms and clipped sums within 1e-4, relative, in float32):
a wrong route raises instead of producing a fast wrong number.

Method: compile and warm up everything first; calibrate each implementation's calls per
sample to about ``--target-s``; then, round by round, take one sample of each in a fresh
random order. Ratios are formed per round and reported as median (min–max). Temp bytes:
``memory_analysis().temp_size_in_bytes`` of each compiled program.

Where the cost goes (the models; ``--no-breakdown`` skips it): each
jaxlinear op call of the model alone, on the input it sees in the model and a random
output cotangent ``g``, as the one-layer loss ``ℓ_i = ⟨op(w, x_i), g_i⟩``, whose
per-example gradient is exactly that layer's ``w̄_i``: ``per_example_grad_norms`` of it
(the layer's route alone: the loss is linear in ``y``, so XLA drops the forward) and
``jax.grad`` of its sum (the weight gradient ``w̄`` alone), interleaved; plus XLA's flop
counts (``cost_analysis()``) of both.
The fallback leaves' cost is ``clipped`` − ``clipped_structural``.
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
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import jaxlinear
from benchmarks import dp_models, dp_real_models

IMPLS = ("grad", "clipped", "norms", "naive_clipped", "naive_norms")  # always run
OPTIONAL = ("jax_privacy", "clipped_structural")  # when installed / when there are fallbacks
TOL = 1e-4  # float32 agreement of every path with vmap(grad)
LABELS = {
    "grad": "jax.grad",
    "clipped": "clipped_grad",
    "norms": "per_example_grad_norms",
    "naive_clipped": "vmap(grad) clip",
    "naive_norms": "vmap(grad) norms",
    "jax_privacy": "jax_privacy.clipped_grad",
    "clipped_structural": "clipped_grad, fallback leaves fixed",
}


def cases(smoke: bool) -> list[dict]:
    """``name``, ``kind`` and the sizes of each case."""
    if smoke:
        return [
            dict(name="mlp", kind="mlp", n=8, sizes=[16, 16, 16, 4], T=None),
            dict(name="seq_T2", kind="mlp", n=4, sizes=[8, 8, 8, 4], T=2),
            dict(name="seq_T16", kind="mlp", n=4, sizes=[8, 8, 8, 4], T=16),
            dict(name="cnn", kind="cnn", n=4, hw=8, convs=((4, 1), (8, 2), (8, 1), (8, 2))),
            dict(name="transformer", kind="transformer", n=2, T=8, vocab=16, d=8, heads=2),
            dict(
                name="transformer_ln_einsum",
                kind="transformer",
                n=2,
                T=8,
                vocab=16,
                d=8,
                heads=2,
                ln="einsum",
            ),
            dict(name="nnx_decoder", kind="nnx_decoder", n=2, T=8, vocab=16, d=8, heads=2,
                 kv_heads=1),
            dict(name="eqx_vit", kind="eqx_vit", n=2, image=8, patch=4, d=8, heads=2),
        ]  # fmt: skip
    return [
        dict(name="mlp", kind="mlp", n=128, sizes=[512, 512, 512, 10], T=None),
        dict(name="seq_T16", kind="mlp", n=32, sizes=[128, 128, 128, 10], T=16),
        dict(name="seq_T512", kind="mlp", n=32, sizes=[128, 128, 128, 10], T=512),
        dict(name="cnn", kind="cnn", n=128, hw=32, convs=dp_models.CNN_CONVS),
        dict(name="transformer", kind="transformer", n=32, T=64, vocab=512, d=128, heads=4),
        dict(
            name="transformer_ln_einsum",
            kind="transformer",
            n=32,
            T=64,
            vocab=512,
            d=128,
            heads=4,
            ln="einsum",
        ),
        dict(name="nnx_decoder", kind="nnx_decoder", n=32, T=64, vocab=512, d=128, heads=4,
             kv_heads=2),
        dict(name="eqx_vit", kind="eqx_vit", n=32, image=32, patch=4, d=128, heads=4),
    ]  # fmt: skip


def _build_mlp(n, sizes, T):
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

    return layers, (x, labels), loss, None


def build(case: dict):
    """``(params, args, loss, layers or None)`` of a case (``dp_models``' convention)."""
    kw = {k: v for k, v in case.items() if k not in ("name", "kind")}
    if case["kind"] == "mlp":
        return _build_mlp(**kw)
    if case["kind"] == "cnn":
        return dp_models.build_cnn(**kw)
    if case["kind"] == "nnx_decoder":
        return dp_real_models.build_nnx_decoder(**kw)
    if case["kind"] == "eqx_vit":
        return dp_real_models.build_eqx_vit(**kw)
    return dp_models.build_transformer(**kw)


def _jax_privacy():
    try:
        import jax_privacy
    except ImportError:
        return None
    return jax_privacy


def impls(loss, clip_norm, structural=None):
    """The implementations as functions of ``(params, *args)``.

    ``structural``: indices (in ``jax.tree.leaves(params)``) of the leaves that do not take
    the fallback, when some do: adds ``clipped_structural``.
    """

    def per_example_grads(params, *args):
        one = lambda *ex: jax.grad(lambda p: loss(p, *(a[None] for a in ex))[0])(params)  # noqa: E731
        return jax.vmap(one)(*args)  # every leaf (n, *shape)

    def flat_norms(g):
        n = jax.tree.leaves(g)[0].shape[0]
        return jnp.sqrt(sum(jnp.sum(a.reshape(n, -1) ** 2, axis=1) for a in jax.tree.leaves(g)))

    def naive_clipped(params, *args):
        g = per_example_grads(params, *args)
        norms = flat_norms(g)
        c = jnp.minimum(1.0, clip_norm / norms)
        return jax.tree.map(lambda a: jnp.tensordot(c, a, axes=1), g), norms

    out = {
        "grad": jax.grad(lambda params, *a: jnp.sum(loss(params, *a))),
        "clipped": lambda params, *a: jaxlinear.clipped_grad(loss, params, *a, clip_norm=clip_norm),
        "norms": lambda params, *a: jaxlinear.per_example_grad_norms(loss, params, *a),
        "naive_clipped": naive_clipped,
        "naive_norms": lambda params, *a: flat_norms(per_example_grads(params, *a)),
    }
    jp = _jax_privacy()
    if jp is not None:

        def privacy(params, *args):
            clipped = jp.clipped_grad(
                lambda p, *batch: jnp.sum(loss(p, *batch)),  # a batch of one (keep_batch_dim)
                l2_clip_norm=clip_norm,
                batch_argnums=tuple(range(1, 1 + len(args))),
            )
            with warnings.catch_warnings():  # jax_privacy 2.0 calls optax.global_norm,
                warnings.simplefilter("ignore", DeprecationWarning)  # deprecated in optax 0.2.8
                return clipped(params, *args)

        out["jax_privacy"] = privacy
    if structural is not None:

        def clipped_structural(params, *args):
            leaves, treedef = jax.tree.flatten(params)

            def partial_loss(kept, *args):
                full = list(leaves)
                for i, v in zip(structural, kept, strict=True):
                    full[i] = v
                return loss(treedef.unflatten(full), *args)

            kept = [leaves[i] for i in structural]
            return jaxlinear.clipped_grad(partial_loss, kept, *args, clip_norm=clip_norm)

        out["clipped_structural"] = clipped_structural
    return out


def _time(fn, reps: int) -> float:
    """Seconds per call over ``reps`` calls (one untimed call first)."""
    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(reps):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / reps


def _interleave(fns: dict, rounds: int, target_s: float, seed: int) -> dict:
    """Samples (seconds per call) of every function, one per round in a fresh random order."""
    reps = {name: max(1, round(target_s / max(_time(f, 1), 1e-6))) for name, f in fns.items()}
    samples = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            samples[name].append(_time(fns[name], reps[name]))
    return samples


def _ratio(samples, a, b):
    r = [x / y for x, y in zip(samples[a], samples[b], strict=True)]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


def _flops(compiled):
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax: one dict per device
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


def _rel(a, b) -> float:
    """``‖a − b‖ / ‖b‖`` over a pytree (float64 on the host)."""
    a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _rel_each(a, b) -> float:
    """The largest ``|a_i − b_i| / |b_i|`` (norms, one per example)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


def _check(case: str, fns: dict) -> dict:
    """Every path against the ``vmap(grad)`` one; raises beyond ``TOL``."""
    naive_grads, naive_norms = fns["naive_clipped"]()
    naive_grads = jax.tree.leaves(naive_grads)
    errors = {
        "norms": _rel_each(fns["norms"](), naive_norms),
        "naive_norms": _rel_each(fns["naive_norms"](), naive_norms),
    }
    grads, norms = fns["clipped"]()
    errors["clipped norms"] = _rel_each(norms, naive_norms)
    errors["clipped sum"] = _rel(grads, naive_grads)
    if "jax_privacy" in fns:
        errors["jax_privacy sum"] = _rel(fns["jax_privacy"](), naive_grads)
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    if bad:
        raise RuntimeError(
            f"{case}: results differ from the vmap(grad) path by more than {TOL} (relative):"
            f" {bad}; not timing a wrong result"
        )
    return errors


def run_case(case: dict, rounds: int, target_s: float, seed: int, breakdown: bool) -> dict:
    params, args, loss, layers = build(case)
    report = jaxlinear.per_example_routes(loss, params, *args)
    fallback = [i for i, r in enumerate(report) if r.route == "fallback"]
    structural = [i for i in range(len(report)) if i not in fallback] if fallback else None
    start = time.perf_counter()
    compiled_naive = jax.jit(impls(loss, 1.0)["naive_norms"]).lower(params, *args).compile()
    compile_s = {"naive_norms": time.perf_counter() - start}
    clip_norm = float(np.median(np.asarray(compiled_naive(params, *args))))
    fns, temp, flops = {}, {}, {}
    for name, f in impls(loss, clip_norm, structural).items():
        if name == "naive_norms":  # compiled above
            fns[name] = lambda compiled=compiled_naive: compiled(params, *args)
            temp[name] = int(compiled_naive.memory_analysis().temp_size_in_bytes)
            flops[name] = _flops(compiled_naive)
            continue
        start = time.perf_counter()
        compiled = jax.jit(f).lower(params, *args).compile()
        compile_s[name] = time.perf_counter() - start
        temp[name] = int(compiled.memory_analysis().temp_size_in_bytes)
        flops[name] = _flops(compiled)
        fns[name] = lambda compiled=compiled: compiled(params, *args)
    errors = _check(case["name"], fns)
    samples = _interleave(fns, rounds, target_s, seed)
    ratios = {
        "norms / naive_norms": _ratio(samples, "norms", "naive_norms"),
        "clipped / grad": _ratio(samples, "clipped", "grad"),
        "clipped / naive_clipped": _ratio(samples, "clipped", "naive_clipped"),
        "naive_clipped / clipped": _ratio(samples, "naive_clipped", "clipped"),
    }
    if "jax_privacy" in fns:
        ratios["jax_privacy / clipped"] = _ratio(samples, "jax_privacy", "clipped")
    if "clipped_structural" in fns:
        ratios["clipped_structural / grad"] = _ratio(samples, "clipped_structural", "grad")
        share = [
            (c - s) / g
            for c, s, g in zip(
                samples["clipped"], samples["clipped_structural"], samples["grad"], strict=True
            )
        ]
        ratios["(clipped - clipped_structural) / grad"] = {
            "median": statistics.median(share),
            "min": min(share),
            "max": max(share),
        }
    out = {
        "case": case,
        "routes": report.counts(),
        "route_report": [r._asdict() for r in report],
        "route_table": str(report),
        "clip_norm": clip_norm,
        "median_s": {name: statistics.median(s) for name, s in samples.items()},
        "samples_s": samples,
        "compile_s": compile_s,
        "temp_bytes": temp,
        "flops": flops,
        "rel_err_vs_naive": errors,
        "norms_rel_err_vs_naive": errors["norms"],
        "ratios": ratios,
    }
    if breakdown and layers is not None:
        out["layers"] = layer_breakdown(layers, max(1, rounds // 3), target_s, seed)
    return out


# --------------------------------------------------------------------------------------
# Where the cost goes: each layer alone.


def _layer_fns(layer, g):
    """``jax.grad`` and ``per_example_grad_norms`` of ``ℓ_i = ⟨op(w, x_i), g_i⟩``.

    The loss is linear in ``y``, so XLA drops the forward pass from both programs: the
    first is the layer's weight gradient ``w̄ = B_wᵀ(g; x)`` alone (what ``jax.grad`` of
    the model spends on this layer's weight), the second its per-example route alone.
    """

    def losses(w, x, g):
        y = layer.op(w, x)
        return jnp.sum(y * g, axis=tuple(range(1, y.ndim)))

    return losses, {
        "grad": jax.grad(lambda w, x, g: jnp.sum(losses(w, x, g))),
        "norms": lambda w, x, g: jaxlinear.per_example_grad_norms(
            losses, w, x, g, fallback="raise"
        ),
    }


def layer_breakdown(layers, rounds: int, target_s: float, seed: int) -> list[dict]:
    """Per layer: the route, and the time and flops of its norms and of its ``w̄``."""
    rng = np.random.default_rng(seed)
    rows, fns = [], {}
    for k, layer in enumerate(layers):
        y = jax.eval_shape(layer.op, layer.w, layer.x)
        g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
        losses, own = _layer_fns(layer, g)
        report = jaxlinear.per_example_routes(losses, layer.w, layer.x, g)
        route = ", ".join(r.route for r in report if r.route != "bias")
        flops = {}
        for what, f in own.items():
            compiled = jax.jit(f).lower(layer.w, layer.x, g).compile()
            flops[what] = _flops(compiled)
            fns[(k, what)] = lambda c=compiled, a=(layer.w, layer.x, g): c(*a)
        w_shapes = [tuple(a.shape) for a in jax.tree.leaves(layer.w)]
        rows.append(
            dict(
                layer=layer.name,
                route=route,
                x=tuple(layer.x.shape),
                y=tuple(y.shape),
                w=w_shapes,
                flops=flops,
            )
        )
    samples = _interleave(fns, rounds, target_s, seed)
    for k, row in enumerate(rows):
        row["route_s"] = statistics.median(samples[(k, "norms")])
        row["w_bar_s"] = statistics.median(samples[(k, "grad")])
        row["route / w_bar"] = _ratio(samples, (k, "norms"), (k, "grad"))
        # clipped_grad's extra over jax.grad for this layer: a per-example route replaces
        # the layer's w̄ (its clipped sum is Σ c_i w̄_i, a cheap contraction); a ghost route
        # comes on top of it (its clipped sum is one w̄ with g's rows scaled).
        row["extra_s"] = statistics.median(
            (t - w if "per_example" in row["route"] else t)
            for t, w in zip(samples[(k, "norms")], samples[(k, "grad")], strict=True)
        )
    return rows


# --------------------------------------------------------------------------------------
# The report.


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} µs"


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:+.2f} ms"


def _fmt_b(b: int) -> str:
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB"


def _fmt_f(f: float) -> str:
    return f"{f / 1e9:.2f} G" if abs(f) >= 1e8 else f"{f / 1e6:.2f} M"


def _fmt_r(q: dict | None) -> str:
    if q is None:
        return "–"
    return f"{q['median']:.3f} ({q['min']:.3f}–{q['max']:.3f})"


def _shape(r: dict) -> str:
    c = r["case"]
    if c["kind"] == "mlp":
        T = "" if c["T"] is None else f"{c['T']}, "
        lead = f"({c['n']}, {T}{c['sizes'][0]})"
        return f"{c['name']} {lead}, {'→'.join(map(str, c['sizes']))}"
    if c["kind"] == "cnn":
        chans = "→".join(str(ch) for ch in (3, *(co for co, _ in c["convs"])))
        return f"cnn ({c['n']}, {c['hw']}, {c['hw']}, 3), conv {chans}, head 10"
    if c["kind"] == "nnx_decoder":
        return (
            f"NNX decoder n={c['n']}, T={c['T']}, V={c['vocab']} (tied), d={c['d']},"
            f" {c['heads']} heads ({c['kv_heads']} KV), nnx.scan + remat over 2 blocks"
        )
    if c["kind"] == "eqx_vit":
        return (
            f"Equinox ViT under vmap n={c['n']}, {c['image']}², patch {c['patch']},"
            f" d={c['d']}, {c['heads']} heads, 2 blocks"
        )
    ln = "LayerNorm by jaxlinear.einsum" if c.get("ln") == "einsum" else "LayerNorm in jnp"
    return (
        f"transformer n={c['n']}, T={c['T']}, V={c['vocab']}, d={c['d']}, {c['heads']} heads,"
        f" 2 blocks, {ln}"
    )


def _routes(r: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(r["routes"].items()))


def report(results: list[dict]) -> str:
    cols = [k for k in (*IMPLS, *OPTIONAL) if any(k in r["median_s"] for r in results)]
    lines = [
        "| case | routes (leaves) | " + " | ".join(LABELS[k] for k in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for r in results:
        m = r["median_s"]
        cells = [_fmt_s(m[k]) if k in m else "–" for k in cols]
        lines.append(f"| {_shape(r)} | {_routes(r)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| case | clipped_grad ÷ jax.grad (target ≤ 1.3) | jax_privacy ÷ clipped_grad"
        " (target ≥ 3) | vmap(grad) clip ÷ clipped_grad | norms: speed-up vs vmap(grad)"
        " (target ≥ 5) | fallback leaves' share (÷ jax.grad) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        q = r["ratios"]
        nn = q["norms / naive_norms"]
        fb = q.get("(clipped - clipped_structural) / grad")
        lines.append(
            f"| {r['case']['name']} | {_fmt_r(q['clipped / grad'])}"
            f" | {_fmt_r(q.get('jax_privacy / clipped'))}"
            f" | {_fmt_r(q['naive_clipped / clipped'])}"
            f" | {1 / nn['median']:.1f}× ({_fmt_r(nn)} of the time)"
            f" | {'–' if fb is None else format(fb['median'], '.3f')} |"
        )
    lines += [
        "",
        "| case | temp bytes: jax.grad | clipped_grad (÷ grad; CNN target ≤ 1.5) | norms |"
        " vmap(grad) clip | jax_privacy | max rel. diff vs vmap(grad): norms / clipped sum /"
        " jax_privacy sum | C |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t, e = r["temp_bytes"], r["rel_err_vs_naive"]
        jp = _fmt_b(t["jax_privacy"]) if "jax_privacy" in t else "–"
        jpe = f"{e['jax_privacy sum']:.1e}" if "jax_privacy sum" in e else "–"
        lines.append(
            f"| {r['case']['name']} | {_fmt_b(t['grad'])}"
            f" | {_fmt_b(t['clipped'])} ({t['clipped'] / max(t['grad'], 1):.2f}×)"
            f" | {_fmt_b(t['norms'])} | {_fmt_b(t['naive_clipped'])} | {jp}"
            f" | {e['norms']:.1e} / {e['clipped sum']:.1e} / {jpe} | {r['clip_norm']:.3g} |"
        )
    for r in results:
        if "layers" not in r:
            continue
        grad_s = r["median_s"]["grad"]
        lines += [
            "",
            f"Where the cost goes, {r['case']['name']}: each layer alone, interleaved, on the"
            " input it sees in the model and a random cotangent; *route*: the time of its"
            " per-example norms (its rule alone; % of the model's jax.grad); *w̄*: its weight"
            " gradient alone (what jax.grad spends on it); flops by XLA's cost analysis;"
            " *extra*: what the layer adds to clipped_grad over jax.grad, estimated as"
            " route − w̄ for a per-example route (its clipped sum Σ c_i w̄_i replaces w̄) and"
            " route for the others (their clipped sum is one more w̄, in place of jax.grad's).",
            "",
            "| layer | x → y | route | route: time (% of model grad) | w̄: time"
            " | route ÷ w̄ (per round) | flops: route / w̄ | extra in clipped_grad (est.) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        tot_route = tot_w = tot_extra = 0.0
        for row in r["layers"]:
            fn, fw = row["flops"]["norms"], row["flops"]["grad"]
            tot_route += row["route_s"]
            tot_w += row["w_bar_s"]
            tot_extra += row["extra_s"]
            flop_cell = "–" if None in (fn, fw) else f"{_fmt_f(fn)} / {_fmt_f(fw)}"
            lines.append(
                f"| {row['layer']} | {tuple(row['x'])} → {tuple(row['y'])} | {row['route']}"
                f" | {_fmt_s(row['route_s'])} ({100 * row['route_s'] / grad_s:.0f}%)"
                f" | {_fmt_s(row['w_bar_s'])}"
                f" | {_fmt_r(row['route / w_bar'])} | {flop_cell} | {_fmt_ms(row['extra_s'])} |"
            )
        q = r["ratios"]
        extra = (q["clipped / grad"]["median"] - 1) * grad_s
        fb = q.get("(clipped - clipped_structural) / grad")
        lines.append(
            f"| **all layers** | | | {_fmt_s(tot_route)} ({100 * tot_route / grad_s:.0f}%)"
            f" | {_fmt_s(tot_w)} | | | {_fmt_ms(tot_extra)} ({100 * tot_extra / grad_s:.0f}%) |"
        )
        lines += [
            "",
            f"clipped_grad − jax.grad in the model: {_fmt_s(extra)}"
            f" ({100 * extra / grad_s:.0f}% of jax.grad)"
            + (
                ""
                if fb is None
                else f"; of which the fallback leaves: {_fmt_s(fb['median'] * grad_s)}"
                f" ({100 * fb['median']:.0f}%)"
            ),
        ]
    for r in results:
        if r["case"]["kind"] != "mlp":
            lines += [
                "",
                f"<details><summary>Routes, {r['case']['name']}"
                " (<code>jaxlinear.per_example_routes</code>)</summary>",
                "",
                "```",
                r["route_table"],
                "```",
                "</details>",
            ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_per_example", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one round")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 30; smoke 1)")
    p.add_argument("--target-s", type=float, default=None, help="seconds per sample (0.03)")
    p.add_argument("--only", default="", help="comma-separated case names")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-layer timings")
    p.add_argument(
        "--route",
        choices=("auto", "gram", "per_example"),
        default="auto",
        help="force every ghost rule to take (gram) or decline (per_example) its Gram route,"
        " to compare the routes layer by layer (default: fastDP's rule, 2T² ≤ p·d)",
    )
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    from jaxlinear._src import ghost  # (private: the rule every op's ghost route asks)

    rule = ghost.gram_pays
    if a.route != "auto":
        ghost.gram_pays = lambda T, d, p, route=a.route: route == "gram"
    try:
        return _main(a)
    finally:
        ghost.gram_pays = rule


def _main(a) -> dict:
    rounds = a.rounds or (1 if a.smoke else 30)
    target_s = a.target_s or (0.001 if a.smoke else 0.03)
    selected = [c for c in cases(a.smoke) if not a.only or c["name"] in a.only.split(",")]
    start, load0 = time.time(), os.getloadavg()[0]
    results = []
    for i, case in enumerate(selected):
        results.append(run_case(case, rounds, target_s, seed=i, breakdown=not a.no_breakdown))
        print(f"  {case['name']}: done ({time.time() - start:.0f} s)", file=sys.stderr)
    jp = _jax_privacy()
    meta = {
        "jax": jax.__version__,
        "jax_privacy": getattr(jp, "__version__", None),
        "device": str(jax.devices()[0]),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "rounds": rounds,
        "route": a.route,
        "load_avg_1min": [load0, os.getloadavg()[0]],
        "seconds": time.time() - start,
    }
    out = {"meta": meta, "cases": results}
    print(report(results))
    print(
        f"\njax {meta['jax']}, jax_privacy {meta['jax_privacy'] or 'not installed'},"
        f" {meta['device']}, {meta['cpus']} CPUs, {rounds} rounds,"
        f" 1-min load average {load0:.1f} → {meta['load_avg_1min'][1]:.1f},"
        f" {meta['seconds']:.0f} s"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return out


if __name__ == "__main__":
    main()
