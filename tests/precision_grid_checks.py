"""Compile-and-run grid: every op × binding × dtype policy × rank × transform, on this backend.

Each op of the family (dense, ``dot_general``, ``einsum``, convolutions in 1 to 3
dimensions, ``conv_transpose``, ``embed``, a user ``bilinear_op``), in both bindings, in
float64, float32, bfloat16 and float16, with ``preferred_element_type`` (``lax``-style ops)
or ``compute_dtype`` (layers) variants and mixed operand dtypes, on inputs of rank 2 to 4
with several leading and contracting axes, under ``jit``, ``grad`` in each operand,
``jvp`` (dual binding only: a ``custom_vjp`` has none), ``vmap`` in each operand and
``grad∘vmap``. Every value is checked against JAX's own AD of the plain ``lax``/``jnp`` op
in float64, within the rounding bound of its dtypes (below).

It runs with XLA's default flags: ``tests/test_precision_grid.py`` starts it in a fresh
interpreter (the suite's ``--xla_cpu_multi_thread_eigen=false``, ``tests/conftest.py``,
routes 16-bit products to a single-threaded kernel that has the forms the default one
lacks, and hid issue #29). By hand::

    JAX_ENABLE_X64=1 python -W error -m pytest --noconftest -n 0 tests/precision_grid_checks.py

Cost: one jitted program per dtype variant holds every op, binding and transform (plus
the float64 references), so the grid is a handful of compilations. CI runs a fixed
sample of the ops in each variant; ``JAXLINEAR_FULL_GRID=1`` runs all of them
(``JAXLINEAR_GRID_VARIANTS=name,name`` restricts the variants). If a variant's program
fails to compile or run, each of its ops is run alone, so the message names the one that
fails.

The bound. Operands are exact in bfloat16 and float16 (so every cast of an operand is
exact), hence each product is exact in the accumulation dtype; a sum of ``K`` terms costs at
most ``γ_K·A`` (``A`` the same quantity computed on ``|x|``, ``|w|``, ``|g|``; ``γ_K = K u /
(1 − K u)`` with ``u`` the accumulation dtype's unit roundoff), and each rounding to the
output dtype costs ``u_out`` times the magnitude. So ``|ours − ref| ≤ r·u_out·A + γ_K·A``
with ``r`` roundings: 1 (the policy rounds once), ``2 + V`` for ``grad∘vmap`` in the
``custom_vjp`` binding (JAX's ``vmap`` of a ``custom_vjp`` sums the ``V`` per-example
cotangents in their own dtype), and ``2 + V`` roundings to the *compute* dtype for the user
op, which has no batch rule, under ``grad∘vmap`` in the dual binding (JAX's AD then
differentiates its formulas).

Last, the adapters (``JAXLINEAR_GRID_VARIANTS=adapters``): a bfloat16 NNX model and a
bfloat16 Equinox model with float32 parameters, converted by ``explicit``, each take one
jitted optax step against the plain model.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxlinear

jax.config.update("jax_enable_x64", True)  # the float64 references (the suite's conftest
jax.config.update("jax_numpy_rank_promotion", "raise")  # is not read in the subprocess)

BF16, F16, F32, F64 = jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64
V = 2  # the vmapped axis' size
FULL = os.environ.get("JAXLINEAR_FULL_GRID", "") not in ("", "0")


@dataclasses.dataclass(frozen=True)
class Op:
    """One op configuration.

    ``ours(binding, **policy)`` returns ``(x, w) -> y`` for ``binding`` in
    ``("custom_vjp", "dual")`` and the policy keyword (``preferred_element_type`` or
    ``compute_dtype``, named by ``policy``); ``reference(x, w)`` is the plain op. ``w``
    may be a pytree (a layer's ``(W, b)``). ``ids``: ``x`` is integer ids (not
    differentiated).
    """

    name: str
    ours: Callable
    reference: Callable
    x_shape: tuple
    w_shape: tuple
    policy: str | None  # "preferred_element_type" | "compute_dtype" | None
    ids: bool = False

    def __str__(self):
        return self.name


def _cl(n):
    """Channels-last dimension numbers for ``n`` spatial axes (``lax``'s default layout)."""
    spec = ("NWC", "NHWC", "NDHWC")[n - 1]
    return (spec, spec[1:-1] + "IO", spec)


def _pick(binding, custom_vjp, dual):
    return custom_vjp if binding == "custom_vjp" else dual


def _dot_general(name, dn, x_shape, w_shape):
    def ours(binding, **kw):
        f = _pick(binding, jaxlinear.dot_general, jaxlinear.dual_dot_general)
        return lambda x, w: f(x, w, dn, **kw)

    ref = lambda x, w: lax.dot_general(x, w, dn)  # noqa: E731
    return Op(name, ours, ref, x_shape, w_shape, "preferred_element_type")


def _einsum(name, subscripts, x_shape, w_shape):
    def ours(binding, **kw):
        f = _pick(binding, jaxlinear.einsum, jaxlinear.dual_einsum)
        return lambda x, w: f(subscripts, x, w, **kw)

    ref = lambda x, w: jnp.einsum(subscripts, x, w)  # noqa: E731
    return Op(name, ours, ref, x_shape, w_shape, "preferred_element_type")


def _conv(name, x_shape, w_shape, **kw):
    def ours(binding, **policy):
        f = _pick(binding, jaxlinear.conv_general_dilated, jaxlinear.dual_conv_general_dilated)
        return lambda x, w: f(x, w, **kw, **policy)

    ref = lambda x, w: lax.conv_general_dilated(x, w, **kw)  # noqa: E731
    return Op(name, ours, ref, x_shape, w_shape, "preferred_element_type")


def _conv_transpose(name, x_shape, w_shape, **kw):
    def ours(binding, **policy):
        f = _pick(binding, jaxlinear.conv_transpose, jaxlinear.dual_conv_transpose)
        return lambda x, w: f(x, w, **kw, **policy)

    ref = lambda x, w: lax.conv_transpose(x, w, **kw)  # noqa: E731
    return Op(name, ours, ref, x_shape, w_shape, "preferred_element_type")


def _bias(y, b):
    return y + jnp.broadcast_to(b, y.shape)


def _dense(name, lead, d_in, d_out):
    def ours(binding, **kw):
        f = _pick(binding, jaxlinear.linear, jaxlinear.dual_linear)
        return lambda x, p: f(jaxlinear.Params(*p), x, **kw)

    ref = lambda x, p: _bias(x @ p[0], p[1])  # noqa: E731
    w_shape = ((d_in, d_out), (d_out,))
    return Op(name, ours, ref, (*lead, d_in), w_shape, "compute_dtype")


def _conv_layer(name, x_shape, w_shape, **kw):
    def ours(binding, **policy):
        f = _pick(binding, jaxlinear.conv, jaxlinear.dual_conv)
        return lambda x, p: f(jaxlinear.Params(*p), x, **kw, **policy)

    n = len(x_shape) - 2
    dn = _cl(n)

    def ref(x, p):
        y = lax.conv_general_dilated(x, p[0], (1,) * n, "SAME", dimension_numbers=dn)
        return _bias(y, p[1])

    w_shape = (w_shape, (w_shape[-1],))
    return Op(name, ours, ref, x_shape, w_shape, "compute_dtype")


def _embed(name, vocab, ids_shape, d):
    def ours(binding, **kw):
        f = _pick(binding, jaxlinear.embed, jaxlinear.dual_embed)
        return lambda ids, table: f(table, ids)

    ref = lambda ids, table: table[ids]  # noqa: E731
    return Op(name, ours, ref, ids_shape, (vocab, d), None, ids=True)


# A user op: the 1-D "valid" cross-correlation y[i] = Σ_k x[..., i + k] w[k, o] ... written
# with lax and the builder, batch-free (its vmap is the builder's fallback).
def _corr(x, w, *, preferred_element_type):  # x: (..., n), w: (k, o) -> (..., n - k + 1, o)
    taps = w.shape[0]
    n = x.shape[-1] - taps + 1
    windows = jnp.stack([x[..., i : i + n] for i in range(taps)], axis=-1)  # (..., n, k)
    return jnp.einsum("...nk,ko->...no", windows, w, preferred_element_type=preferred_element_type)


def _corr_tx(g, w, x_aval, *, preferred_element_type):
    taps = w.shape[0]
    n = g.shape[-2]
    parts = jnp.einsum("...no,ko->...nk", g, w, preferred_element_type=preferred_element_type)
    out = jnp.zeros(x_aval.shape, parts.dtype)
    for i in range(taps):
        out = out.at[..., i : i + n].add(parts[..., i])
    return out


def _corr_tw(g, x, w_aval, *, preferred_element_type):
    taps = w_aval.shape[0]
    n = g.shape[-2]
    windows = jnp.stack([x[..., i : i + n] for i in range(taps)], axis=-1)
    lead = "abcdefgh"[: g.ndim - 2]
    return jnp.einsum(
        f"{lead}nk,{lead}no->ko", windows, g, preferred_element_type=preferred_element_type
    )


USER_OP = jaxlinear.bilinear_op("grid_corr", _corr, _corr_tx, _corr_tw)  # no batch rule
NO_BATCH_RULE = ("user_op_3d",)


def _user(name, x_shape, taps, d_out):
    def ours(binding, **kw):
        f = _pick(binding, USER_OP.custom_vjp, USER_OP.dual)
        return lambda x, w: f(x, w, **kw)

    op = Op(name, ours, None, x_shape, (taps, d_out), "compute_dtype")
    return dataclasses.replace(op, reference=lambda x, w: _corr(x, w, preferred_element_type=None))


# Sizes of 8 and more: XLA:CPU computes smaller products inline, and only larger ones reach
# the library kernels that lack some 16-bit forms (issue #29 shows only from about
# 8 × 8 up), so a grid of tiny shapes would not see it.
OPS = [
    _dense("dense_2d", (8,), 8, 8),
    _dense("dense_3d", (2, 4), 8, 8),
    _dense("dense_4d", (2, 2, 3), 8, 8),
    _dot_general("dot_general_2d", (((1,), (0,)), ((), ())), (8, 8), (8, 8)),
    # (batch, seq, d) @ (d, k): the weight transpose contracts two leading axes (issue #29).
    _dot_general("dot_general_3d", (((2,), (0,)), ((), ())), (2, 4, 8), (8, 8)),
    _dot_general("dot_general_4d", (((3,), (0,)), ((), ())), (2, 2, 3, 8), (8, 8)),
    # Two contracting axes, in swapped order; a kept axis first.
    _dot_general("dot_general_two_contract", (((1, 2), (2, 0)), ((), ())), (8, 2, 4), (4, 8, 2)),
    # A batch axis (not leading in w) and two contracting axes, 4-D.
    _dot_general("dot_general_batch_4d", (((2, 3), (1, 0)), ((0,), (2,))), (2, 8, 4, 2),
                 (2, 4, 2, 8)),
    _einsum("einsum_projection", "btd,dhk->bthk", (2, 4, 8), (8, 2, 4)),
    _einsum("einsum_out_proj", "bthk,hkd->btd", (2, 4, 2, 4), (2, 4, 8)),
    _einsum("einsum_scores", "bqhd,bkhd->bhqk", (2, 8, 2, 4), (2, 8, 2, 4)),
    _conv("conv1d", (2, 8, 4), (3, 4, 8), window_strides=(2,), padding="SAME",
          dimension_numbers=_cl(1), rhs_dilation=(2,)),
    _conv("conv2d_groups", (2, 6, 6, 8), (3, 3, 4, 8), window_strides=(1, 2),
          padding="SAME", dimension_numbers=_cl(2), feature_group_count=2),
    _conv("conv3d", (1, 4, 4, 4, 4), (2, 2, 2, 4, 8), window_strides=(1, 1, 1),
          padding="VALID", dimension_numbers=_cl(3)),
    _conv_transpose("conv_transpose1d", (2, 4, 8), (3, 8, 4), strides=(2,), padding="SAME",
                    dimension_numbers=_cl(1)),
    _conv_transpose("conv_transpose2d", (1, 4, 4, 8), (2, 2, 8, 4), strides=(2, 2),
                    padding="VALID", dimension_numbers=_cl(2)),
    _conv_layer("conv_layer2d", (2, 6, 6, 8), (3, 3, 8, 8)),
    _embed("embed", 8, (2, 8), 8),
    _user("user_op_3d", (2, 4, 10), 3, 8),
]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Variant:
    """Operand dtypes and the policy keyword (for the ops that take it)."""

    name: str
    x: type
    w: type
    kw: dict = dataclasses.field(default_factory=dict)

    def applies(self, op: Op) -> bool:
        if op.ids and self.x != self.w:
            return False  # ids have no float dtype to mix
        return not self.kw or next(iter(self.kw)) == op.policy

    def __str__(self):
        return self.name


VARIANTS = [
    Variant("float64", F64, F64),
    Variant("float32", F32, F32),
    Variant("bfloat16", BF16, BF16),
    Variant("float16", F16, F16),
    Variant("bfloat16_x_float32_w", BF16, F32),  # promotes to float32
    Variant("bfloat16_pet_float32", BF16, BF16, {"preferred_element_type": F32}),
    Variant("float16_pet_float32", F16, F16, {"preferred_element_type": F32}),
    Variant("float32_compute_bfloat16", F32, F32, {"compute_dtype": BF16}),
    Variant("float32_compute_float16", F32, F32, {"compute_dtype": F16}),
]
BINDINGS = ("custom_vjp", "dual")


def _unit_roundoff(dtype):
    return float(jnp.finfo(dtype).eps) / 2


def _exact_data(rng, shape, dtype):
    """Standard normal values exact in bfloat16 *and* float16 (no subnormals), as ``dtype``."""
    a = np.asarray(jnp.asarray(rng.standard_normal(shape), BF16), np.float64)
    a[np.abs(a) < 2.0**-12] = 0.0
    return jnp.asarray(a, dtype)


def _operands(op: Op, variant: Variant, seed=0):
    """``(x, w, dx, dw)``: ``x`` and its tangent in ``variant.x``, ``w`` (a pytree) in ``.w``."""
    rng = np.random.default_rng(seed)
    if op.ids:
        x = jnp.asarray(rng.integers(0, op.w_shape[0], op.x_shape), jnp.int32)
        dx = None
    else:
        x, dx = (_exact_data(rng, op.x_shape, variant.x) for _ in range(2))
    is_shape = lambda s: isinstance(s, tuple) and all(isinstance(i, int) for i in s)  # noqa: E731
    w, dw = (
        jax.tree.map(lambda s: _exact_data(rng, s, variant.w), op.w_shape, is_leaf=is_shape)
        for _ in range(2)
    )
    return x, w, dx, dw


def _stack(tree):
    return jax.tree.map(lambda a: jnp.stack([a, a[::-1]]), tree)  # |·| commutes with it


def _transforms(f, x, w, dx, dw, g, gv, *, ids, dual):
    """Every transform of ``f`` at ``(x, w)``: a dict name -> pytree of arrays."""
    xs, ws = _stack(x), _stack(w)
    vx = jax.vmap(f, (0, None))
    out = {"jit": f(x, w), "vmap_x": vx(xs, w), "vmap_w": jax.vmap(f, (None, 0))(x, ws)}
    if ids:
        out["grad_w"] = jax.vjp(lambda w: f(x, w), w)[1](g)
        out["grad_vmap"] = jax.vjp(lambda w: vx(xs, w), w)[1](gv)
        if dual:
            out["jvp"] = jax.jvp(lambda w: f(x, w), (w,), (dw,))[1]
        return out
    _, pull = jax.vjp(f, x, w)
    out["grad_x"], out["grad_w"] = pull(g)
    out["grad_vmap"] = jax.vjp(vx, xs, w)[1](gv)
    if dual:
        out["jvp"] = jax.jvp(f, (x, w), (dx, dw))[1]
    return out


def _program(ops, variant):
    """One jitted function: for every op in ``ops``, every transform in both bindings
    (``ours``), JAX's AD of the plain op in float64 (``ref``) and the same on ``|x|``,
    ``|w|``, ``|g|`` (``abs``: the ``A`` of the bound). The operands are the same numbers
    in every dtype (exact data), so the references take them in float64."""

    def run(args, args64):
        out = {}
        for op, a, a64 in zip(ops, args, args64, strict=True):
            out[op.name] = {
                binding: _transforms(
                    op.ours(binding, **variant.kw), *a, ids=op.ids, dual=binding == "dual"
                )
                for binding in BINDINGS
            }
            f = op.reference
            out[op.name]["ref"] = _transforms(f, *a64, ids=op.ids, dual=True)
            out[op.name]["abs"] = _transforms(f, *jax.tree.map(jnp.abs, a64), ids=op.ids, dual=True)
        return out

    jitted = jax.jit(run)
    return lambda ops_args: jitted(ops_args, [_inputs(op, VARIANTS[0]) for op in ops])


def _inputs(op, variant):
    """``(x, w, dx, dw, g, gv)``: ``g`` the cotangent of ``y``, ``gv`` of ``vmap(f)``."""
    x, w, dx, dw = _operands(op, variant)
    f = op.ours("custom_vjp", **variant.kw)
    y = jax.eval_shape(f, x, w)
    rng = np.random.default_rng(1)
    g = _exact_data(rng, y.shape, y.dtype)
    gv = _exact_data(rng, (V, *y.shape), y.dtype)
    return x, w, dx, dw, g, gv


def _check(op, variant, results):
    """Every value of ours within the rounding bound (module docstring) of the reference."""
    compute = variant.kw.get("compute_dtype") or jnp.result_type(
        variant.w if op.ids else variant.x, variant.w
    )
    u_acc = _unit_roundoff(jnp.promote_types(compute, F32))
    # Every sum here (the op's, its transposes', over the vmapped axis) has at most
    # V · max(x.size, w.size, y.size) terms.
    x, w, *_ = _inputs(op, variant)
    y = jax.eval_shape(op.ours("custom_vjp", **variant.kw), x, w)
    k = V * max(x.size, y.size, *(a.size for a in jax.tree.leaves(w)))
    gamma = k * u_acc / (1 - k * u_acc)
    failures = []
    for binding in BINDINGS:
        for name, got in results[binding].items():
            rounds, u_round = 1, None
            if name == "grad_vmap" and binding == "custom_vjp":
                rounds = 2 + V  # vmap of a custom_vjp sums per-example cotangents
            if name == "grad_vmap" and binding == "dual" and op.name in NO_BATCH_RULE:
                # Without a batch rule vmap runs the formulas under jax.vmap, and grad then
                # differentiates them with JAX's own rules: cotangents rounded to the compute
                # dtype on the way (documented in bilinear_op's `batch`).
                rounds, u_round = 2 + V, _unit_roundoff(compute)
            leaves = zip(
                jax.tree.leaves(got),
                jax.tree.leaves(results["ref"][name]),
                jax.tree.leaves(results["abs"][name]),
                strict=True,
            )
            for mine, ref, a in leaves:
                mine, ref, a = np.asarray(mine), np.asarray(ref), np.asarray(a)
                if mine.dtype == jax.dtypes.float0:  # the integer ids' cotangent
                    continue
                u_out = max(u_round or 0.0, _unit_roundoff(mine.dtype))
                err = np.abs(mine.astype(np.float64) - ref)
                bound = (rounds * u_out + gamma) * a
                if mine.shape != ref.shape or not np.all(err <= bound):
                    worst = np.max(err / np.maximum(bound, 1e-300)) if err.shape else 0.0
                    where = f"{op.name} {binding} {name} {mine.dtype} {mine.shape}"
                    failures.append(f"{where}: err/bound {worst:.3g}")
    return failures


# The CI sample: each op in at least one variant, the issue #29 case (bfloat16
# dot_general on 3-D input, weight gradient) in two. JAXLINEAR_FULL_GRID=1: every op in
# every variant that applies to it.
SAMPLE = {
    "float64": ("dense_3d", "conv3d"),
    "float32": ("einsum_scores", "conv_transpose1d"),
    "bfloat16": ("dot_general_3d", "dot_general_batch_4d", "embed"),
    "float16": ("dot_general_4d", "conv1d"),
    "bfloat16_x_float32_w": ("dense_4d", "einsum_out_proj"),
    "bfloat16_pet_float32": ("dot_general_3d", "dot_general_two_contract", "conv_transpose2d"),
    "float16_pet_float32": ("dot_general_2d", "einsum_projection", "conv2d_groups"),
    "float32_compute_bfloat16": ("dense_2d", "conv_layer2d", "user_op_3d"),
    "float32_compute_float16": ("user_op_3d",),
}


def _select(variant):
    return tuple(
        op for op in OPS if variant.applies(op) and (FULL or op.name in SAMPLE[variant.name])
    )


_ONLY = [v for v in os.environ.get("JAXLINEAR_GRID_VARIANTS", "").split(",") if v]


@pytest.mark.parametrize("variant", [v for v in VARIANTS if not _ONLY or v.name in _ONLY], ids=str)
def test_grid(variant):
    ops = _select(variant)
    args = [_inputs(op, variant) for op in ops]
    try:
        results = jax.block_until_ready(_program(ops, variant)(args))
    except Exception:  # name the op(s) whose program fails to compile or run
        failed = []
        for op, a in zip(ops, args, strict=True):
            try:
                jax.block_until_ready(_program([op], variant)([a]))
            except Exception as e:
                failed.append(f"{op.name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        raise AssertionError(f"{variant}: " + "; ".join(failed or ["the joint program"])) from None
    problems = [p for op in ops for p in _check(op, variant, results[op.name])]
    assert not problems, f"{variant}: " + "; ".join(problems)


# --- the adapters: a bfloat16 model with float32 parameters, one jitted optax step ---------
# Plain Flax / Equinox (JAX's own AD, bfloat16 products rounded to bfloat16) against the same
# model converted by `explicit` (float32 accumulation, one rounding): the
# losses agree to bfloat16 rounding and the gradients to a few bfloat16 ulps of their
# largest entry (the two round at different places, through several layers).
ADAPTER_TOL = 2.0**-5


def _adam_step(loss, params):
    import optax

    opt = optax.adam(1e-2)
    value, grads = jax.value_and_grad(loss)(params)
    updates, _ = opt.update(grads, opt.init(params), params)
    return value, grads, optax.apply_updates(params, updates)


def _assert_steps_agree(steps):
    (ref_value, ref_grads, _), *ours = steps
    for value, grads, new in ours:
        assert abs(float(value) - float(ref_value)) <= ADAPTER_TOL * abs(float(ref_value))
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
            assert a.dtype == b.dtype == F32 and a.shape == b.shape
            scale = float(np.max(np.abs(np.asarray(b))))
            assert float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) <= ADAPTER_TOL * scale
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(new))


