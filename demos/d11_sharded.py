"""Many devices: the adjoint of *replicate* is *sum across devices* (psum), as bias and batch."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlinear
from demos._common import Check, Context, affine

NAME = "sharded"
N_DEVICES = 8
_MARK = "@@checks@@ "  # the child run's last line: its checks as JSON
_OP = re.compile(
    r"\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
)


def run(ctx: Context):
    # JAX fixes its devices when it starts. On one machine with one CPU, XLA can pretend to
    # have 8 (XLA_FLAGS=--xla_force_host_platform_device_count=8), but only if the flag is
    # set before JAX starts: so if this Python already runs with fewer devices, the demo
    # runs itself again in a fresh Python and reports what that run printed and checked.
    if len(jax.devices()) < N_DEVICES:
        return _rerun_with_simulated_devices(ctx)
    return _demo(ctx)


def _demo(ctx: Context):
    # -- the mesh --------------------------------------------------------------------------
    # Eight devices in a 4 × 2 grid: "data" splits the batch, "model" splits the layer.
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    ctx.say(f"  devices: {len(jax.devices())} × {jax.devices()[0].platform}")
    ctx.say(f"  mesh: {dict(mesh.shape)}, axis types {mesh.axis_types}")
    ctx.say("  device ids:\n    " + str(mesh.device_ids).replace("\n", "\n    "))

    n, d_in, h, d_out = 8, 4, 6, 2
    rng = np.random.default_rng(11)  # NumPy draws: no compilation per shape

    def normal_like(tree):
        return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), tree)

    p1, p2 = normal_like(
        [
            jaxlinear.Params(jnp.zeros((d_in, h)), jnp.zeros(h)),
            jaxlinear.Params(jnp.zeros((h, d_out)), jnp.zeros(d_out)),
        ],
    )
    X, T = normal_like((jnp.zeros((n, d_in)), jnp.zeros((n, h))))

    def put(a, spec):
        """Lay ``a`` out on the mesh as ``spec`` says (a spec, or a pytree of them)."""
        shardings = jax.tree.map(
            lambda s: NamedSharding(mesh, s), spec, is_leaf=lambda s: isinstance(s, P)
        )
        return jax.device_put(a, shardings)

    def loss(f):
        return lambda p, x: 0.5 * jnp.sum((f(p, x) - T) ** 2)

    ref_grad = jax.grad(loss(lambda p, x: affine(x, p.W, p.b)), argnums=(0, 1))(p1, X)

    # -- 1. data parallel: W replicated, x split over the batch ------------------------------
    # Each "data" row of the mesh holds 2 of the 8 examples and the whole W and b. The
    # forward pass needs no communication: Y_k = X_k W + b on every device.
    #
    # The backward pass: dW = Xᵀ G = Σ_k X_kᵀ G_k, a sum of per-device pieces. It is the
    # identity of demo 7 (the batch gradient is the sum of per-example gradients), with
    # devices in place of examples. Check it on the numbers first:
    G = affine(X, p1.W, p1.b) - T  # (n, h): the upstream gradient of the loss
    pieces = [Xk.T @ Gk for Xk, Gk in zip(jnp.split(X, 4), jnp.split(G, 4), strict=True)]
    ctx.close("Σ_k X_kᵀ G_k over the 4 batch shards = Xᵀ G", sum(pieces), X.T @ G)

    # W was *replicated*: one copy per device, v -> (v, v, v, v). The adjoint of replicating
    # is summing, (u_1, ..., u_4) -> Σ u_k: the psum across the "data" devices. The same
    # duality as the bias: broadcast over the batch forward, sum over the batch backward.
    def dp(p, x):
        return jaxlinear.data_parallel_linear(p, x, mesh=mesh, axis="data")

    p_rep, x_data = put(p1, P()), put(X, P("data"))
    Y = jax.jit(dp)(p_rep, x_data)
    ctx.say(f"  x {x_data.sharding.spec}, W {p_rep.W.sharding.spec} -> Y {Y.sharding.spec}")
    ctx.close("data parallel: Y equals the single-device Y", Y, affine(X, p1.W, p1.b))
    grad = jax.grad(loss(dp), argnums=(0, 1))
    g = jax.jit(grad)(p_rep, x_data)
    ctx.say(f"  dW {g[0].W.sharding.spec} (replicated, like W), dx {g[1].sharding.spec}")
    ctx.close("data parallel: gradients equal the single-device gradients", g, ref_grad)
    ops = _collectives(ctx, "data parallel, forward", dp, mesh, p_rep, x_data)
    ctx.check("  forward: no collectives", not ops)
    ops = _collectives(ctx, "data parallel, forward + backward", grad, mesh, p_rep, x_data)
    ctx.check(
        "  backward: one psum over 'data' carrying dW and db (sizes d_in·h and h)",
        _summary(ops) == [("all-reduce", "data", sorted([d_in * h, h]))],
    )

    # -- 2. column parallel: W split by columns, x replicated over "model" ------------------
    # Device k of each "model" pair holds W_k = W[:, k-th half] and computes Y_k = X W_k + b_k:
    # its half of Y's columns. Forward: no communication. Now it is x that is replicated
    # (over "model"), so its cotangent is a sum: dX = Σ_k G_k W_kᵀ, a psum over "model"
    # (Megatron's "f"). And W, b are still replicated over "data": a psum of dW, db there.
    def col(p, x):
        return jaxlinear.column_parallel_linear(p, x, mesh=mesh, axis="model", batch_axis="data")

    p_col = put(p1, jaxlinear.Params(P(None, "model"), P("model")))
    Y = jax.jit(col)(p_col, x_data)
    ctx.say(f"  x {x_data.sharding.spec}, W {p_col.W.sharding.spec} -> Y {Y.sharding.spec}")
    ctx.close("column parallel: Y equals the single-device Y", Y, affine(X, p1.W, p1.b))
    grad = jax.grad(loss(col), argnums=(0, 1))
    ctx.close("column parallel: gradients equal", jax.jit(grad)(p_col, x_data), ref_grad)
    ops = _collectives(ctx, "column parallel, forward + backward", grad, mesh, p_col, x_data)
    ctx.check(
        "  backward: psum of dX over 'model' (x was replicated there), dW, db over 'data'",
        _summary(ops)
        == [
            ("all-reduce", "data", sorted([d_in * h // 2, h // 2])),
            ("all-reduce", "model", [n // 4 * d_in]),
        ],
    )

    # -- 3. row parallel: W split by rows, x split by columns --------------------------------
    # X W = Σ_k X_k W_k: each device multiplies its slice of x's columns by its rows of W,
    # and a psum over "model" adds the partial products: the forward pass has the sum. Its
    # adjoint is replicate: every device gets the same G, and dX_k = G W_kᵀ, dW_k = X_kᵀ G
    # need no communication over "model" (Megatron's "g").
    def row(p, x):
        return jaxlinear.row_parallel_linear(p, x, mesh=mesh, axis="model", batch_axis="data")

    p_row = put(p1, jaxlinear.Params(P("model", None), P()))
    x_row = put(X, P("data", "model"))
    Y = jax.jit(row)(p_row, x_row)
    ctx.say(f"  x {x_row.sharding.spec}, W {p_row.W.sharding.spec} -> Y {Y.sharding.spec}")
    ctx.close("row parallel: Y equals the single-device Y", Y, affine(X, p1.W, p1.b))
    grad = jax.grad(loss(row), argnums=(0, 1))
    ctx.close("row parallel: gradients equal", jax.jit(grad)(p_row, x_row), ref_grad)
    ops = _collectives(ctx, "row parallel, forward", row, mesh, p_row, x_row)
    ctx.check(
        "  forward: one psum over 'model' of the partial Y",
        _summary(ops) == [("all-reduce", "model", [n // 4 * h])],
    )
    ops = _collectives(ctx, "row parallel, forward + backward", grad, mesh, p_row, x_row)
    ctx.check(
        "  backward adds only the 'data' psum of dW, db: no collective over 'model'",
        _summary(ops)
        == [
            ("all-reduce", "data", sorted([d_in // 2 * h, h])),
            ("all-reduce", "model", [n // 4 * h]),
        ],
    )

    # -- 4. the Megatron block: column, activation, row -------------------------------------
    # The column layer's output is split by columns: exactly the input the row layer wants,
    # so the hidden activations never move. One psum forward (row), one backward (column's
    # dX): each is the other's adjoint. Here with dual_linear, so forward mode works too.
    def block(layers, x):
        return jaxlinear.tensor_parallel_mlp(
            layers,
            x,
            mesh=mesh,
            axis="model",
            batch_axis="data",
            activation=jnp.tanh,
            layer=jaxlinear.dual_linear,
        )

    def block_ref(layers, x):
        (a, b) = layers
        return affine(jnp.tanh(affine(x, a.W, a.b)), b.W, b.b)

    layers = [p1, p2]
    ctx.close(
        "MLP block: Y equals the single-device Y",
        jax.jit(block)(layers, x_data),
        block_ref(layers, X),
    )
    mlp_loss = lambda f: lambda l, x: jnp.sum(jnp.sin(f(l, x)))  # noqa: E731
    grad = jax.grad(mlp_loss(block), argnums=(0, 1))
    ctx.close(
        "MLP block: gradients equal",
        jax.jit(grad)(layers, x_data),
        jax.grad(mlp_loss(block_ref), argnums=(0, 1))(layers, X),
    )
    dl, dx = normal_like((layers, X))
    ctx.close(
        "MLP block: jvp (dual_linear's pushforward) equals the single-device jvp",
        jax.jit(lambda *a: jax.jvp(block, a[:2], a[2:]))(layers, x_data, dl, dx),
        jax.jvp(block_ref, (layers, X), (dl, dx)),
    )
    ops = _collectives(ctx, "MLP block, forward", block, mesh, layers, x_data)
    ctx.check(
        "  forward: one psum over 'model'",
        [o[:2] for o in _summary(ops)] == [("all-reduce", "model")],
    )
    ops = _collectives(ctx, "MLP block, forward + backward", grad, mesh, layers, x_data)
    model_psums = [s for op, axis, s in _summary(ops) if axis == "model"]
    ctx.check(
        "  backward: one more psum over 'model' (dX), the rest over 'data'",
        len(model_psums) == 2 and all(op == "all-reduce" for op, *_ in _summary(ops)),
    )

    # -- 5. grad inside shard_map: the rule does the psum ----------------------------------
    # Inside shard_map the types record which values vary across devices. The cotangent
    # the pullback rule computes for the replicated W (X_kᵀ G_k) varies; W does not. So
    # jaxlinear's rule sums it over "data" itself, as JAX's own autodiff of x @ W + b does:
    # the results agree, and both are invariant (the same on every device).
    def per_device(f):
        def body(p, x, t):  # this device's rows of x and of the targets
            return jax.grad(lambda p: 0.5 * jnp.sum((f(p, x) - t) ** 2))(p)

        specs = (P(), P("data"), P("data"))
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P()))

    t_data = put(T, P("data"))
    ours = per_device(jaxlinear.linear)(p_rep, x_data, t_data)
    theirs = per_device(lambda p, x: affine(x, p.W, p.b))(p_rep, x_data, t_data)
    ctx.close("grad inside shard_map: linear's rule == JAX's AD of x @ W + b", ours, theirs)
    ctx.close("  and == the single-device gradient", ours, ref_grad[0])
    return ctx.checks


# --------------------------------------------------------------------------------------
# Reading the compiled program.


def _collectives(ctx: Context, title: str, fn, mesh, *args):
    """Print and return the collectives in the optimized HLO of ``jax.jit(fn)(*args)``."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    ops = []
    for line in text.splitlines():
        line = line.split("metadata=")[0]
        m = _OP.search(line)
        if not (m and "=" in line[: m.start()]):
            continue
        shapes = re.findall(r"[a-z]+\d*\[[\d,]*\]", line[line.index("=") + 1 : m.start()])
        groups = re.search(
            r"replica_groups=(mesh\[[^\]]*\]\s*\{[^}]*\}|\{[\d,{}]*\}|\[[^ ]*)", line
        )
        groups = groups.group(1) if groups else ""
        ops.append(
            Collective(m.group(1), shapes, _axis_of(groups, mesh), _group_size(groups, mesh))
        )
    ctx.say(f"  HLO collectives, {title}:" + ("" if ops else " none"))
    for op, shapes, axis, _ in ops:
        ctx.say(f"    {op} over {axis!r}: {', '.join(shapes)}")
    return ops


