"""Sharded checks: every sharded layout, on every device there is, against plain ``x @ W + b``.

Run as a script (``tests/test_sharded.py`` runs it on 8 simulated CPU devices)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python tests/sharded_checks.py --expect-devices 8
    python tests/sharded_checks.py            # the real devices, e.g. one GPU: 1-device meshes

Prints one line per check and the collectives found in each compiled HLO; exits 1 if any
check fails. Importing this module does nothing (pytest's doctest collection imports it).

The reference is the plain affine map under JAX's own autodiff, on one device, in float64;
the sharded runs are float32 (float32 tolerance). All-reduce payloads are checked only where
a mesh axis has more than one device (over one device XLA may keep or drop them).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import re
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlinear
from jaxlinear import Params
from jaxlinear._src import vma

BATCH, D_IN, HIDDEN, D_OUT = 16, 8, 16, 8
TOL = 2e-5  # float32, relative to max(1, |reference|)
# An HLO instruction's opcode: "= f32[8,8]{1,0} all-reduce(", "= (f32[..], ..) all-reduce-start(".
COLLECTIVE = re.compile(
    r"\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
)
LAYERS = {"linear": jaxlinear.linear, "dual_linear": jaxlinear.dual_linear}


# --------------------------------------------------------------------------------------
# The independent reference (no jaxlinear code) and small utilities.


def ref_affine(params, x):
    """Plain ``x @ W + b``; ``b`` broadcast explicitly (rank promotion is an error)."""
    y = x @ params.W
    return y if params.b is None else y + params.b[(None,) * (y.ndim - 1)]


def ref_mlp(layers, x):
    return ref_affine(layers[1], jax.nn.relu(ref_affine(layers[0], x)))


def loss_of(f):
    """A non-quadratic scalar loss, so the cotangent ``G`` is not a constant."""
    return lambda *args: jnp.sum(jnp.sin(f(*args)))


def f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def collectives(fn, *args) -> list[tuple[str, tuple[int, ...]]]:
    """The collectives in the compiled (optimized) HLO of ``jax.jit(fn)(*args)``.

    One ``(opcode, payload)`` per instruction; ``payload`` lists the element counts of the
    arrays it carries (a combined all-reduce of ``dW`` and ``db`` carries two).
    """
    text = jax.jit(fn).lower(*args).compile().as_text()
    ops = []
    for line in text.splitlines():
        line = line.split("metadata=")[0]
        m = COLLECTIVE.search(line)
        if m and "=" in line[: m.start()]:
            result_type = line[line.index("=") + 1 : m.start()]
            sizes = tuple(
                math.prod(int(d) for d in dims.split(",") if d)
                for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", result_type)
            )
            ops.append((m.group(1), sizes))
    return ops


class Checker:
    def __init__(self):
        self.results: list[tuple[str, bool, float]] = []

    def record(self, name: str, passed: bool, residual: float = 0.0, note: str = ""):
        self.results.append((name, bool(passed), float(residual)))
        mark = "ok  " if passed else "FAIL"
        print(f"[{mark}] {name}  (residual {residual:.1e}){'  ' + note if note else ''}")

    def close(self, name: str, actual, expected, tol: float = TOL):
        a_leaves, e_leaves = jax.tree.leaves(f64(actual)), jax.tree.leaves(f64(expected))
        if jax.tree.structure(actual) != jax.tree.structure(expected) or any(
            a.shape != e.shape for a, e in zip(a_leaves, e_leaves, strict=True)
        ):
            self.record(name + " [structure/shape mismatch]", False, np.inf)
            return
        worst = max(
            (
                np.max(np.abs(a - e)) / max(1.0, np.max(np.abs(e)))
                for a, e in zip(a_leaves, e_leaves, strict=True)
            )
        )
        self.record(name, worst <= tol, worst)

    def hlo(self, name, ops, payload, *, big_axis=True):
        """Check one program's collectives: all-reduces of exactly ``payload``, nothing else.

        ``payload``: the element counts of every array all-reduced, in any grouping (XLA may
        combine independent all-reduces into one instruction).
        """
        others = [op for op, _ in ops if op != "all-reduce"]
        carried = sorted(n for op, sizes in ops if op == "all-reduce" for n in sizes)
        note = f"HLO: {ops}"
        if not big_axis:  # one device per axis: XLA may keep or drop the trivial all-reduces
            self.record(f"{name}: no all-gather/other (1-device axes)", not others, 0.0, note)
            return
        ok = not others and carried == sorted(payload)
        want = f"all-reduce of {sorted(payload)} elements" if payload else "no collectives"
        self.record(f"{name}: {want}, no all-gather/other", ok, 0.0, note)

    def run(self, name, fn, *args):
        try:
            fn(self, *args)
        except Exception:
            traceback.print_exc()
            self.record(f"{name} [raised]", False, np.inf)


# --------------------------------------------------------------------------------------


def data(key, sizes=(D_IN, D_OUT)):
    kx, kw, kb = jax.random.split(key, 3)
    x = jax.random.normal(kx, (BATCH, sizes[0]), jnp.float32)
    layers = [
        Params(
            jax.random.normal(jax.random.fold_in(kw, i), (a, b), jnp.float32) / a**0.5,
            jax.random.normal(jax.random.fold_in(kb, i), (b,), jnp.float32),
        )
        for i, (a, b) in enumerate(itertools.pairwise(sizes))
    ]
    return layers, x


def check_layouts(c: Checker, mesh, mesh2d, name: str, layer):
    """The four sharded layouts of ``jaxlinear`` against the single-device reference.

    ``mesh`` puts every device on ``"model"``; ``mesh2d`` splits them over
    ``("data", "model")`` for the data x tensor parallel MLP.
    """
    big = mesh.shape["model"] > 1
    (p,), x = data(jax.random.key(0))
    ref_y = ref_affine(f64(p), f64(x))
    ref_g = jax.grad(loss_of(ref_affine), argnums=(0, 1))(f64(p), f64(x))

    layouts = {
        "data parallel": lambda p, x: jaxlinear.data_parallel_linear(
            p, x, mesh=mesh, axis="model", layer=layer
        ),
        "column parallel": lambda p, x: jaxlinear.column_parallel_linear(
            p, x, mesh=mesh, axis="model", layer=layer
        ),
        "row parallel": lambda p, x: jaxlinear.row_parallel_linear(
            p, x, mesh=mesh, axis="model", layer=layer
        ),
    }
    d_in, d_out = D_IN, D_OUT
    # Elements all-reduced (forward, forward + backward): DP dW, db; column dX; row Y.
    expect = {
        "data parallel": ([], [d_in * d_out, d_out]),
        "column parallel": ([], [BATCH * d_in]),
        "row parallel": ([BATCH * d_out], [BATCH * d_out]),
    }
    for layout, f in layouts.items():
        tag = f"{name} {layout}"
        c.close(f"{tag}: forward == single device", jax.jit(f)(p, x), ref_y)
        grad = jax.grad(loss_of(f), argnums=(0, 1))
        c.close(f"{tag}: grad (params, x) == single device", jax.jit(grad)(p, x), ref_g)
        fwd, bwd = expect[layout]
        c.hlo(f"{tag} forward", collectives(f, p, x), fwd, big_axis=big)
        c.hlo(f"{tag} grad", collectives(grad, p, x), bwd, big_axis=big)

    layers, x = data(jax.random.key(1), (D_IN, HIDDEN, D_OUT))
    ref_y = ref_mlp(f64(layers), f64(x))
    ref_g = jax.grad(loss_of(ref_mlp), argnums=(0, 1))(f64(layers), f64(x))

    def block(layers, x):
        return jaxlinear.tensor_parallel_mlp(layers, x, mesh=mesh, axis="model", layer=layer)

    tag = f"{name} 2-layer tensor-parallel MLP"
    c.close(f"{tag}: forward == single device", jax.jit(block)(layers, x), ref_y)
    grad = jax.grad(loss_of(block), argnums=(0, 1))
    c.close(f"{tag}: grad (params, x) == single device", jax.jit(grad)(layers, x), ref_g)
    # Forward: Y (row-parallel sum); backward: dX (column-parallel x is replicated).
    c.hlo(f"{tag} forward", collectives(block, layers, x), [BATCH * d_out], big_axis=big)
    payload = [BATCH * d_out, BATCH * d_in]
    c.hlo(f"{tag} grad", collectives(grad, layers, x), payload, big_axis=big)

    # Data parallel x tensor parallel on a 2-D mesh: batch over "data", hidden over "model".
    def block2d(layers, x):
        return jaxlinear.tensor_parallel_mlp(
            layers, x, mesh=mesh2d, axis="model", batch_axis="data", layer=layer
        )

    tag = f"{name} MLP, data x tensor parallel"
    c.close(f"{tag}: forward == single device", jax.jit(block2d)(layers, x), ref_y)
    grad = jax.grad(loss_of(block2d), argnums=(0, 1))
    c.close(f"{tag}: grad (params, x) == single device", jax.jit(grad)(layers, x), ref_g)
    n_data, n_model = mesh2d.shape["data"], mesh2d.shape["model"]
    local, h = BATCH // n_data, HIDDEN // n_model
    # Y and dX over "model" (this device's batch rows); dW1, db1, dW2, db2 over "data".
    payload = [local * d_out, local * d_in, d_in * h, h, h * d_out, d_out]
    c.hlo(f"{tag} grad", collectives(grad, layers, x), payload, big_axis=n_data * n_model > 1)


def check_grad_inside_shard_map(c: Checker, mesh, name: str, layer, check_vma=True):
    """``jax.grad`` inside ``shard_map``: replicated params, batch-sharded x, vs JAX's own AD."""
    (p,), x = data(jax.random.key(2))
    axes = tuple(mesh.axis_names)

    def per_device_grad(f):
        def body(p, x):  # p replicated, x: this device's slice of the batch
            return jax.grad(loss_of(f), argnums=(0, 1))(p, x)

        return jax.jit(
            jax.shard_map(
                body,
                mesh=mesh,
                in_specs=(P(), P(axes)),
                out_specs=(P(), P(axes)),
                check_vma=check_vma,
            )
        )

    put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
    p_, x_ = put(p, P()), put(x, P(axes))
    ours = per_device_grad(layer)(p_, x_)
    jaxs = per_device_grad(ref_affine)(p_, x_)
    tag = f"{name} grad inside shard_map (check_vma={check_vma})"
    c.close(f"{tag} == JAX's AD of plain x @ W + b", ours, jaxs, tol=1e-6)
    if check_vma:  # with check_vma=False JAX itself returns per-device partial sums
        ref_g = jax.grad(loss_of(ref_affine), argnums=(0, 1))(f64(p), f64(x))
        c.close(f"{tag} == single-device gradient", ours, ref_g)