@pytest.mark.skipif(_ONLY and "adapters" not in _ONLY, reason="another group")
def test_nnx_bfloat16_model_one_optax_step():
    from flax import nnx

    import jaxlinear.nnx as jlnnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            kw = dict(dtype=BF16, param_dtype=F32, rngs=rngs)
            self.embed = nnx.Embed(16, 8, **kw)
            self.lin = nnx.Linear(8, 16, **kw)  # (B, T, 8) @ (8, 16): issue #29's case
            self.gen = nnx.LinearGeneral(16, (2, 8), **kw)
            self.ein = nnx.Einsum("bthk,hkd->btd", (2, 8, 8), (8,), **kw)
            self.conv = nnx.Conv(8, 8, (3,), **kw)
            self.up = nnx.ConvTranspose(8, 8, (2,), strides=(2,), **kw)

        def __call__(self, ids):  # (B, T) -> a scalar
            h = jnp.tanh(self.lin(self.embed(ids)))  # (B, T, 16)
            h = jnp.tanh(self.conv(self.ein(jnp.tanh(self.gen(h)))))  # (B, T, 8)
            return jnp.mean(self.up(h).astype(F32) ** 2)  # (B, 2T, 8)

    ids = jnp.asarray(np.random.default_rng(0).integers(0, 16, (2, 8)))
    models = [Net(nnx.Rngs(0))]
    models.append(jlnnx.explicit(models[0], copy=True))  # (the grid covers both bindings)
    graphdefs, params = zip(*(nnx.split(m, nnx.Param) for m in models), strict=True)

    @jax.jit
    def steps(params):
        return [
            _adam_step(lambda p, g=g: nnx.merge(g, p)(ids), p)
            for g, p in zip(graphdefs, params, strict=True)
        ]

    _assert_steps_agree(steps(params))