class Collective(NamedTuple):
    """One collective of a compiled program: opcode, result shapes, mesh axis, group size."""

    op: str
    shapes: list[str]
    axis: str
    devices: int


def _group_size(groups: str, mesh) -> int:
    """How many devices each of a collective's replica groups holds.

    ``groups`` is HLO's ``{{0,1},{2,3},...}``, its iota form ``[4,2]<=[8]``, or (newer XLA)
    the axes by name: ``mesh['data'=4,'model'=2] {'model'}``.
    """
    named = re.match(r"mesh\[[^\]]*\]\s*\{([^}]*)\}", groups)
    if named:
        return math.prod(mesh.shape[a] for a in re.findall(r"'([^']+)'", named.group(1)))
    listed = re.search(r"\{([\d,]+)\}", groups)
    if listed:
        return len(listed.group(1).split(","))
    iota = re.match(r"\[([\d,]+)\]<=", groups)
    return int(iota.group(1).split(",")[-1]) if iota else 0


def _axis_of(groups: str, mesh) -> str:
    """The mesh axis a collective's replica groups run along (by their size; see above)."""
    named = re.match(r"mesh\[[^\]]*\]\s*\{([^}]*)\}", groups)
    if named:
        return ",".join(re.findall(r"'([^']+)'", named.group(1)))
    size = _group_size(groups, mesh)
    names = [name for name, n in mesh.shape.items() if n == size]
    return names[0] if len(names) == 1 else f"{size} devices"


