"""Adjoint pairs of collectives: FSDP and sequence parallelism, the bytes of every layout."""

from __future__ import annotations

import collections
import math
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlinear
from demos import d11_sharded as d11
from demos._common import Context, affine

NAME = "collectives"
N = d11.N_DEVICES
_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "pred": 1}


def run(ctx: Context):
    # As demo 11: 8 simulated CPU devices need a fresh Python (the flag is read at start).
    if len(jax.devices()) < N:
        return d11._rerun_with_simulated_devices(ctx, "demos.d23_collectives")
    return _demo(ctx)


def _demo(ctx: Context):
    # -- 1. the second adjoint pair ---------------------------------------------------------
    # Demo 11's collectives came from one pair: replicate (forward) and psum (backward).
    # FSDP and sequence parallelism use a second one. all_gather stacks every device's
    # block on every device; its transpose is reduce-scatter (psum_scatter): sum the
    # per-device arrays and hand device j the j-th block of the sum. On numbers, with the
    # pairing ⟨a, b⟩ = Σ a·b, for blocks v_k and per-device cotangents u^(k):
    #   ⟨u, all_gather(v)⟩ = Σ_k ⟨u^(k), [v_1; ...; v_n]⟩ = Σ_j ⟨Σ_k u^(k)_j, v_j⟩
    #                      = ⟨reduce_scatter(u), v⟩.
    # JAX registers exactly this pair (all_gather's transpose rule calls psum_scatter, and
    # psum_scatter's calls all_gather), so the layers only write the forward collective.
    def put(tree, spec, mesh):
        """Lay ``tree`` out on ``mesh`` as ``spec`` (a spec, or a pytree of them) says."""
        shard = jax.tree.map(
            lambda s: NamedSharding(mesh, s), spec, is_leaf=lambda s: isinstance(s, P)
        )
        return jax.device_put(tree, shard)

    mesh = jax.make_mesh((N,), ("i",))
    rng = np.random.default_rng(23)  # NumPy arrays, put on the mesh from the host

    def normal(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def normal_like(tree):
        return jax.tree.map(lambda a: normal(*a.shape), tree)

    v = put(normal(N, 3), P("i"), mesh)  # device k holds the row v_k
    u = put(normal(N, N, 3), P("i"), mesh)  # device k holds a whole (N, 3) cotangent u^(k)
    v_np, u_np = np.asarray(v), np.asarray(u, np.float64)
    gather = jax.shard_map(
        lambda v: jax.lax.all_gather(v, "i", tiled=True)[None],
        mesh=mesh,
        in_specs=P("i"),
        out_specs=P("i"),
    )  # (N, 3) -> (N, N, 3): every device's copy of the stacked v
    scatter = jax.shard_map(
        lambda u: jax.lax.psum_scatter(u[0], "i", tiled=True),
        mesh=mesh,
        in_specs=P("i"),
        out_specs=P("i"),
    )  # (N, N, 3) -> (N, 3): device j gets row j of Σ_k u^(k)
    ctx.close("all_gather: every device holds all of v", gather(v), np.stack([v_np] * N))
    ctx.close("reduce_scatter: device j gets row j of Σ_k u^(k)", scatter(u), u_np.sum(0), tol=1e-5)
    t = jax.jit(lambda v, u: jaxlinear.adjoint_test(gather, scatter, v, u))(v, u)
    ctx.say(f"  ⟨u, all_gather v⟩ = {float(t.lhs):.6f}, ⟨reduce_scatter u, v⟩ = {float(t.rhs):.6f}")
    ctx.check(
        "reduce_scatter is the transpose of all_gather",
        t.residual < 1e-5,
        residual=float(t.residual),
        tol=1e-5,
    )
    pulled = jax.jit(lambda v, u: jax.vjp(gather, v)[1](u)[0])(v, u)
    ctx.close(
        "JAX's own pullback of all_gather is the reduce-scatter", pulled, u_np.sum(0), tol=1e-5
    )

    # -- 2. every layout, one training step -------------------------------------------------
    # Tokens B, widths d (layers) and h (hidden); float32. Each layout runs a step
    # (forward + backward), checked against plain x @ W + b on one device (float64), and
    # the compiled program's collectives are read and priced.
    B, d, h = (32, 32, 64) if ctx.small else (64, 128, 512)
    dp = jax.make_mesh((N,), ("data",))
    tp = jax.make_mesh((N,), ("model",))
    p1 = jaxlinear.Params(normal(d, h, scale=d**-0.5), normal(h))  # (d, h), (h,)
    p2 = jaxlinear.Params(normal(h, d, scale=h**-0.5), normal(d))  # (h, d), (d,)
    X = normal(B, d)
    H = np.maximum(X @ p1.W, 0)  # (B, h): the row-parallel layer's input
    lin = lambda p, x: affine(x, p.W, p.b)  # noqa: E731
    block = lambda l, x: affine(jax.nn.relu(affine(x, l[0].W, l[0].b)), l[1].W, l[1].b)  # noqa: E731

    def mlp(**kw):
        return lambda l, x: jaxlinear.tensor_parallel_mlp(l, x, mesh=tp, axis="model", **kw)

    # name: (mesh axis, sharded function, reference, args, formula), the formula listing
    # (phase, collective, what, elements carried: the full array, before any scatter).
    # The args are laid out on the mesh as each layer wants them (PartitionSpecs below).
    ar, ag, rs = "all-reduce", "all-gather", "reduce-scatter"
    Pm = jaxlinear.Params
    rep, col_p, row_p = Pm(P(), P()), Pm(P(None, "model"), P("model")), Pm(P("model", None), P())
    mlp_p = [col_p, row_p]
    layouts = {
        "data parallel": (
            "data",
            lambda p, x: jaxlinear.data_parallel_linear(p, x, mesh=dp),
            lin,
            put((p1, X), (rep, P("data")), dp),
            [("bwd", ar, "dW", d * h), ("bwd", ar, "db", h)],
        ),
        "column parallel": (
            "model",
            lambda p, x: jaxlinear.column_parallel_linear(p, x, mesh=tp),
            lin,
            put((p1, X), (col_p, P()), tp),
            [("bwd", ar, "dX", B * d)],
        ),
        "row parallel": (
            "model",
            lambda p, x: jaxlinear.row_parallel_linear(p, x, mesh=tp),
            lin,
            put((p2, H), (row_p, P(None, "model")), tp),
            [("fwd", ar, "Y", B * d)],
        ),
        "tensor-parallel MLP": (
            "model",
            mlp(),
            block,
            put(([p1, p2], X), (mlp_p, P()), tp),
            [("fwd", ar, "Y", B * d), ("bwd", ar, "dX", B * d)],
        ),
        "FSDP": (
            "data",
            lambda p, x: jaxlinear.fsdp_linear(p, x, mesh=dp),
            lin,
            put((p1, X), (Pm(P("data", None), P()), P("data")), dp),
            # The shard is the residual: the backward pass gathers W again (section 3).
            [
                ("fwd", ag, "W", d * h),
                ("bwd", ag, "W again", d * h),
                ("bwd", rs, "dW", d * h),
                ("bwd", ar, "db", h),
            ],
        ),
        "sequence-parallel MLP": (
            "model",
            mlp(sequence_dim=0),
            block,
            put(([p1, p2], X), (mlp_p, P("model")), tp),
            [
                ("fwd", ag, "X", B * d),
                ("fwd", rs, "Y", B * d),
                ("bwd", ag, "G", B * d),
                ("bwd", rs, "dX", B * d),
                ("bwd", ar, "db2", d),
            ],
        ),
    }
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
    references = {}  # one float64 reference (Y, grads) per reference map and its inputs
    rows = []
    for name, (axis, f, ref, args, formula) in layouts.items():
        ctx.say(f"\n  {name} ({N} devices on {axis!r}):")
        key = (ref, args[1].shape)
        if key not in references:
            args64 = jax.tree.map(lambda a: np.asarray(a, np.float64), args)
            references[key] = jax.jit(
                lambda *a, ref=ref: (ref(*a), jax.grad(loss(ref), argnums=(0, 1))(*a))
            )(*args64)
        ref_y, ref_g = references[key]
        fwd = jax.jit(f).lower(*args).compile()
        step = jax.jit(jax.grad(loss(f), argnums=(0, 1))).lower(*args).compile()
        ctx.close(f"{name}: Y equals the single-device Y", fwd(*args), ref_y, tol=1e-4)
        grads = step(*args)
        ctx.close(f"{name}: gradients equal the single-device gradients", grads, ref_g, tol=1e-4)
        ops_f = _parse(fwd.as_text(), dp if axis == "data" else tp)
        ops_s = _parse(step.as_text(), dp if axis == "data" else tp)
        ops_b = list((collections.Counter(ops_s) - collections.Counter(ops_f)).elements())
        hlo = {"fwd": sorted(ops_f), "bwd": sorted(ops_b)}
        want = {
            ph: sorted((op, n // N if op == rs else n) for p_, op, _, n in formula if p_ == ph)
            for ph in ("fwd", "bwd")
        }
        got = {ph: sorted((op, n) for op, n, _ in hlo[ph]) for ph in hlo}
        ctx.say(f"    HLO forward:  {_fmt(hlo['fwd'])}", f"    HLO backward: {_fmt(hlo['bwd'])}")
        ctx.check(f"{name}: the HLO runs the collectives of the formula", got == want)
        by_formula = sum(_sent(op, n if op != rs else n // N, N) * 4 for _, op, _, n in formula)
        by_hlo = sum(_sent(op, n, g) * b for op, n, (g, b) in ops_s)
        ctx.check(
            f"{name}: bytes sent per device, formula = HLO ({by_hlo:,.0f})",
            math.isclose(by_formula, by_hlo),
        )
        if name == "FSDP":
            W_size = d * h
            ctx.check(
                "FSDP: dW comes back sharded like W", grads[0].W.sharding.spec == P("data", None)
            )
            ctx.check(
                "FSDP: no all-reduce of a W-sized array",
                all(n < W_size for op, n, _ in ops_s if op == ar),
            )
        rows.append((name, axis, formula, by_hlo))

    ctx.say(
        "",
        f"  Collectives per training step, {N} devices, float32, B={B} tokens, "
        f"d={d}, h={h} (ring model: all-reduce sends 2(n-1)/n of its array, all-gather"
        " and reduce-scatter (n-1)/n of the full array):",
        "",
        "  | layout | mesh axis | forward | backward | bytes sent per device |",
        "  |---|---|---|---|---|",
    )
    for name, axis, formula, sent in rows:
        cols = [
            ", ".join(f"{op} {what} ({n:,})" for p_, op, what, n in formula if p_ == ph) or "none"
            for ph in ("fwd", "bwd")
        ]
        ctx.say(f"  | {name} | {axis} ({N}) | {cols[0]} | {cols[1]} | {sent:,.0f} |")

    # -- 3. FSDP's memory: the shard as residual ---------------------------------------------
    # A layer's backward pass reads W (dX = G Wᵀ), so autodiff keeps the gathered W from
    # the forward pass until then: at the turn of the step every layer's gathered W is
    # live, and FSDP saves nothing. fsdp_linear (residuals="shard", the default) saves the
    # shard instead and gathers W again in the backward pass (one more all-gather per
    # layer), so at most two gathered weights are live. XLA's own accounting of the
    # compiled gradient, per device (memory_analysis().temp_size_in_bytes):
    L, d_m, tokens = (4, 128, 64) if ctx.small else (8, 1024, 64)
    mlp_layers = [
        jaxlinear.Params(normal(d_m, d_m, scale=d_m**-0.5), normal(d_m)) for _ in range(L)
    ]
    X_m = normal(tokens, d_m)
    W_bytes, act = d_m * d_m * 4, tokens // N * d_m * 4

    def temp_of(f):
        def loss(layers, x):
            for p in layers:
                x = jnp.tanh(f(p, x))
            return jnp.sum(x**2)

        compiled = jax.jit(jax.grad(loss)).lower(mlp_layers, X_m).compile()
        ops = collections.Counter(op for op, _, _ in _parse(compiled.as_text(), dp))
        return compiled.memory_analysis().temp_size_in_bytes, ops

    ctx.say(
        "",
        f"  {L}-layer tanh MLP, W: ({d_m}, {d_m}) ({W_bytes / 2**20:.2f} MiB gathered),"
        f" {tokens} tokens, weights and batch over {N} devices:",
    )
    temps = {}
    for residuals in ("gathered", "shard"):
        temps[residuals], ops = temp_of(
            lambda p, x, r=residuals: jaxlinear.fsdp_linear(p, x, mesh=dp, residuals=r)
        )
        ctx.say(
            f"    residuals={residuals!r}: temp {temps[residuals] / 2**20:.2f} MiB per device;"
            f" {dict(sorted(ops.items()))}"
        )
    ctx.check(
        f"FSDP keeping the gathered W holds all {L} of them (temp ≥ {L}·|W|)",
        temps["gathered"] >= L * W_bytes,
    )
    ctx.check(
        "FSDP with the shard as residual: at most two gathered W live (temp ≤ 2·|W| + activations)",
        temps["shard"] <= 2 * W_bytes + 4 * L * act,
    )

    # -- 4. the dot-product test, mesh-wide -------------------------------------------------
    # adjoint_test pairs global arrays with jnp.sum, which works on arrays laid out over a
    # mesh as on one device: so the test of a sharded layer's derivative runs as is (under
    # jit or not), provided every array lives on the mesh's devices. J v by dual_linear's
    # pushforward (jvp), Jᵀ u by linear's pullback (the other binding) for FSDP; v is
    # sharded like (params, x) and u like Y. In float32 a right transpose leaves a relative
    # residual of 1e-7 to a few 1e-6 (rounding in sums of thousands of products); a wrong
    # one, of order one.
    ctx.say("")

    def fsdp(p, x, layer):
        return jaxlinear.fsdp_linear(p, x, mesh=dp, layer=layer)

    @jax.jit
    def fsdp_test(at, v, u):
        _, pull = jax.vjp(lambda *a: fsdp(*a, jaxlinear.linear), *at)
        push = lambda v: jax.jvp(lambda *a: fsdp(*a, jaxlinear.dual_linear), at, v)[1]  # noqa: E731
        return jaxlinear.adjoint_test(push, pull, v, u)

    def sp(layers, x):
        return jaxlinear.tensor_parallel_mlp(
            layers, x, mesh=tp, sequence_dim=0, layer=jaxlinear.dual_linear
        )

    @jax.jit
    def sp_test(at, v, u):
        _, pull = jax.vjp(sp, *at)
        return jaxlinear.adjoint_test(lambda v: jax.jvp(sp, at, v)[1], pull, v, u)

    specs = (jaxlinear.Params(P("data", None), P()), P("data"))
    v = put(normal_like((p1, X)), specs, dp)
    u = put(normal(B, h), P("data"), dp)
    t = fsdp_test(put((p1, X), specs, dp), v, u)
    ctx.say(
        f"  FSDP: v = (dW {v[0].W.sharding.spec}, db, dX {v[1].sharding.spec}),"
        f" u {u.sharding.spec}: ⟨u, Jv⟩ = {float(t.lhs):.5f}, ⟨Jᵀu, v⟩ = {float(t.rhs):.5f}"
    )
    ctx.check(
        "mesh-wide adjoint test, FSDP (float32)",
        t.residual < 1e-5,
        residual=float(t.residual),
        tol=1e-5,
    )

    W_specs = [P(None, "model"), P("model")], [P("model", None), P()]
    specs = ([jaxlinear.Params(*s) for s in W_specs], P("model"))
    at = put(([p1, p2], X), specs, tp)  # every array on the mesh (one set of devices)
    t = sp_test(at, put(normal_like(at), specs, tp), put(normal(B, d), P("model"), tp))
    ctx.say(
        f"  sequence-parallel MLP at (layers, X): ⟨u, Jv⟩ = {float(t.lhs):.5f},"
        f" ⟨Jᵀu, v⟩ = {float(t.rhs):.5f}"
    )
    ctx.check(
        "mesh-wide adjoint test, sequence-parallel MLP (float32)",
        t.residual < 1e-5,
        residual=float(t.residual),
        tol=1e-5,
    )
    return ctx.checks


# --------------------------------------------------------------------------------------
# Pricing a compiled program's collectives.


def _parse(text: str, mesh) -> list[tuple[str, int, tuple[int, int]]]:
    """``(opcode, elements, (group size, bytes per element))`` per array each collective of
    the optimized HLO returns (a combined all-reduce of dW and db gives two)."""
    ops = []
    for line in text.splitlines():
        line = line.split("metadata=")[0]
        m = d11._OP.search(line)
        if not (m and "=" in line[: m.start()]):
            continue
        groups = re.search(
            r"replica_groups=(mesh\[[^\]]*\]\s*\{[^}]*\}|\{[\d,{}]*\}|\[[^ ]*)", line
        )
        g = d11._group_size(groups.group(1) if groups else "", mesh)
        for dtype, dims in re.findall(
            r"([a-z]+\d*)\[([\d,]*)\]", line[line.index("=") + 1 : m.start()]
        ):
            n = math.prod(int(x) for x in dims.split(",") if x)
            ops.append((m.group(1), n, (g, _BYTES[dtype])))
    return ops


def _sent(op: str, elements: int, n: int) -> float:
    """Elements one device sends for ``op`` over ``n`` devices (ring algorithms), given the
    elements of its result (for reduce-scatter: this device's block)."""
    full = elements * n if op == "reduce-scatter" else elements
    return {"all-reduce": 2 * (n - 1) / n}.get(op, (n - 1) / n) * full


def _fmt(ops) -> str:
    return ", ".join(f"{op} {n:,}" for op, n, _ in ops) or "none"


if __name__ == "__main__":
    if "--child" in sys.argv:
        raise SystemExit(d11._child(_demo))