def check_jvp(c: Checker, mesh):
    """Forward mode through ``dual_linear`` under ``shard_map`` (outside and inside the body)."""
    layers, x = data(jax.random.key(3), (D_IN, HIDDEN, D_OUT))
    tangents, dx = data(jax.random.key(4), (D_IN, HIDDEN, D_OUT))

    def block(layers, x):
        return jaxlinear.tensor_parallel_mlp(
            layers, x, mesh=mesh, axis="model", layer=jaxlinear.dual_linear
        )

    ours = jax.jit(lambda *a: jax.jvp(block, a[:2], a[2:]))(layers, x, tangents, dx)
    ref = jax.jvp(ref_mlp, (f64(layers), f64(x)), (f64(tangents), f64(dx)))
    c.close("dual_linear: jvp of the tensor-parallel MLP == single device", ours, ref)

    (p,), x = data(jax.random.key(5))
    (dp,), dx = data(jax.random.key(6))
    axes = tuple(mesh.axis_names)

    def body(p, x, dp, dx):  # jvp of every device's own layer, inside the body
        return jax.jvp(jaxlinear.dual_linear, (p, x), (dp, dx))

    spec = (P(), P(axes), P(), P(axes))
    f = jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=(P(axes), P(axes)))
    put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
    ours = jax.jit(f)(*(put(a, s) for a, s in zip((p, x, dp, dx), spec, strict=True)))
    ref = jax.jvp(ref_affine, (f64(p), f64(x)), (f64(dp), f64(dx)))
    c.close("dual_linear: jvp inside shard_map (data parallel) == single device", ours, ref)

    # Column-parallel jvp with respect to the sharded W only: the tangent varies like W.
    def col(p, x):
        return jaxlinear.column_parallel_linear(
            p, x, mesh=mesh, axis="model", layer=jaxlinear.dual_linear
        )

    ours = jax.jit(lambda p, x, dp: jax.jvp(lambda p: col(p, x), (p,), (dp,)))(p, x, dp)
    ref = jax.jvp(lambda p: ref_affine(p, f64(x)), (f64(p),), (f64(dp),))
    c.close("dual_linear: jvp w.r.t. column-sharded params == single device", ours, ref)


def check_jit_named_sharding(c: Checker, mesh, name: str, layer):
    """Plain ``jax.jit`` (no shard_map) with ``NamedSharding`` inputs, on Auto- and
    Explicit-axes meshes (on the latter shardings are types: formulas states them)."""
    (p,), x = data(jax.random.key(7))
    (dp,), dx = data(jax.random.key(10))
    ref_y = ref_affine(f64(p), f64(x))
    ref_g = jax.grad(loss_of(ref_affine), argnums=(0, 1))(f64(p), f64(x))
    ref_t = jax.jvp(ref_affine, (f64(p), f64(x)), (f64(dp), f64(dx)))
    cases = {
        "x batch-sharded, params replicated": (P(), P(), P("data")),
        "x batch-sharded, W column-sharded": (P(None, "model"), P("model"), P("data")),
        "x and W sharded over d_in": (P("model", None), P(), P("data", "model")),
    }
    kind = "Explicit" if AxisType.Explicit in tuple(mesh.axis_types) else "Auto"
    with jax.set_mesh(mesh):
        for case, (w_spec, b_spec, x_spec) in cases.items():
            put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
            p_ = Params(put(p.W, w_spec), put(p.b, b_spec))
            x_ = put(x, x_spec)
            tag = f"{name} jit + NamedSharding, {kind} axes ({case})"
            y = jax.jit(layer)(p_, x_)
            c.close(f"{tag}: forward", y, ref_y)
            g = jax.jit(jax.grad(loss_of(layer), argnums=(0, 1)))(p_, x_)
            c.close(f"{tag}: grad", g, ref_g)
            if layer is jaxlinear.dual_linear:
                dp_ = Params(put(dp.W, w_spec), put(dp.b, b_spec))
                t = jax.jit(lambda *a: jax.jvp(layer, a[:2], a[2:]))(p_, x_, dp_, put(dx, x_spec))
                c.close(f"{tag}: jvp", t, ref_t)
            dW = g[0].W
            print(
                f"    shardings: W {w_spec}, x {x_spec} -> Y {y.sharding.spec},"
                f" dW {dW.sharding.spec}"
            )