def _summary(ops):
    """``[(op, axis, sorted element counts)]`` sorted by axis: independent of the order."""

    def count(shape):
        dims = re.search(r"\[([\d,]*)\]", shape).group(1)
        out = 1
        for d in filter(None, dims.split(",")):
            out *= int(d)
        return out

    return sorted((op, axis, sorted(count(s) for s in shapes)) for op, shapes, axis, _ in ops)


# --------------------------------------------------------------------------------------
# Running with 8 simulated devices.


def _rerun_with_simulated_devices(ctx: Context, module: str = "demos.d11_sharded"):
    ctx.say(
        f"  (this Python has {len(jax.devices())} device(s): running the demo again in a"
        f" fresh Python with {N_DEVICES} simulated CPU devices)"
    )
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={N_DEVICES}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", module, "--child", *(["--small"] if ctx.small else [])]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    records = None
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            records = json.loads(line[len(_MARK) :])
        else:
            ctx.log(line)
    if proc.returncode != 0 or records is None:
        ctx.log(proc.stderr)
        ctx.check(f"the {N_DEVICES}-device run completed", False)
        return ctx.checks
    ctx.checks.extend(Check(**r) for r in records)
    return ctx.checks


def _child(demo=None) -> int:
    ctx = Context(out_dir=None, small="--small" in sys.argv)
    if len(jax.devices()) < N_DEVICES:
        ctx.check(f"{N_DEVICES} devices (found {len(jax.devices())})", False)
    else:
        (demo or _demo)(ctx)
    print(_MARK + json.dumps([dataclasses.asdict(c) for c in ctx.checks]))
    return 0 if all(c.passed for c in ctx.checks) else 1


if __name__ == "__main__":
    if "--child" in sys.argv:
        raise SystemExit(_child())
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:  # before JAX starts: 8 CPUs
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={N_DEVICES}"
    ctx = Context(out_dir=None)
    run(ctx)
    raise SystemExit(0 if ctx.checks and all(c.passed for c in ctx.checks) else 1)