@pytest.mark.skipif(_ONLY and "adapters" not in _ONLY, reason="another group")
def test_equinox_bfloat16_model_one_optax_step():
    import equinox as eqx

    import jaxlinear.equinox as je

    keys = jax.random.split(jax.random.key(0), 4)

    class Net(eqx.Module):
        embed: eqx.nn.Embedding
        lin: eqx.nn.Linear
        conv: eqx.nn.Conv1d
        up: eqx.nn.ConvTranspose1d

        def __init__(self):
            self.embed = eqx.nn.Embedding(16, 8, key=keys[0], dtype=F32)
            self.lin = eqx.nn.Linear(8, 16, key=keys[1], dtype=F32)
            self.conv = eqx.nn.Conv1d(16, 8, 3, padding=1, key=keys[2], dtype=F32)
            self.up = eqx.nn.ConvTranspose1d(8, 8, 2, stride=2, key=keys[3], dtype=F32)

        def __call__(self, ids):  # one example: (T,) -> (8, 2T)
            h = jnp.tanh(jax.vmap(self.lin)(jax.vmap(self.embed)(ids)))  # (T, 16)
            return self.up(jnp.tanh(self.conv(h.T)))

    def loss(model, ids):  # float32 parameters, bfloat16 compute
        low = jax.tree.map(lambda a: a.astype(BF16) if eqx.is_inexact_array(a) else a, model)
        return jnp.mean(jax.vmap(low)(ids).astype(F32) ** 2)

    ids = jnp.asarray(np.random.default_rng(0).integers(0, 16, (2, 8)))
    models = [Net(), je.explicit(Net())]  # (the grid covers both bindings)
    parts = [eqx.partition(m, eqx.is_inexact_array) for m in models]

    @jax.jit
    def steps(arrays):
        return [
            _adam_step(lambda p, s=s: loss(eqx.combine(p, s), ids), p)
            for p, (_, s) in zip(arrays, parts, strict=True)
        ]

    _assert_steps_agree(steps([p for p, _ in parts]))