def check_reads_varying_axes(c: Checker, mesh):
    """The canary for new JAX versions: jaxlinear must see which manual axes a value varies on.

    If JAX renames the attribute again, ``varying_axes`` reads nothing, no ``psum`` is
    inserted, and the gradient checks fail with JAX's cotangent type error.
    """
    seen = []

    def body(x):
        seen.append((vma.varying_axes(x), vma.varying_axes(jnp.sum(x))))
        return x

    x = jax.device_put(jnp.ones((mesh.shape["model"], 2)), NamedSharding(mesh, P("model")))
    jax.shard_map(body, mesh=mesh, in_specs=P("model"), out_specs=P("model"))(x)
    aval = jax.typeof(x)
    api = "manual_axis_type.varying" if hasattr(aval, "manual_axis_type") else "vma"
    want = [(frozenset({"model"}),) * 2]
    if mesh.shape["model"] == 1:  # JAX may drop 1-device axes from types
        want.append((frozenset(),) * 2)
    c.record(
        f"varying manual axes read through jax.typeof(x).{api}",
        seen[:1] in [[w] for w in want],
        0.0,
        f"{seen}",
    )


def check_b_unlike_W(c: Checker, mesh):
    """``b`` replicated while ``W`` varies: ``linear``'s zero-size residual carries b's type."""
    (p,), x = data(jax.random.key(8))
    n = mesh.shape["model"]

    def body(p, x):  # every device adds the whole b: Y = X W + n b
        return jax.lax.psum(jaxlinear.linear(p, x), "model")

    specs = (Params(P("model", None), P()), P(None, "model"))
    f = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P())
    put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
    p_ = Params(put(p.W, specs[0].W), put(p.b, specs[0].b))
    g = jax.jit(jax.grad(loss_of(f), argnums=(0, 1)))(p_, put(x, specs[1]))

    def ref(p, x):
        return ref_affine(Params(p.W, n * p.b), x)

    ref_g = jax.grad(loss_of(ref), argnums=(0, 1))(f64(p), f64(x))
    c.close("linear: grad with b replicated unlike W", g, ref_g)


# --------------------------------------------------------------------------------------
# FSDP and sequence parallelism: the all-gather / reduce-scatter adjoint pair.


def run_and_collectives(fn, *args):
    """``(jax.jit(fn)(*args), collectives)`` from one compilation; ``collectives`` flattened
    to sorted ``(opcode, element count)`` pairs (XLA may combine independent ops)."""
    compiled = jax.jit(fn).lower(*args).compile()
    ops = []
    for line in compiled.as_text().splitlines():
        line = line.split("metadata=")[0]
        m = COLLECTIVE.search(line)
        if m and "=" in line[: m.start()]:
            result_type = line[line.index("=") + 1 : m.start()]
            for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", result_type):
                ops.append((m.group(1), math.prod(int(d) for d in dims.split(",") if d)))
    return compiled(*args), sorted(ops)


def check_ops(c: Checker, name: str, ops, expected):
    """The compiled program runs exactly the collectives ``expected`` (opcode, result size)."""
    c.record(f"{name}: collectives {sorted(expected)}", ops == sorted(expected), 0.0, f"HLO: {ops}")


def check_fsdp_and_sequence(c: Checker, mesh2d, name: str, layer):
    """``fsdp_linear``, sequence-parallel and FSDP ``tensor_parallel_mlp`` against one device.

    Values and gradients equal single-device AD of plain ``x @ W + b`` (float64); ``dW``
    comes back sharded like ``W``; the forward HLO all-gathers and the backward adds the
    reduce-scatter (its adjoint), with no all-reduce of a ``W``-sized array.
    """
    n = mesh2d.size
    data_only = jax.make_mesh((n, 1), ("data", "model"), axis_types=mesh2d.axis_types)
    model_only = jax.make_mesh((n, 1), ("model", "data"), axis_types=mesh2d.axis_types)
    (p,), x = data(jax.random.key(20))

    def fsdp(p, x):
        return jaxlinear.fsdp_linear(p, x, mesh=data_only, axis="data", layer=layer)

    tag = f"{name} FSDP linear ({n} devices)"
    y, ops = run_and_collectives(fsdp, p, x)
    c.close(f"{tag}: forward == single device", y, ref_affine(f64(p), f64(x)))
    check_ops(c, f"{tag} forward: all-gather of W", ops, [("all-gather", D_IN * D_OUT)])
    grad = jax.grad(loss_of(fsdp), argnums=(0, 1))
    g, ops = run_and_collectives(grad, p, x)
    ref_g = jax.grad(loss_of(ref_affine), argnums=(0, 1))(f64(p), f64(x))
    c.close(f"{tag}: grad == single device", g, ref_g)
    c.record(
        f"{tag}: dW sharded like W",
        g[0].W.sharding.spec == P("data", None),
        0.0,
        f"{g[0].W.sharding.spec}",
    )
    # The shard is the residual: W gathered again in the backward pass (two all-gathers).
    expected = [("all-gather", D_IN * D_OUT)] * 2 + [("reduce-scatter", D_IN * D_OUT // n)]
    check_ops(
        c,
        f"{tag} grad: + all-gather of W again, reduce-scatter of dW, psum of db only",
        ops,
        [*expected, ("all-reduce", D_OUT)],
    )
    kept = jax.grad(
        loss_of(
            lambda p, x: jaxlinear.fsdp_linear(
                p, x, mesh=data_only, axis="data", layer=layer, residuals="gathered"
            )
        ),
        argnums=(0, 1),
    )
    g, ops = run_and_collectives(kept, p, x)
    c.close(f"{tag}, residuals='gathered': grad == single device", g, ref_g)
    check_ops(
        c,
        f"{tag}, residuals='gathered' grad: one all-gather, reduce-scatter, psum of db",
        ops,
        [expected[0], *expected[2:], ("all-reduce", D_OUT)],
    )

    layers, x = data(jax.random.key(21), (D_IN, HIDDEN, D_OUT))
    ref_g = jax.grad(loss_of(ref_mlp), argnums=(0, 1))

    def sp(layers, x):  # x: (tokens, d_in), the tokens sharded over all n devices
        return jaxlinear.tensor_parallel_mlp(
            layers, x, mesh=model_only, axis="model", sequence_dim=0, layer=layer
        )

    tag = f"{name} sequence-parallel MLP ({n} devices)"
    y, ops = run_and_collectives(sp, layers, x)
    c.close(f"{tag}: forward == single device", y, ref_mlp(f64(layers), f64(x)))
    fwd = [("all-gather", BATCH * D_IN), ("reduce-scatter", BATCH // n * D_OUT)]
    check_ops(c, f"{tag} forward: all-gather x, reduce-scatter Y", ops, fwd)
    g, ops = run_and_collectives(jax.grad(loss_of(sp), argnums=(0, 1)), layers, x)
    c.close(f"{tag}: grad == single device", g, ref_g(f64(layers), f64(x)))
    bwd = [("all-gather", BATCH * D_OUT), ("reduce-scatter", BATCH // n * D_IN)]
    bwd.append(("all-reduce", D_OUT))
    check_ops(c, f"{tag} grad: + all-gather G, reduce-scatter dX, psum db2", ops, fwd + bwd)

    n_data, n_model = mesh2d.shape["data"], mesh2d.shape["model"]
    x3 = jax.random.normal(jax.random.key(22), (n_data, 2 * n_model, D_IN), jnp.float32)

    def sp_fsdp(layers, x):  # x: (batch, seq, d_in); batch over "data", seq over "model"
        return jaxlinear.tensor_parallel_mlp(
            layers,
            x,
            mesh=mesh2d,
            axis="model",
            batch_axis="data",
            sequence_dim=1,
            fsdp=True,
            layer=layer,
        )

    tag = f"{name} sequence-parallel + FSDP MLP ({n_data}x{n_model})"
    y, _ = run_and_collectives(sp_fsdp, layers, x3)
    c.close(f"{tag}: forward == single device", y, ref_mlp(f64(layers), f64(x3)))
    g, ops = run_and_collectives(jax.grad(loss_of(sp_fsdp), argnums=(0, 1)), layers, x3)
    c.close(f"{tag}: grad == single device", g, ref_g(f64(layers), f64(x3)))
    specs = [(q.W.sharding.spec, q.b.sharding.spec) for q in g[0]]
    want = [(P("data", "model"), P("model")), (P(("model", "data"), None), P(None))]
    c.record(f"{tag}: dW1, dW2 sharded like W1, W2", specs == want, 0.0, f"{specs}")
    w_size = min(D_IN * HIDDEN, HIDDEN * D_OUT) // n_model
    big = [size for op, size in ops if op == "all-reduce" and size >= w_size]
    scatters = sorted(size for op, size in ops if op == "reduce-scatter")
    c.record(
        f"{tag} grad: dW1, dW2 reduce-scattered, no W-sized all-reduce",
        not big and w_size // n_data in scatters,
        0.0,
        f"HLO: {ops}",
    )


def check_fsdp_jvp_and_adjoint(c: Checker, mesh2d):
    """Forward mode through ``dual_linear`` in FSDP and sequence-parallel layouts, and the
    mesh-wide dot-product test: ``⟨u, J v⟩ = ⟨Jᵀ u, v⟩`` on sharded global arrays."""
    n = mesh2d.size
    data_only = jax.make_mesh((n, 1), ("data", "model"), axis_types=mesh2d.axis_types)
    (p,), x = data(jax.random.key(23))
    (dp,), dx = data(jax.random.key(24))

    def fsdp(p, x, layer=jaxlinear.dual_linear):
        return jaxlinear.fsdp_linear(p, x, mesh=data_only, axis="data", layer=layer)

    ours = jax.jit(lambda *a: jax.jvp(fsdp, a[:2], a[2:]))(p, x, dp, dx)
    ref = jax.jvp(ref_affine, (f64(p), f64(x)), (f64(dp), f64(dx)))
    c.close("dual_linear: jvp of fsdp_linear == single device", ours, ref)

    layers, x3 = data(jax.random.key(25), (D_IN, HIDDEN, D_OUT))
    dl, dx3 = data(jax.random.key(26), (D_IN, HIDDEN, D_OUT))
    x3, dx3 = (a.reshape(mesh2d.shape["data"], -1, D_IN) for a in (x3, dx3))

    def sp(layers, x):
        return jaxlinear.tensor_parallel_mlp(
            layers,
            x,
            mesh=mesh2d,
            batch_axis="data",
            sequence_dim=1,
            fsdp=True,
            layer=jaxlinear.dual_linear,
        )

    ours = jax.jit(lambda *a: jax.jvp(sp, a[:2], a[2:]))(layers, x3, dl, dx3)
    ref = jax.jvp(ref_mlp, (f64(layers), f64(x3)), (f64(dl), f64(dx3)))
    c.close("dual_linear: jvp of the sequence-parallel FSDP MLP == single device", ours, ref)

    # Dot-product test of the sharded layer's derivative at (p, x), run as is on global
    # arrays laid out on the mesh: J v by dual_linear's pushforward, Jᵀ u by linear's
    # pullback (the other binding), u = G sharded like Y.
    put = lambda a, s: jax.device_put(a, NamedSharding(data_only, s))  # noqa: E731
    specs = (Params(P("data", None), P()), P("data"))
    args = (Params(put(p.W, specs[0].W), put(p.b, specs[0].b)), put(x, specs[1]))
    v = (Params(put(dp.W, specs[0].W), put(dp.b, specs[0].b)), put(dx, specs[1]))
    u = put(jax.random.normal(jax.random.key(27), (BATCH, D_OUT), jnp.float32), P("data"))
    _, pull = jax.vjp(lambda *a: fsdp(*a, layer=jaxlinear.linear), *args)
    t = jaxlinear.adjoint_test(lambda v: jax.jvp(fsdp, args, v)[1], pull, v, u)
    c.record(
        "adjoint_test of fsdp_linear on sharded global arrays",
        float(t.residual) < 1e-5,
        float(t.residual),
        f"<u, Jv> = {float(t.lhs):.6g}, <Jᵀu, v> = {float(t.rhs):.6g}",
    )


def check_grad_values_float64(c: Checker, mesh, name: str, layer):
    """``jax.grad`` inside ``shard_map`` with replicated params *equals* JAX's AD, in value.

    Float64, params replicated and ``x`` sharded over every device: the gradient must be
    the one-device gradient of the plain map to rounding (1e-12), not just of the right
    type. Then the teeth: a backward rule whose cross-device sum is wrong is caught by
    value. (a) ``psum`` replaced by ``pmean`` (well typed, off by the device count);
    (b) no sum at all: with ``check_vma=False`` nothing is typed, so no rule sums and each
    device returns its partial gradient; it differs from the true one, and the partials
    summed over the devices are it; (c) with ``check_vma=True`` a rule that skips the psum
    is refused by JAX's type check, the only line of defence before this check.
    """
    (p,), x = data(jax.random.key(9))
    p, x = jax.tree.map(lambda a: a.astype(jnp.float64), (p, x))
    axes = tuple(mesh.axis_names)
    put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
    p_, x_ = put(p, P()), put(x, P(axes))
    expected = jax.grad(loss_of(ref_affine), argnums=(0, 1))(p, x)  # one device, float64

    def grad_in_shard_map(check_vma=True, stack_params=False):
        def body(p, x):  # p replicated, x: this device's slice of the batch
            dp, dx = jax.grad(loss_of(layer), argnums=(0, 1))(p, x)
            return (jax.tree.map(lambda a: a[None], dp) if stack_params else dp), dx

        specs = (P(axes) if stack_params else P(), P(axes))
        return jax.jit(
            jax.shard_map(
                body, mesh=mesh, in_specs=(P(), P(axes)), out_specs=specs, check_vma=check_vma
            )
        )(p_, x_)

    def worst(actual, reference):  # the residual of Checker.close
        pairs = zip(jax.tree.leaves(f64(actual)), jax.tree.leaves(f64(reference)), strict=True)
        return max(np.max(np.abs(a - e)) / max(1.0, np.max(np.abs(e))) for a, e in pairs)

    tag = f"{name} float64 grad in shard_map"
    c.close(
        f"{tag} == one-device AD of plain x @ W + b (value)", grad_in_shard_map(), expected, 1e-12
    )

    original = vma.psum_to

    def pmean_to(ct, primal):  # the mutant of (a): the mean where the sum belongs
        axes_ = vma.varying_axes(ct) - vma.varying_axes(primal) if ct is not None else ()
        return lax.pmean(ct, tuple(sorted(axes_, key=str))) if axes_ else ct

    try:
        vma.psum_to = pmean_to
        r = worst(grad_in_shard_map(), expected)
        c.record(f"{tag}: a rule with pmean instead of psum is caught by value", r > 0.1, r)
        vma.psum_to = lambda ct, primal: ct  # (c): no sum at all, check_vma=True
        refused, note = False, "it ran"
        try:
            grad_in_shard_map()
        except Exception as e:  # JAX's type error for a cotangent of the wrong type
            refused, note = True, f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
        c.record(f"{tag}: a rule without psum is refused by JAX's type check", refused, 0, note)
    finally:
        vma.psum_to = original
    partial = grad_in_shard_map(check_vma=False)  # (b): device 0's partial dW, db
    r = worst(partial[0], expected[0])
    c.record(f"{tag}: the per-device partial gradient (no psum) is caught by value", r > 0.1, r)
    stacked = grad_in_shard_map(check_vma=False, stack_params=True)[0]
    c.close(
        f"{tag}: the partials summed over devices == the gradient",
        jax.tree.map(lambda a: a.sum(0), stacked),
        expected[0],
        1e-12,
    )


def check_per_example_data_parallel(c: Checker, n: int):
    """``clipped_grad`` under ``jit`` with the batch sharded over every device (Auto and
    Explicit axes), a conv + dense model in both bindings: the norms stay sharded like
    the examples and the compiled program's only collective is the all-reduce of the
    clipped gradient (no all-gather of activations or cotangents); values against
    ``vmap(grad)`` of plain ``lax``/``x @ W + b`` on one device, float64."""
    rng = np.random.default_rng(11)
    params = {
        "conv": Params(rng.normal(size=(3, 3, 2, 3)) / 4, rng.normal(size=3) / 4),
        "lin": Params(rng.normal(size=(3 * 36, 4)) / 10, rng.normal(size=4) / 4),
    }
    x, y = rng.normal(size=(2 * n, 6, 6, 2)), rng.normal(size=(2 * n, 4))

    def loss(p, x, y, conv=jaxlinear.conv, lin=jaxlinear.linear):
        h = jnp.tanh(conv(p["conv"], x))
        return jnp.sum((lin(p["lin"], h.reshape(h.shape[0], -1)) - y) ** 2, axis=1)

    def plain_conv(p, x):
        y = lax.conv_general_dilated(
            x, p.W, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y + p.b[(None,) * 3]

    plain = functools.partial(loss, conv=plain_conv, lin=ref_affine)
    per_example = jax.vmap(
        lambda x, y: jax.grad(lambda p: plain(p, x[None], y[None])[0])(f64(params))
    )(*f64((x, y)))
    norms = np.sqrt(
        sum(np.sum(np.reshape(a, (2 * n, -1)) ** 2, 1) for a in jax.tree.leaves(per_example))
    )
    factors = np.minimum(1.0, 1.0 / norms)
    want = jax.tree.map(lambda a: np.tensordot(factors, a, 1), per_example)
    sizes = sorted(int(np.size(a)) for a in jax.tree.leaves(params))
    params32, x32, y32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), (params, x, y))
    for types in ((AxisType.Auto,), (AxisType.Explicit,)):
        mesh = jax.make_mesh((n,), ("data",), axis_types=types)
        rows = NamedSharding(mesh, P("data"))
        args = (
            jax.device_put(params32, NamedSharding(mesh, P())),
            jax.device_put(x32, rows),
            jax.device_put(y32, rows),
        )
        for name, ops in (
            ("", {}),
            (" dual", dict(conv=jaxlinear.dual_conv, lin=jaxlinear.dual_linear)),
        ):
            step = jax.jit(
                lambda p, x, y, ops=ops: jaxlinear.clipped_grad(
                    functools.partial(loss, **ops), p, x, y, clip_norm=1.0, fallback="raise"
                )
            )
            tag = f"per-example clipping, batch over {n} devices ({types[0].name}{name})"
            with jax.set_mesh(mesh):
                grads, got = step(*args)
                ops_found = collectives(step, *args)
            c.close(f"{tag}: norms", got, norms, TOL)
            c.close(f"{tag}: clipped gradient", grads, want, TOL)
            c.record(f"{tag}: norms sharded like the examples", got.sharding.spec == P("data"), 0.0)
            carried = sorted(k for op, counts in ops_found for k in counts)
            only = all(op == "all-reduce" for op, _ in ops_found) and carried == sizes
            c.record(
                f"{tag}: only the clipped gradient is all-reduced", only, 0.0, f"HLO: {ops_found}"
            )


def check_per_example_tied(c: Checker, n: int):
    """``clipped_grad`` with the batch sharded, of a model with an embedding tied to its
    logits and a weight shared by two layers: the Gram over the calls' rows and the
    per-example sum of their ``w̄_{k,i}`` (forced), on Auto and Explicit axes; values
    against ``vmap(grad)`` in float64, the only collective the clipped gradient's
    all-reduce: once per call (XLA:CPU all-reduces each call's ``B_wᵀ(c ⊙ g_k; x_k)``
    before their sum, so a tied leaf's bytes cross twice here)."""
    from jaxlinear._src import ghost

    rng = np.random.default_rng(12)
    params = {"E": rng.normal(size=(7, 4)), "W": rng.normal(size=(4, 4)) / 2}
    ids = rng.integers(0, 7, size=(2 * n, 3))

    def loss(p, ids):
        h = jnp.tanh(jnp.tanh(jaxlinear.embed(p["E"], ids) @ p["W"]) @ p["W"])
        return jnp.sum(jax.nn.log_softmax(h @ p["E"].T)[..., 0], axis=1)

    per_example = jax.vmap(lambda i: jax.grad(lambda p: loss(p, i[None])[0])(f64(params)))(ids)
    norms = np.sqrt(sum(np.sum(np.reshape(a, (2 * n, -1)) ** 2, 1)
                        for a in jax.tree.leaves(per_example)))  # fmt: skip
    want = jax.tree.map(lambda a: np.tensordot(np.minimum(1.0, 1.0 / norms), a, 1), per_example)
    sizes = sorted(2 * [int(np.size(a)) for a in jax.tree.leaves(params)])  # (two calls each)
    params32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    keeps, pays = ghost.keeps, ghost.tied_gram_pays
    try:
        ghost.keeps = lambda *_: False
        for route in ("gram", "per_example"):
            ghost.tied_gram_pays = lambda *_, route=route: route == "gram"
            for types in ((AxisType.Auto,), (AxisType.Explicit,)):
                mesh = jax.make_mesh((n,), ("data",), axis_types=types)
                args = (jax.device_put(params32, NamedSharding(mesh, P())),
                        jax.device_put(ids, NamedSharding(mesh, P("data"))))  # fmt: skip
                step = jax.jit(lambda p, i: jaxlinear.clipped_grad(
                    loss, p, i, clip_norm=1.0, fallback="raise"))  # fmt: skip
                tag = f"tied leaves' {route} route, batch over {n} devices ({types[0].name})"
                with jax.set_mesh(mesh):
                    grads, got = step(*args)
                    ops_found = collectives(step, *args)
                    routes = {r.route for r in jaxlinear.per_example_routes(loss, *args)}
                c.record(f"{tag}: routes", routes == {route}, 0.0, str(routes))
                c.close(f"{tag}: norms", got, norms, TOL)
                c.close(f"{tag}: clipped gradient", grads, want, TOL)
                carried = sorted(k for op, counts in ops_found for k in counts)
                only = all(op == "all-reduce" for op, _ in ops_found) and carried == sizes
                c.record(f"{tag}: only the clipped gradient is all-reduced (per call)", only,
                         0.0, f"HLO: {ops_found}")  # fmt: skip
    finally:
        ghost.keeps, ghost.tied_gram_pays = keeps, pays


# --------------------------------------------------------------------------------------
# FSDP residuals: the shard saved, the weight gathered again in the backward pass.


def _collective_sizes(compiled):
    """``[(opcode, element count)]`` of every array a compiled program's collectives return."""
    return sorted(
        (m.group(1), math.prod(int(d) for d in dims.split(",") if d))
        for line in compiled.as_text().splitlines()
        for m in [COLLECTIVE.search(line.split("metadata=")[0])]
        if m and "=" in line[: m.start()]
        for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", line[line.index("=") + 1 : m.start()])
    )


def _family_fsdp_cases():
    """``(name, custom_vjp f, dual f, reference, x, w, w's sharded dim)``: every op of the
    family, its weight's ``dim`` of size 8 (sharded over the devices), ``x``'s axis 0 the
    batch (sharded too). ``f(x, w)`` takes the whole ``w`` (marked by ``fsdp_gather``)."""
    rng = np.random.default_rng(25)
    normal = lambda *shape: rng.normal(size=shape)  # noqa: E731
    dn_dot = (((1, 2), (1, 0)), ((), ()))
    conv_kw = dict(
        window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    ct_kw = dict(strides=(2,), padding="SAME")
    return [
        ("linear", lambda x, w: jaxlinear.linear((w, None), x),
         lambda x, w: jaxlinear.dual_linear((w, None), x), lambda x, w: x @ w,
         normal(16, 8), normal(8, 4), 0),
        ("dot_general", lambda x, w: jaxlinear.dot_general(x, w, dn_dot),
         lambda x, w: jaxlinear.dual_dot_general(x, w, dn_dot),
         lambda x, w: lax.dot_general(x, w, dn_dot), normal(16, 3, 8), normal(8, 3, 5), 0),
        ("einsum", lambda x, w: jaxlinear.einsum("btd,dhk->bthk", x, w),
         lambda x, w: jaxlinear.dual_einsum("btd,dhk->bthk", x, w),
         lambda x, w: jnp.einsum("btd,dhk->bthk", x, w), normal(16, 2, 8), normal(8, 2, 3), 0),
        ("conv", lambda x, w: jaxlinear.conv_general_dilated(x, w, **conv_kw),
         lambda x, w: jaxlinear.dual_conv_general_dilated(x, w, **conv_kw),
         lambda x, w: lax.conv_general_dilated(x, w, **conv_kw),
         normal(16, 5, 5, 2), normal(3, 3, 2, 8), 3),
        ("conv_transpose", lambda x, w: jaxlinear.conv_transpose(x, w, **ct_kw),
         lambda x, w: jaxlinear.dual_conv_transpose(x, w, **ct_kw),
         lambda x, w: lax.conv_transpose(x, w, **ct_kw), normal(16, 4, 3), normal(2, 3, 8), 2),
        ("embed", lambda ids, t: jaxlinear.embed(t, ids),
         lambda ids, t: jaxlinear.dual_embed(t, ids), lambda ids, t: t[ids],
         rng.integers(0, 8, size=(16, 3)), normal(8, 4), 0),
    ]  # fmt: skip


def check_fsdp_family(c: Checker, n: int):
    """Every op of the family, both bindings, its weight marked by ``fsdp_gather`` inside
    ``shard_map`` (weight and batch sharded over all ``n`` devices): value and gradients
    equal one-device JAX AD of the plain ``lax``/``jnp`` op (float64, 1e-12), and the
    gradient program gathers the weight twice (forward, backward: the shard is the
    residual) and reduce-scatters its gradient once, with no weight-sized all-reduce.
    ``embed``'s backward pass never reads the table: one gather."""
    mesh = jax.make_mesh((n,), ("data",))
    for name, f_vjp, f_dual, ref, x, w, dim in _family_fsdp_cases():
        w_spec = P(*("data" if i == dim else None for i in range(w.ndim)))
        put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
        xs, ws = put(x, P("data")), put(w, w_spec)
        diff_x = np.issubdtype(x.dtype, np.floating)
        argnums = (0, 1) if diff_x else (1,)
        want_y = ref(x, w)
        want_g = jax.grad(lambda x, w, ref=ref: jnp.sum(jnp.sin(ref(x, w))), argnums=argnums)(x, w)
        w_size = w.size
        for binding, f in (("custom_vjp", f_vjp), ("dual", f_dual)):

            def body(x, w, f=f, dim=dim):
                return f(x, jaxlinear.fsdp_gather(w, "data", dim=dim))

            sm = jax.shard_map(body, mesh=mesh, in_specs=(P("data"), w_spec), out_specs=P("data"))
            grad = jax.grad(lambda x, w, sm=sm: jnp.sum(jnp.sin(sm(x, w))), argnums=argnums)
            tag = f"FSDP {name} ({binding}, {n} devices, fsdp_gather)"
            both = lambda x, w, sm=sm, grad=grad: (sm(x, w), grad(x, w))  # noqa: E731
            compiled = jax.jit(both).lower(xs, ws).compile()
            y, got = compiled(xs, ws)  # one program: Y and the gradients
            c.close(f"{tag}: forward == one device (float64)", y, want_y, 1e-12)
            c.close(f"{tag}: grad == one-device AD (float64)", got, want_g, 1e-12)
            c.record(
                f"{tag}: w̄ sharded like w", got[-1].sharding.spec == w_spec, 0.0,
                f"{got[-1].sharding.spec}",
            )  # fmt: skip
            ops = _collective_sizes(compiled)
            gathers = [k for op, k in ops if op == "all-gather" and k == w_size]
            scatters = [k for op, k in ops if op == "reduce-scatter" and k == w_size // n]
            big = [k for op, k in ops if op == "all-reduce" and k >= w_size // n]
            want = 1 if name == "embed" else 2
            c.record(
                f"{tag}: {want} all-gather(s) of w, 1 reduce-scatter of w̄, no w-sized all-reduce",
                len(gathers) == want and len(scatters) == 1 and not big,
                0.0,
                f"HLO: {ops}",
            )


def _mlp_grad(f, layers, x):
    """``jax.grad`` of an 8-layer-style tanh MLP made of ``f(p, h)``, compiled."""

    def loss(layers, x):
        h = x
        for p in layers:
            h = jnp.tanh(f(p, h))
        return jnp.sum(h**2)

    return jax.jit(jax.grad(loss)).lower(layers, x).compile()


def check_fsdp_memory(c: Checker, n: int):
    """``memory_analysis()`` of a tanh MLP's gradient (L layers, ``W: (d, d)``, float32)
    with weights and batch sharded over ``n`` devices: with the shard as residual, at
    most two gathered weights are live (temp ≤ 2·|W| + activations); keeping the gathered
    weights holds all L of them. The same under plain ``jit`` (``fsdp_gather(spec=)``) on
    Auto and Explicit meshes. Bytes, not time."""
    L, d, tokens = 4, 256, 8 * n
    rng = np.random.default_rng(26)
    layers = [
        Params(
            jnp.asarray(rng.normal(size=(d, d)) / d**0.5, jnp.float32),
            jnp.asarray(rng.normal(size=d), jnp.float32),
        )
        for _ in range(L)
    ]
    x = jnp.asarray(rng.normal(size=(tokens, d)), jnp.float32)
    W_bytes, act = d * d * 4, (tokens // n) * d * 4  # one gathered W; one local activation
    bound = 2 * W_bytes + 4 * L * act
    data = jax.make_mesh((n,), ("data",))
    temps = {}
    for residuals in ("gathered", "shard"):
        compiled = _mlp_grad(
            lambda p, h, r=residuals: jaxlinear.fsdp_linear(p, h, mesh=data, residuals=r),
            layers,
            x,
        )
        temps[residuals] = compiled.memory_analysis().temp_size_in_bytes
        ops = _collective_sizes(compiled)
        n_gather = sum(op == "all-gather" and k == d * d for op, k in ops)
        n_scatter = sum(op == "reduce-scatter" and k == d * d // n for op, k in ops)
        big = [k for op, k in ops if op == "all-reduce" and k >= d * d // n]
        # The shard as residual: L gathers forward, L (or L - 1: XLA may reuse the last
        # layer's, still live) backward; the gathered W kept: L.
        want = (2 * L - 1, 2 * L) if residuals == "shard" else (L,)
        c.record(
            f"FSDP {L}-layer MLP, residuals={residuals!r}: all-gathers {n_gather} in {want},"
            f" {L} reduce-scatters, no W-sized all-reduce",
            n_gather in want and n_scatter == L and not big,
            0.0,
            f"HLO: {ops}",
        )
    c.record(
        f"FSDP {L}-layer MLP (d={d}, {n} devices): temp {temps['shard'] / 2**20:.2f} MiB with"
        f" the shard as residual ≤ 2·|W| + activations = {bound / 2**20:.2f} MiB",
        temps["shard"] <= bound,
        0.0,
    )
    c.record(
        f"FSDP {L}-layer MLP: residuals='gathered' holds every gathered W"
        f" ({temps['gathered'] / 2**20:.2f} MiB ≥ {L}·|W|)",
        temps["gathered"] >= L * W_bytes,
        0.0,
    )
    ref_g = jax.grad(
        lambda layers, x: jnp.sum(
            functools.reduce(lambda h, p: jnp.tanh(ref_affine(p, h)), layers, x) ** 2
        )
    )(f64(layers), f64(x))
    for types in ((AxisType.Auto,), (AxisType.Explicit,)):
        mesh = jax.make_mesh((n,), ("data",), axis_types=types)
        put = lambda a, s, mesh=mesh: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
        sharded = [Params(put(p.W, P("data", None)), put(p.b, P())) for p in layers]
        xs = put(x, P("data"))

        def layer(p, h):
            return jaxlinear.linear((jaxlinear.fsdp_gather(p.W, "data", spec=P("data")), p.b), h)

        tag = f"FSDP under plain jit ({types[0].name} axes, fsdp_gather(spec=))"
        with jax.set_mesh(mesh):
            compiled = _mlp_grad(layer, sharded, xs)
            plain = _mlp_grad(ref_affine, sharded, xs)
            g = compiled(sharded, xs)
        temp = compiled.memory_analysis().temp_size_in_bytes
        c.close(f"{tag}: grad == one device", g, ref_g)
        specs = {q.W.sharding.spec for q in g}
        c.record(f"{tag}: dW sharded like W", specs == {P("data", None)}, 0.0, f"{specs}")
        ops = _collective_sizes(compiled)
        big = [k for op, k in ops if op == "all-reduce" and k >= d * d // n]
        n_scatter = sum(op == "reduce-scatter" and k == d * d // n for op, k in ops)
        c.record(
            f"{tag}: temp {temp / 2**20:.2f} MiB ≤ {bound / 2**20:.2f} MiB (plain x @ W:"
            f" {plain.memory_analysis().temp_size_in_bytes / 2**20:.2f} MiB); {L}"
            " reduce-scatters, no W-sized all-reduce",
            temp <= bound and n_scatter == L and not big,
            0.0,
            f"HLO: {ops}",
        )


def check_clipped_grad_fsdp(c: Checker, n: int):
    """DP-SGD on FSDP-sharded weights (the guide's recipe): inside ``shard_map`` over the
    batch axis, gather the weights, ``clipped_grad`` on the device's examples, and
    reduce-scatter the clipped gradient. Norms are per example, local; the gradient comes
    back sharded like the weights; no weight-sized all-reduce. Values against ``vmap`` of
    ``grad`` of the plain model on one device, float64."""
    rng = np.random.default_rng(27)
    sizes = (16, 32, 8)
    params = [
        Params(rng.normal(size=(a, b)) / a**0.5, rng.normal(size=b))
        for a, b in itertools.pairwise(sizes)
    ]
    x, y = rng.normal(size=(2 * n, sizes[0])), rng.normal(size=(2 * n, sizes[-1]))

    def loss(p, x, y, lin=jaxlinear.linear):
        return jnp.sum((lin(p[1], jnp.tanh(lin(p[0], x))) - y) ** 2, axis=-1)

    per_example = jax.vmap(
        lambda x, y: jax.grad(lambda p: loss(p, x[None], y[None], ref_affine)[0])(params)
    )(x, y)
    norms = np.sqrt(
        sum(np.sum(np.reshape(a, (2 * n, -1)) ** 2, 1) for a in jax.tree.leaves(per_example))
    )
    want = jax.tree.map(lambda a: np.tensordot(np.minimum(1.0, 1.0 / norms), a, 1), per_example)
    specs = [Params(P("data", None), P())] * len(params)

    def step(p, x, y):  # this device's rows of every W, and its examples
        whole = [q._replace(W=lax.all_gather(q.W, "data", axis=0, tiled=True)) for q in p]
        g, norms = jaxlinear.clipped_grad(loss, whole, x, y, clip_norm=1.0, fallback="raise")
        g = [  # dW: this device's rows of the sum over every device's examples
            Params(lax.psum_scatter(q.W, "data", tiled=True), lax.psum(q.b, "data")) for q in g
        ]
        return g, norms

    for types in ((AxisType.Auto,), (AxisType.Explicit,)):
        mesh = jax.make_mesh((n,), ("data",), axis_types=types)
        put = lambda a, s, mesh=mesh: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
        args = (
            [Params(put(q.W, P("data", None)), put(q.b, P())) for q in params],
            put(x, P("data")),
            put(y, P("data")),
        )
        f = jax.jit(
            jax.shard_map(
                step,
                mesh=mesh,
                in_specs=(specs, P("data"), P("data")),
                out_specs=(specs, P("data")),
            )
        )
        compiled = f.lower(*args).compile()
        g, got = compiled(*args)
        tag = f"clipped_grad on FSDP-sharded weights ({types[0].name} axes, {n} devices)"
        c.close(f"{tag}: norms == vmap(grad) on one device", got, norms, 1e-12)
        c.close(f"{tag}: clipped gradient == one device", g, want, 1e-12)
        c.record(
            f"{tag}: dW sharded like W", all(q.W.sharding.spec == P("data", None) for q in g), 0.0
        )
        ops = _collective_sizes(compiled)
        w_min = min(a * b for a, b in itertools.pairwise(sizes))
        big = [k for op, k in ops if op == "all-reduce" and k >= w_min]
        scattered = sorted(k for op, k in ops if op == "reduce-scatter")
        c.record(
            f"{tag}: dW reduce-scattered, no weight-sized all-reduce",
            not big and scattered == sorted(a * b // n for a, b in itertools.pairwise(sizes)),
            0.0,
            f"HLO: {ops}",
        )  # fmt: skip


def check_fsdp_nnx(c: Checker, n: int):
    """A whole Flax NNX model, its kernels annotated ``nnx.with_partitioning`` over
    ``"data"``, under plain ``jit`` on an Explicit mesh: ``jaxlinear.nnx.explicit`` and
    ``fsdp_gather_tree`` inside the loss give the gradients of the plain NNX model,
    sharded like the kernels, with each kernel gathered again in the backward pass (the
    last layer's may be reused) and reduce-scattered."""
    try:
        from flax import nnx
    except ImportError:
        c.record("FSDP NNX model [flax not installed: skipped]", True)
        return
    import jaxlinear.nnx as jnnx

    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("data", None))

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(16, 32, kernel_init=init, rngs=rngs)
            self.l2 = nnx.Linear(32, 16, kernel_init=init, rngs=rngs)
            self.l3 = nnx.Linear(16, 8, kernel_init=init, rngs=rngs)

        def __call__(self, x):
            return self.l3(jnp.tanh(self.l2(jnp.tanh(self.l1(x)))))

    mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Explicit,))
    x = jax.random.normal(jax.random.key(28), (2 * n, 16), jnp.float32)
    is_spec = lambda s: s is None or isinstance(s, P)  # noqa: E731
    grads = {}
    with jax.set_mesh(mesh):
        for mode in ("plain", "fsdp"):
            model = Model(nnx.Rngs(0))
            if mode == "fsdp":
                jnnx.explicit(model)
            graphdef, state = nnx.split(model)
            specs = nnx.get_partition_spec(state)
            state = jax.tree.map(
                lambda v, s: jax.device_put(v, NamedSharding(mesh, s or P())),
                state,
                specs,
                is_leaf=is_spec,
            )

            def loss(state, x, mode=mode, graphdef=graphdef, specs=specs):
                if mode == "fsdp":
                    state = jaxlinear.fsdp_gather_tree(state, specs, "data")
                return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x)))

            xs = jax.device_put(x, NamedSharding(mesh, P("data")))
            compiled = jax.jit(jax.grad(loss)).lower(state, xs).compile()
            grads[mode] = compiled(state, xs)
            ops = _collective_sizes(compiled)
    tag = f"FSDP NNX model under jit ({n} devices, explicit + fsdp_gather_tree)"
    c.close(f"{tag}: grads == the plain NNX model's", grads["fsdp"], grads["plain"])
    kernels = [v for v in jax.tree.leaves(grads["fsdp"]) if v.ndim == 2]
    c.record(
        f"{tag}: kernels' grads sharded like the kernels",
        all(v.sharding.spec == P("data", None) for v in kernels),
        0.0,
    )
    sizes = [16 * 32, 32 * 16, 16 * 8]
    gathers = sorted(k for op, k in ops if op == "all-gather" and k in sizes)
    scatters = sorted(k for op, k in ops if op == "reduce-scatter")
    c.record(
        f"{tag}: kernels gathered again in the backward pass, reduce-scattered",
        len(gathers) >= 2 * len(sizes) - 1 and scatters == sorted(k // n for k in sizes),
        0.0,
        f"HLO: {ops}",
    )


def check_fsdp_jit_2d(c: Checker, mesh2d):
    """``fsdp_gather(spec=)`` under plain ``jit`` on a 2-D mesh, ``W`` sharded over both
    axes (FSDP over ``"data"`` × tensor parallel over ``"model"``), Auto and Explicit axes:
    gradients equal one device and come back laid out like ``W``. (On Explicit axes the op
    keeps the gathered weight: jax 0.10 cannot lower the reduce-scatter there.)"""
    (p,), x = data(jax.random.key(29))
    ref_g = jax.grad(loss_of(ref_affine), argnums=(0, 1))(f64(p), f64(x))
    spec = P("data", "model")
    for types in ((AxisType.Auto,) * 2, (AxisType.Explicit,) * 2):
        mesh = jax.make_mesh(tuple(mesh2d.shape.values()), ("data", "model"), axis_types=types)
        put = lambda a, s, mesh=mesh: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731

        def layer(p, x, spec=spec):
            return jaxlinear.linear((jaxlinear.fsdp_gather(p.W, "data", spec=spec), p.b), x)

        tag = f"FSDP x tensor parallel under jit ({types[0].name} axes, W {spec})"
        with jax.set_mesh(mesh):
            args = (Params(put(p.W, spec), put(p.b, P("model"))), put(x, P("data")))
            g = jax.jit(jax.grad(loss_of(layer), argnums=(0, 1)))(*args)
        c.close(f"{tag}: grad == one device", g, ref_g)
        c.record(f"{tag}: dW laid out like W", g[0].W.sharding.spec == spec, 0.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expect-devices", type=int, default=None)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)  # float64 references (as tests/conftest.py)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 on GPUs

    devices = jax.devices()
    n = len(devices)
    print(f"jax {jax.__version__}, {n} device(s): {devices[0].platform} {devices[0].device_kind}")
    c = Checker()
    if args.expect_devices is not None and n != args.expect_devices:
        c.record(f"expected {args.expect_devices} devices, found {n}", False, np.inf)
        return 1
    shape = (n // 2, 2) if n % 2 == 0 else (n, 1)
    explicit = jax.make_mesh(shape, ("data", "model"))  # jax's default axis types
    auto = jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    model_only = jax.make_mesh((n, 1), ("model", "data"))  # every device on "model"
    print(f"meshes: {dict(explicit.shape)} {explicit.axis_types}, {dict(model_only.shape)}")

    c.run("varying axes", check_reads_varying_axes, model_only)
    for name, layer in LAYERS.items():
        c.run(f"{name} layouts", check_layouts, model_only, explicit, name, layer)
        for check_vma in (True, False):
            c.run(
                f"{name} grad in shard_map",
                check_grad_inside_shard_map,
                explicit,
                name,
                layer,
                check_vma,
            )
        c.run(f"{name} jit", check_jit_named_sharding, auto, name, layer)
        c.run(f"{name} jit explicit", check_jit_named_sharding, explicit, name, layer)
    for name, layer in LAYERS.items():
        c.run(f"{name} fsdp/sequence", check_fsdp_and_sequence, explicit, name, layer)
    c.run("fsdp jvp, adjoint", check_fsdp_jvp_and_adjoint, explicit)
    c.run("jvp", check_jvp, model_only)
    c.run("b unlike W", check_b_unlike_W, model_only)
    for name, layer in LAYERS.items():
        c.run(f"{name} grad values", check_grad_values_float64, explicit, name, layer)

    c.run("per-example data parallel", check_per_example_data_parallel, n)
    c.run("per-example tied leaves", check_per_example_tied, n)
    c.run("FSDP family", check_fsdp_family, n)
    c.run("FSDP memory", check_fsdp_memory, n)
    c.run("clipped_grad FSDP", check_clipped_grad_fsdp, n)
    c.run("FSDP NNX", check_fsdp_nnx, n)
    c.run("FSDP jit 2-D", check_fsdp_jit_2d, explicit)

    failed = [name for name, passed, _ in c.results if not passed]
    print(f"{len(c.results) - len(failed)}/{len(c.results)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
