r"""Per-example gradient norms and clipped gradients, from the ops' own per-example rules.

Every op of the family is ``y = B(x, w) (+ b)`` with ``B`` bilinear, so example ``i``'s
weight gradient is ``w̄_i = B_wᵀ(g_i; x_i)``: a function of the layer input ``x`` and the
output cotangent ``g`` only, which one forward and one backward pass produce. Each op
brings a per-example rule (``taps``); ``bilinear_op`` gives every op one:

- a *ghost* route where the op supplies it (``bilinear_op(..., per_example=...)``),
  ``‖w̄_i‖²`` without forming ``w̄_i``: the dense layer, ``dot_general`` and ``einsum``
  read ``x`` as ``X_i: (T, d)`` and ``g`` as ``G_i: (T, p)`` (``"rank_one"`` for ``T = 1``,
  ``"gram"`` ``⟨X_i X_iᵀ, G_i G_iᵀ⟩`` when ``2T² ≤ pd``, ``ghost.py``); a convolution
  uses its input patches as ``X_i``; ``embed`` sums ``⟨g_t, g_s⟩`` over equal ids;
- the generic ``"per_example"`` route otherwise, for every op including a user's own:
  ``w̄_i`` from the op's ``transpose_w`` under ``jax.vmap`` over the examples (``n·|w|``
  numbers for that layer only; never a second backward pass);
- a bias ``b̄_i = Σ g_i`` over every axis but the examples' and the bias's own.

Clipping: ``B_wᵀ`` is linear in ``g``, so ``Σ_i c_i w̄_i = B_wᵀ(c ⊙ g; x)``, one more call
of the op's transpose with ``g``'s example rows scaled (or ``Σ_i c_i w̄_i`` where the
per-example route formed them).

How leaves are matched to ops (all at trace time; details in ``docs/DESIGN.md``):

1. *Program*: ``loss_fn`` is traced once (``jax.make_jaxpr``; the family's top-level op
   calls pass through ``taps.call`` and are recorded with their rules) and flattened by
   ``program.Program``: ``jit``, ``checkpoint``, custom-rule and other call-like equations
   inlined, scans of ≤ 128 steps written out. ``program.example_axes`` finds where the
   examples are in every value, from axis 0 of ``args`` (``jax.vmap`` over the examples
   is no obstacle: after tracing it is an ordinary axis).
2. *Plan*: a leaf that reaches one contraction's weight (or an op's bias) through casts,
   reshapes and transposes, or one slice per step of a scan, is *tapped*: the contraction
   is read as a call of the family's op (its own call, its dual primitive, a raw
   ``dot_general``, ``conv_general_dilated``, or a row ``gather``) and its rule applies.
   A leaf used that way by several calls (an embedding tied to the logits, a weight shared
   by layers or by a scan's steps) is *tied*: its per-example gradient is the sum over the
   calls, ``w̄_i = Σ_k w̄_{k,i}``, whose norm is the Gram over the calls' concatenated rows
   (``"gram"``, cross terms included, from each op's ``factors`` rule) or each call's
   ``w̄_{k,i}`` summed in blocks of examples (``"per_example"``), the fewer multiply-adds
   (detail ``"tied: K calls"``). Every other leaf gets a *per-example copy*
   (``"broadcast"``; ``"bias"`` when it is only added): ``n`` copies fed where the leaf
   meets the examples' data, whose cotangents are its per-example gradients (LayerNorm
   scales, tables, class tokens).
3. *One pass*: the program runs under ``jax.vjp``, each tapped output plus ``Z_k = 0``
   (its cotangent is ``g_k``), each copied leaf as ``leaf + Q`` (``Q = 0``, ``(n,
   *leaf.shape)``). Re-running the traced program, not ``loss_fn``, reuses the plain
   step's random masks.
4. *The plan*: a leaf with neither route (used inside ``lax.cond``/``while_loop`` or where
   the examples share an axis) makes the whole model take ``jax.vmap`` of ``jax.grad``
   (``fallback="vmap"``), or raises a ``ValueError`` naming the leaf and the reason
   (``fallback="raise"``). With every leaf routed, ``plan="auto"`` still takes that
   textbook where it is estimated cheaper (``PlanEstimate``: flops and bytes counted on
   each tapped weight's norm and clipped-sum programs, traced abstractly; no timing);
   ``plan="structural"``/``"vmap"`` force one. ``per_example_routes`` reports the plan and
   why, and the route of every leaf and why.

Assumptions: the examples do not interact (loss ``i`` depends only on row ``i`` of every
array in ``args``: no batch statistics across the batch).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlinear._src import bilinear, ghost, program, taps, vma
from jaxlinear._src.ops.conv import CONV, ConvSpec
from jaxlinear._src.ops.dot_general import DOT_GENERAL
from jaxlinear._src.ops.embed import _RULE as EMBED_RULE

_FALLBACKS = ("vmap", "raise")
_PLANS = ("auto", "structural", "vmap")


class Route(NamedTuple):
    """How one params leaf gets its per-example gradient norm (``per_example_routes``)."""

    leaf: str  # e.g. "params['conv1'].W"
    route: str  # "rank_one" | "gram" | "per_example" | "bias" | "broadcast" | "fallback" | ...
    op: str | None  # the op that holds it ("affine", "conv", "embed", ...), or None
    detail: str  # shapes, or why the fallback


class RouteReport(tuple):
    """``Route`` rows, one per params leaf; ``str()`` prints the plan, then the rows as a table.

    Attributes:
      plan: the plan that runs: ``"structural"`` (each leaf by its route) or ``"vmap"``
        (``jax.vmap`` of ``jax.grad`` of the whole model); ``"none"`` where a leaf has no
        route and ``fallback="raise"`` (``clipped_grad`` would raise).
      why: why that plan: forced by ``plan=``, a leaf without a route, or the estimates of
        ``plan="auto"`` (``PlanEstimate``).
      estimate: the ``PlanEstimate`` of both plans where ``plan="auto"`` compared them, else
        ``None``.
    """

    def __new__(cls, rows=(), plan: str = "structural", why: str = "", estimate=None):
        self = super().__new__(cls, rows)
        self.plan, self.why, self.estimate = plan, why, estimate
        return self

    def __str__(self):
        rows = [("leaf", "route", "op", "detail"), *((r.leaf, r.route, r.op or "-", r.detail)
                                                      for r in self)]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        head = f"plan: {self.plan}" + (f" ({self.why})" if self.why else "")
        return "\n".join([head] + [
            "  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3]
            for row in rows
        ])

    def counts(self) -> dict[str, int]:
        """How many leaves take each route."""
        return dict(collections.Counter(r.route for r in self))


# --------------------------------------------------------------------------------------
# Pass 1: discovery.


@dataclasses.dataclass
class _Call:
    """One op call seen in the discovery pass."""

    rule: object  # the op's per-example rule (taps)
    vars: tuple  # jaxpr variables of (x, w, b, y); None where not a top-level tracer
    x_shape: tuple[int, ...]
    w: object  # w's abstract value (shape, dtype, sharding)
    y: object  # y's
    y_axis: int | None  # where the examples land in y
    reason: str | None  # why this call cannot be tapped; None: it can
    apply: object = None  # the op itself, apply(x, w, b) -> y


class _Discover:
    """Pass 1: record every op call with the jaxpr variables of its operands."""

    def __init__(self, n, leaf_tracers):
        self.n, self.trace = n, getattr(leaf_tracers[0], "_trace", None)
        self.readable = self.trace is not None and hasattr(leaf_tracers[0], "val")
        self.calls: list[_Call] = []

    def _var(self, a):
        """``a``'s variable in the jaxpr being built, if ``a`` is a tracer of that trace."""
        if a is None or getattr(a, "_trace", None) is not self.trace:
            return None
        return getattr(a, "val", None)

    def layer(self, rule, apply, x, w, b):
        y = apply(x, w, b)
        variables = tuple(self._var(a) for a in (x, w, b, y))
        shape, y_axis, reason = tuple(np.shape(x)), None, None
        if variables[3] is None:
            reason = (
                f"used by a jaxlinear {rule.name} call inside a transformation (jax.vmap,"
                " lax.scan, jax.jit, jax.checkpoint, ...) within loss_fn"
            )
        elif not shape or shape[0] != self.n:
            reason = (
                f"used by a jaxlinear {rule.name} call whose input `x` has shape {shape}, not"
                f" ({self.n}, ...) with the examples on axis 0"
            )
        else:
            y_axis = rule.example_axis(x, w)
            if y_axis is None:
                reason = (
                    f"used by a jaxlinear {rule.name} call that contracts or mixes axis 0 of"
                    f" its input `x` (shape {shape}), the examples' axis"
                )
        # w's type keeps its sharding (on meshes with Explicit axes the transposes read it).
        w_aval, y_aval = jax.typeof(w), jax.typeof(y)
        self.calls.append(_Call(rule, variables, shape, w_aval, y_aval, y_axis, reason, apply))
        return y


# --------------------------------------------------------------------------------------
# Pass 2: the plan, on the flattened program.


@dataclasses.dataclass
class _Tap:
    """A contraction whose output gets ``Z_k``: the op call, its data and weight slots."""

    node: int
    call: _Call  # the rule and the canonical shapes (examples on axis 0 of x)
    x: int  # the data operand's slot
    w: int  # the weight operand's slot
    b: int | None  # the op's own bias operand, if any
    x_fn: object = None  # x into the rule's layout (examples on axis 0), or None: as is
    y_perm: tuple | None = None  # transposes y into the rule's layout (raw dot_general)


@dataclasses.dataclass
class _Entry:
    """A leaf on a tapped route: the ``w`` or the bias of one contraction."""

    leaf: int
    tap: _Tap
    role: str  # "w" | "b"
    path: list  # node indices from the leaf to the operand (casts, reshapes, transposes)
    tied: bool = False  # one of several calls sharing the leaf (the norm has cross terms)


def _aval(aval):
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, sharding=getattr(aval, "sharding", None))


def _dot_tap(prog, k, node, axes):
    """A raw ``dot_general`` with the examples on one operand, as a call of the family's
    ``dot_general`` op (examples moved to axis 0 of its ``x``), or ``None``."""
    ins = node.ins
    if any(isinstance(s, program.Lit) for s in ins):
        return None
    d = 0 if axes[ins[0]] is not None else 1
    ax = axes[ins[d]]
    if not isinstance(ax, int) or axes[ins[1 - d]] is not None:
        return None
    (lc, rc), (lb, rb) = ([tuple(int(i) for i in t) for t in pair]
                          for pair in node.eqn.params["dimension_numbers"])  # fmt: skip
    xc, wc, xb, wb = (lc, rc, lb, rb) if d == 0 else (rc, lc, rb, lb)
    if ax in xc or ax in xb:
        return None
    x_aval, w_aval = prog.avals[ins[d]], prog.avals[ins[1 - d]]
    x_rank, w_rank = len(x_aval.shape), len(w_aval.shape)
    x_perm = (ax, *(i for i in range(x_rank) if i != ax))
    new = {a: x_perm.index(a) for a in range(x_rank)}
    dims = ((tuple(new[a] for a in xc), wc), (tuple(new[a] for a in xb), wb))
    # The output's axes, labelled by the operand axis each comes from.
    l_kept = [i for i in range(len(prog.shape(ins[0]))) if i not in lc and i not in lb]
    r_kept = [i for i in range(len(prog.shape(ins[1]))) if i not in rc and i not in rb]
    labels = [(d, a) for a in (lb if d == 0 else rb)]
    labels += [(0, a) for a in l_kept] + [(1, a) for a in r_kept]
    x_kept = [a for a in x_perm if a not in xc and a not in xb]
    w_kept = [a for a in range(w_rank) if a not in wc and a not in wb]
    canon = [(d, a) for a in xb] + [(d, a) for a in x_kept] + [(1 - d, a) for a in w_kept]
    y_perm = tuple(labels.index(c) for c in canon)
    y = prog.avals[node.outs[0]]
    cd = jnp.result_type(x_aval.dtype, w_aval.dtype)
    out_dtype = None if y.dtype == cd else jnp.dtype(y.dtype)
    params = dict(dimension_numbers=dims, precision=node.eqn.params.get("precision"),
                  compute_dtype=None, out_dtype=out_dtype)  # fmt: skip
    rule = bilinear.per_example_rule(DOT_GENERAL, params)
    x_shape = tuple(x_aval.shape[a] for a in x_perm)
    y_shape = tuple(y.shape[a] for a in y_perm)
    x_canon = jax.ShapeDtypeStruct(x_shape, x_aval.dtype)
    y_axis = rule.example_axis(x_canon, w_aval)
    if y_axis is None:
        return None
    call = _Call(rule, None, x_shape, _aval(w_aval), jax.ShapeDtypeStruct(y_shape, y.dtype),
                 y_axis, None)  # fmt: skip
    identity = tuple(range(x_rank))
    return _Tap(k, call, ins[d], ins[1 - d], None,
                None if x_perm == identity else functools.partial(jnp.transpose, axes=x_perm),
                None if y_perm == tuple(range(len(y_shape))) else y_perm)  # fmt: skip


def _conv_tap(prog, k, node, axes):
    """A raw ``conv_general_dilated`` with the examples on its input's batch axis 0, as a
    call of the family's ``conv`` op, or ``None``."""
    x, w = node.ins
    p = node.eqn.params
    dn = p["dimension_numbers"]
    if isinstance(x, program.Lit) or isinstance(w, program.Lit):
        return None
    if axes[x] != 0 or dn.lhs_spec[0] != 0 or axes[w] is not None:
        return None
    spec = ConvSpec(
        tuple(int(s) for s in p["window_strides"]),
        tuple((int(lo), int(hi)) for lo, hi in p["padding"]),
        tuple(int(d) for d in p["lhs_dilation"]),
        tuple(int(d) for d in p["rhs_dilation"]),
        lax.ConvDimensionNumbers(*(tuple(int(d) for d in s) for s in dn)),
        int(p["feature_group_count"]),
        int(p["batch_group_count"]),
    )
    x_aval, w_aval, y = prog.avals[x], prog.avals[w], prog.avals[node.outs[0]]
    cd = jnp.result_type(x_aval.dtype, w_aval.dtype)
    params = dict(spec=spec, precision=p.get("precision"), compute_dtype=None,
                  out_dtype=None if y.dtype == cd else jnp.dtype(y.dtype))  # fmt: skip
    rule = bilinear.per_example_rule(CONV, params)
    y_axis = rule.example_axis(jax.ShapeDtypeStruct(x_aval.shape, x_aval.dtype), w_aval)
    if y_axis is None or y_axis != axes[node.outs[0]]:
        return None
    call = _Call(rule, None, tuple(x_aval.shape), _aval(w_aval), y, y_axis, None)
    return _Tap(k, call, x, w, None)


def _gather_tap(prog, k, node, axes):
    """A raw ``gather`` of rows of a ``(V, d)`` table by ids ``(n, ..., 1)`` (``jnp.take``,
    Flax's ``Embed``), as a call of the family's ``embed``, or ``None``."""
    table, idx = node.ins
    if isinstance(table, program.Lit) or isinstance(idx, program.Lit):
        return None
    p = node.eqn.params
    dn, t_aval, i_aval = p["dimension_numbers"], prog.avals[table], prog.avals[idx]
    y = prog.avals[node.outs[0]]
    if _clipped_rows(p, t_aval, i_aval) and axes[table] is None and axes[idx] == 0:
        V = t_aval.shape[0]  # (row, column) starts, clamped: the column to 0 (full rows)

        def rows(i):  # (n, ..., 2) -> (n, ..., 1), as y's (n, ..., 1, d)
            return jnp.clip(i[..., :1], 0, V - 1)

        call = _Call(EMBED_RULE, None, tuple(i_aval.shape), _aval(t_aval), y, 0, None)
        return _Tap(k, call, idx, table, None, x_fn=rows)
    if (axes[table] is not None or axes[idx] != 0 or len(t_aval.shape) != 2
            or len(i_aval.shape) < 2 or i_aval.shape[-1] != 1
            or tuple(dn.offset_dims) != (len(i_aval.shape) - 1,)
            or tuple(dn.collapsed_slice_dims) != (0,) or tuple(dn.start_index_map) != (0,)
            or tuple(getattr(dn, "operand_batching_dims", ())) != ()
            or tuple(p["slice_sizes"]) != (1, t_aval.shape[1])
            or not any(m in str(p["mode"]) for m in ("FILL_OR_DROP", "PROMISE"))):  # fmt: skip
        return None
    V = t_aval.shape[0]

    def ids(i):  # (n, ..., 1) -> (n, ...); a negative id is out of range here: dropped
        i = i[..., 0]
        return jnp.where(i < 0, V, i)

    call = _Call(EMBED_RULE, None, tuple(i_aval.shape[:-1]), _aval(t_aval), y, 0, None)
    return _Tap(k, call, idx, table, None, x_fn=ids)


def _clipped_rows(p, t_aval, i_aval):
    """Whether a ``gather`` reads whole rows of a ``(V, d)`` table at clamped ``(row,
    column)`` starts ``(n, ..., 2)``, each row kept as a ``(1, d)`` slice (``table[i]``
    under ``jax.vmap``, as Equinox's ``Embedding`` does)."""
    dn = p["dimension_numbers"]
    r = len(i_aval.shape)
    return (len(t_aval.shape) == 2 and r >= 2 and i_aval.shape[-1] == 2
            and tuple(dn.offset_dims) == (r - 1, r) and tuple(dn.collapsed_slice_dims) == ()
            and tuple(dn.start_index_map) == (0, 1)
            and tuple(getattr(dn, "operand_batching_dims", ())) == ()
            and tuple(p["slice_sizes"]) == (1, t_aval.shape[1])
            and "CLIP" in str(p["mode"]))  # fmt: skip


def _op_tap(prog, k, node, axes, n, recorded):
    """A call of the family's ops (seen by its taps, or its dual primitive), or ``None``."""
    if k in recorded:
        call, (x, w, b) = recorded[k]
        if call.reason is not None or axes.get(x) != 0:
            return None
        return _Tap(k, call, x, w, b)
    found = _op_of(node)
    if found is None or any(isinstance(s, program.Lit) for s in node.ins):
        return None
    x, w, *b = node.ins
    if axes[x] != 0 or axes[w] is not None or (b and axes[b[0]] is not None):
        return None
    rule = bilinear.per_example_rule(*found[:2])
    x_aval, w_aval, y = prog.avals[x], prog.avals[w], prog.avals[node.outs[0]]
    y_axis = rule.example_axis(jax.ShapeDtypeStruct(x_aval.shape, x_aval.dtype), w_aval)
    if y_axis is None or y_axis != axes[node.outs[0]]:
        return None
    call = _Call(rule, None, tuple(x_aval.shape), _aval(w_aval), y, y_axis, None)
    return _Tap(k, call, x, w, b[0] if b else None)


def _reordered(apply, ins, xwb):
    """``apply(x, w, b)`` called with the equation's operands ``ins`` in their order."""
    where = [None if s is None else ins.index(s) for s in xwb]
    return lambda *vals: apply(*(None if i is None else vals[i] for i in where))


def _op_of(node):
    """``(op, kw, apply)`` where ``node`` is a call of the family's op, or ``None``."""
    return None if node.eqn is None else bilinear.op_call(node.eqn)


def _op_axis(node, ins):
    """The examples' axis of a dual primitive's output (the op's rule reads it off shapes)."""
    found = _op_of(node)
    if found is None:
        return None
    op = found[0]
    x, w = (v.aval for v in node.eqn.invars[:2])
    if ins[0] == 0 and all(a is None for a in ins[1:]):
        rule = bilinear.per_example_rule(*found[:2])
        y_axis = rule.example_axis(jax.ShapeDtypeStruct(x.shape, x.dtype), w)
        if y_axis is not None:
            return y_axis
    return program.Mixed(f"the {op.name} op mixes the examples (its `x` or `w` carries them)")


# Primitives a leaf may reach a contraction's weight through, keeping its norm: the per-
# example gradient is the operand's, cast and reshaped back.
_PASS = frozenset({"convert_element_type", "copy", "copy_p", "reshape", "transpose", "squeeze",
                   "expand_dims", "broadcast_in_dim"})  # fmt: skip
# Where a per-example copy of a leaf may meet the examples' data: evaluated per example
# (jax.vmap) with the copy. ALIGNED ones pair their operands' axes one to one.
_ALIGNED = program.ELEMENTWISE | {"concatenate", "clamp", "select_n", "pad"}
_MEETS = _ALIGNED | {"dot_general", "conv_general_dilated", "gather", "dynamic_slice",
                     "dynamic_update_slice"}  # fmt: skip


def _plan(prog, axes, n, L, recorded):
    """``(entries, broadcast, reasons)``: the leaves on tapped routes, those given a
    per-example copy (``{leaf: meeting prims}``) and why each other used leaf falls back."""
    taps_at = {}
    for k, node in enumerate(prog.nodes):
        tap = _op_tap(prog, k, node, axes, n, recorded)
        if tap is None and node.name == "dot_general":
            tap = _dot_tap(prog, k, node, axes)
        if tap is None and node.name == "gather":
            tap = _gather_tap(prog, k, node, axes)
        if tap is None and node.name == "conv_general_dilated":
            tap = _conv_tap(prog, k, node, axes)
        if tap is not None:
            taps_at[k] = tap
    outs = {s for s in prog.outvars if not isinstance(s, program.Lit)}
    entries, broadcast, reasons = [], {}, {}
    for j in range(L):
        start = prog.invars[j]
        chain_slots, chain_nodes, meets = {start}, [], []
        frontier = [start]
        while frontier:
            s = frontier.pop()
            for k in prog.users.get(s, ()):
                node = prog.nodes[k]
                if _dead(prog, node, s):  # (a product with zeros: no gradient reaches the leaf)
                    continue
                if any(not isinstance(i, program.Lit) and axes[i] is not None for i in node.ins):
                    if k not in meets:
                        meets.append(k)
                elif k not in chain_nodes:
                    chain_nodes.append(k)
                    for o in node.outs:  # (an integer or boolean value carries no gradient)
                        if o not in chain_slots and _inexact(prog.avals[o]):
                            chain_slots.add(o)
                            frontier.append(o)
        if not meets:
            if chain_slots & outs:
                reasons[j] = "returned by loss_fn without meeting the examples"
            continue  # unused
        found = _simple_entries(prog, j, start, chain_nodes, meets, taps_at)
        if found is None:
            found = _tied_entries(prog, j, start, chain_nodes, meets, taps_at)
        if found is not None:
            entries += found
            continue
        why = _why_not_broadcast(prog, axes, chain_nodes, meets)
        if why is None:
            broadcast[j] = sorted({prog.nodes[k].name for k in meets})
        else:
            reasons[j] = why
    return entries, broadcast, reasons


def _inexact(aval):
    return jnp.issubdtype(aval.dtype, jnp.inexact)


def _simple_entries(prog, j, start, chain_nodes, meets, taps_at):
    """The leaf as the weight (or op bias) of one tapped contraction, reached through
    norm-keeping single-use steps, or (stacked on a scan's axis) one slice per step, each
    such; else ``None``."""
    users = prog.users.get(start, ())
    steps = [prog.nodes[k] for k in users]
    if len(users) > 1 and all(node.name == "scan_index" for node in steps):
        if len({node.params["t"] for node in steps}) != len(steps):
            return None
        branches = [(node.outs[0], [k]) for k, node in zip(users, steps, strict=True)]
    else:
        branches = [(start, [])]
    entries = []
    for s, path in branches:
        entry = _simple_entry(prog, j, s, path, taps_at)
        if entry is None:
            return None
        entries.append(entry)
    if sum(len(e.path) for e in entries) != len(chain_nodes) or len(entries) != len(meets):
        return None
    return entries


def _simple_entry(prog, j, s, path, taps_at):
    """One branch of ``_simple_entries``, from slot ``s`` reached by ``path``."""
    path = list(path)
    while True:
        users = prog.users.get(s, ())
        if len(users) != 1 or s in prog.outvars:
            return None
        k = users[0]
        if k in taps_at:
            break
        if not _keeps_norm(prog, prog.nodes[k]):
            return None
        path.append(k)
        s = prog.nodes[k].outs[0]
    tap = taps_at[k]
    if s == tap.w and s != tap.x:
        return _Entry(j, tap, "w", path)
    if s == tap.b and tap.call.y_axis != len(tap.call.y.shape) - 1:
        return _Entry(j, tap, "b", path)
    return None


def _keeps_norm(prog, node):
    """Whether ``node`` is a unary step that keeps the norm (a cast, reshape, transpose)."""
    if node.name not in _PASS or len(node.ins) != 1 or len(node.outs) != 1:
        return False
    return node.name != "broadcast_in_dim" or math.prod(prog.shape(node.outs[0])) == math.prod(
        prog.shape(node.ins[0]))  # fmt: skip


# Ops whose per-example w̄_i must not come from vmap of their transpose (a batched conv
# weight gradient on batch-sharded input is miscomputed by XLA:CPU; see DESIGN): a leaf
# they share with other calls keeps its per-example copies.
_CONVS = frozenset({"conv", "conv_transpose"})


def _tied_entries(prog, j, start, chain_nodes, meets, taps_at):
    """The leaf as the weight (or op bias) of several tapped calls (an embedding tied to
    the logits, a weight shared by layers or by a scan's steps), each reached through
    norm-keeping steps (or a scan step's slice); every use of the leaf one of them. Its
    per-example gradient is the sum over the calls (``_tied_norms``); else ``None``."""
    entries, seen, stack, dead = [], set(), [(start, [])], False
    while stack:
        s, path = stack.pop()
        if s in prog.outvars:
            return None
        for k in dict.fromkeys(prog.users.get(s, ())):
            tap, node = taps_at.get(k), prog.nodes[k]
            if _dead(prog, node, s):  # (an RNN's first step on a zero state)
                dead = True
            elif tap is not None and s == tap.w and s != tap.x:
                entries.append(_Entry(j, tap, "w", path, tied=True))
            elif (tap is not None and s == tap.b and s not in (tap.x, tap.w)
                  and tap.call.y_axis != len(tap.call.y.shape) - 1):  # fmt: skip
                entries.append(_Entry(j, tap, "b", path, tied=True))
            elif tap is None and (_keeps_norm(prog, node) or node.name == "scan_index"):
                seen.add(k)
                stack.append((node.outs[0], [*path, k]))
            else:
                return None
    if len(entries) < 2 - dead or seen != set(chain_nodes) or {e.tap.node for e in entries} != set(
            meets):  # fmt: skip
        return None
    if any(e.tap.call.rule.name in _CONVS for e in entries):
        return None  # (w̄_{k,i} by vmap of a conv's transpose: wrong on XLA:CPU, batch-sharded)
    return entries


_ZERO_KEEPING = frozenset({"broadcast_in_dim", "reshape", "convert_element_type", "transpose",
                           "copy", "copy_p", "squeeze", "expand_dims"})  # fmt: skip


def _dead(prog, node, s):
    """Whether ``node`` is a ``dot_general`` of ``s`` with zeros (a literal zero, broadcast,
    reshaped or cast: an RNN's initial state ``jnp.zeros``): nothing of it reaches ``s``'s
    gradient."""
    if node.name != "dot_general" or node.ins.count(s) != 1:
        return False
    other = node.ins[1 - node.ins.index(s)]
    while not isinstance(other, program.Lit):
        k = prog.producer.get(other)
        if k is None or prog.nodes[k].name not in _ZERO_KEEPING or not prog.nodes[k].ins:
            return False
        other = prog.nodes[k].ins[0]
    return not np.any(np.asarray(other.val))


def _why_not_broadcast(prog, axes, chain_nodes, meets):
    """Why a per-example copy of the leaf cannot be fed to where it meets the examples."""
    for k in chain_nodes:
        if prog.nodes[k].name in ("while",):
            return f"used inside `{prog.nodes[k].name}` within loss_fn"
    for k in meets:
        node = prog.nodes[k]
        known = node.apply or _op_of(node)
        if node.name not in _MEETS and known is None:
            return (
                f"used where it meets the examples' data at `{node.name}` within loss_fn,"
                " which this driver does not evaluate per example"
            )
        for s in (*node.ins, *node.outs):
            a = None if isinstance(s, program.Lit) else axes[s]
            if isinstance(a, program.Mixed):
                return f"used where the examples have no single axis: {a}"
    return None


# --------------------------------------------------------------------------------------
# Pass 3: one forward and one backward pass, on the flattened program.


def _bind(node, vals, per_example=False):
    if node.fn is not None:
        return node.fn(*vals)
    if per_example and node.apply is not None:  # a kept op call: its jaxpr has fixed shapes
        return [node.apply(*vals)]
    params = node.eqn.primitive.get_bind_params(node.eqn.params)  # as jax's eval_jaxpr
    out = node.eqn.primitive.bind(*vals, **params)
    return list(out) if node.eqn.primitive.multiple_results else [out]


def _meet(prog, axes, n, node, vals, batched):
    """``node`` evaluated example by example, where some operands are per-example copies
    ``(n, *shape)`` of leaf values: every other operand that carries the examples is cut
    into its examples (each keeps a size-1 examples' axis)."""
    out_shape = prog.shape(node.outs[0])
    out_ax = axes[node.outs[0]]
    rows = _rows_of_copies(prog, n, node, vals, batched, out_ax)
    if rows is not None:
        return rows
    aligned = node.name in _ALIGNED
    ops, in_axes, diag = [], [], []
    for s, v, is_b in zip(node.ins, vals, batched, strict=True):
        shape = prog.shape(s)
        ax = None if isinstance(s, program.Lit) else axes[s]
        lined = aligned and len(shape) == len(out_shape) and shape[out_ax] == n and n > 1
        if is_b:
            ops.append(v)
            in_axes.append(0)
            diag.append(lined)
            continue
        if ax is None and lined:
            ax = out_ax  # an example-free operand with a row per example (a dropout mask)
        if ax is None:
            ops.append(v)
            in_axes.append(None)
        else:
            ops.append(jnp.expand_dims(v, ax + 1))
            in_axes.append(ax)
        diag.append(False)

    def one(i, *ops):
        ops = [lax.dynamic_slice_in_dim(o, i, 1, out_ax) if dg else o
               for o, dg in zip(ops, diag, strict=True)]  # fmt: skip
        return _bind(node, ops, per_example=True)

    outs = jax.vmap(one, in_axes=(0, *in_axes))(jnp.arange(n), *ops)
    res = []
    for s, o in zip(node.outs, outs, strict=True):
        ax = axes[s]
        res.append(jnp.moveaxis(o, 0, ax).reshape(prog.avals[s].shape))
    return res


def _rows_of_copies(prog, n, node, vals, batched, out_ax):
    """``_meet`` of an elementwise ``node`` whose copied operands broadcast along the
    examples' axis (size 1 there, as a LayerNorm scale meets ``x̂``): copy ``i`` laid on row
    ``i`` of that axis, the node bound once, or ``None``. (The same values as ``_meet``'s
    ``vmap``, without its size-1 examples' axis, which made XLA:CPU reduce the copies'
    cotangents 12× slower.)"""
    if node.name not in program.ELEMENTWISE or node.fn is not None or len(node.outs) != 1:
        return None
    if not isinstance(out_ax, int):
        return None
    rank = len(prog.shape(node.outs[0]))
    ops = []
    for s, v, is_b in zip(node.ins, vals, batched, strict=True):
        shape = prog.shape(s)
        if is_b:
            if len(shape) != rank or shape[out_ax] != 1:
                return None
            v = jnp.moveaxis(v, 0, out_ax).reshape(*shape[:out_ax], n, *shape[out_ax + 1:])
        elif len(shape) != rank and shape != ():
            return None
        ops.append(v)
    return _bind(node, ops)


def _diagonal(prog, axes, n, node, is_b, users, op_axis):
    """Where a kept op call of a copied weight reads example-free ``x`` with a row per
    example (position ids ``broadcast_to(arange(T), (n, T))``) and every user of its
    output meets the examples' data aligned on the rows' axis: ``(x's operand index, that
    axis)`` (copy ``i`` then evaluates row ``i`` only, which ``_meet`` reads by slicing a
    size-1 axis; not ``n²`` rows). Else ``None``."""
    if node.apply is None or len(node.outs) != 1 or n < 2:
        return None
    out = node.outs[0]
    if out in prog.outvars or not users.get(out):
        return None
    free = [j for j, s in enumerate(node.ins) if not is_b[j] and not isinstance(s, program.Lit)
            and axes[s] is None and prog.shape(s)[:1] == (n,)]  # fmt: skip
    if len(free) != 1:
        return None
    a = op_axis(node, [0 if j == free[0] else None for j in range(len(node.ins))])
    if not isinstance(a, int):
        return None
    for u in users[out]:
        if u.name not in _ALIGNED or any(axes[o] != a for o in u.outs):
            return None
        if all(isinstance(s, program.Lit) or axes[s] is None for s in u.ins):
            return None  # not a meeting: it would read all the rows
        if len(prog.shape(u.outs[0])) != len(prog.shape(out)):
            return None
    return free[0], a


def _evaluate(prog, axes, n, values, taps, zs, broadcast, op_axis):
    """The losses, and the data operand of each tap: ``prog`` run with ``zs[k]`` added to
    tap ``k``'s output and each leaf in ``broadcast`` (``{slot: (n, *shape) copy}``);
    ``op_axis(node, in_axes)`` as for ``program.example_axes``."""
    env = dict(prog.consts)
    env.update(zip(prog.invars, values, strict=True))
    batched = set()
    for s, v in broadcast.items():
        env[s] = v
        batched.add(s)
    tap_of = {t.node: i for i, t in enumerate(taps)}
    xs = [None] * len(taps)
    users = {}
    for node in prog.nodes:
        for s in node.ins:
            if not isinstance(s, program.Lit):
                users.setdefault(s, []).append(node)

    def read(s):
        return s.val if isinstance(s, program.Lit) else env[s]

    for k, node in enumerate(prog.nodes):
        vals = [read(s) for s in node.ins]
        is_b = [not isinstance(s, program.Lit) and s in batched for s in node.ins]
        if not any(is_b):
            outs = _bind(node, vals)
        elif (diag := _diagonal(prog, axes, n, node, is_b, users, op_axis)) is not None:
            # copy i needs only row i (the meeting slices it): example-free rows cut too
            def row(i, *v, node=node, j=diag[0]):
                v = list(v)
                v[j] = lax.dynamic_slice_in_dim(v[j], i, 1, 0)
                return _bind(node, v, True)

            in_axes = [0 if b else None for b in is_b]
            outs = jax.vmap(row, in_axes=(0, *in_axes))(jnp.arange(n), *vals)
            batched.add(node.outs[0])
        elif all(isinstance(s, program.Lit) or axes[s] is None for s in node.ins):
            in_axes = [0 if b else None for b in is_b]
            outs = jax.vmap(lambda *v, node=node: _bind(node, v, True), in_axes=in_axes)(*vals)
            for i, s in enumerate(node.outs):  # integer values carry no gradient: one copy
                if _inexact(prog.avals[s]):
                    batched.add(s)
                else:
                    outs[i] = outs[i][0]
        else:
            outs = _meet(prog, axes, n, node, vals, is_b)
        i = tap_of.get(k)
        if i is not None:
            xs[i] = vals[node.ins.index(taps[i].x)]
            outs[0] = outs[0] + zs[i]
        env.update(zip(node.outs, outs, strict=True))
    return read(prog.outvars[0]), xs


def _chain_fn(prog, path):
    """The leaf -> operand map of an entry's path (unary steps)."""

    def f(v):
        for k in path:
            v = _bind(prog.nodes[k], [v])[0]
        return v

    return f



def _auto_axes(fn, x, specs):
    """``fn`` as is; on a mesh with Explicit axes (``x``'s), run under Auto axes with its
    results laid out by ``specs``: the rules reshape, unfold and contract the examples'
    axis freely, which Explicit axes would make each op spell out."""
    mesh = vma._explicit_mesh(x)
    if mesh is None:
        return lambda *a: jax.tree.leaves(fn(*a))
    out = tuple(jax.sharding.NamedSharding(mesh, s) for s in specs)
    return jax.sharding.auto_axes(lambda *a: tuple(jax.tree.leaves(fn(*a))), out_sharding=out)


def _sq_norms(call, x, g, dtype):
    """``call.rule.sq_norms`` (``(route, sq, w̄_i or None)``), under Auto axes if need be."""
    route = []

    w = _w_type(call, x)

    def arrays(x, g):
        name, sq, w_bars = call.rule.sq_norms(x, g, w, call.y_axis, dtype)
        route.append(name)
        return sq, w_bars

    P = jax.sharding.PartitionSpec
    specs = [P(vma._entry(x, 0))]  # laid out like the examples
    if vma._explicit_mesh(x) is not None:  # an abstract run tells whether w̄_i are formed
        formed = []
        probe = _auto_axes(lambda x, g: formed.append(arrays(x, g)[1]) or 0, x, [P()])
        jax.eval_shape(probe, x, g)
        specs += [P(specs[0][0], *(None,) * len(call.w.shape))] * (formed[0] is not None)
    sq, *w_bars = _auto_axes(arrays, x, specs)(x, g)
    return route[-1], sq, w_bars[0] if w_bars else None


def _tied_norms(prog, es, leaf, tapped, dtype):
    """``(route, ‖w̄_i‖² (n,), w̄_i or None, detail)`` for a leaf shared by the calls of
    ``es`` (``_tied_entries``): ``w̄_i = Σ_k w̄_{k,i}``, cross terms included.

    Route ``"per_example"``: each call's ``w̄_{k,i}`` from its op's rule
    (``rule.per_example_w``), mapped back to the leaf through the call's path and summed,
    a block of examples at a time (``ghost.in_blocks``: no ``n`` copies of the leaf);
    the sum is kept for ``Σ_i c_i w̄_i`` where ``ghost.keeps`` says so (no second weight
    gradient: then this route). Otherwise route ``"gram"`` where ``_tied_gram`` finds it
    cheaper: ``Σ_{k,l} ⟨U_k U_lᵀ, V_k V_lᵀ⟩`` over the calls' factors, in blocks. Either
    way the clipped sum is then each call's ``B_wᵀ(c ⊙ g_k; x_k)``, mapped back and summed."""
    xgs = [tapped(e.tap) for e in es]
    arrays = [a for xg in xgs for a in xg]
    in_axes = [a for e in es for a in (0, e.tap.call.y_axis)]
    n, size = arrays[0].shape[0], math.prod(leaf.shape)
    keep = ghost.keeps(n, size, sum(a.size for a in arrays))
    w_types = [_w_type(e.tap.call, x) for e, (x, _) in zip(es, xgs, strict=True)]
    zero = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
    P = jax.sharding.PartitionSpec
    x0 = arrays[0]
    specs = [P(vma._entry(x0, 0))]
    gram = None if keep else _tied_gram(prog, es, leaf, xgs, w_types, dtype)
    if gram is not None:
        rows, per_example = gram

        def gram_fn(*arrays):
            return [ghost.in_blocks(lambda *a: ghost.tied_gram_sq_norms(rows(*a)), list(arrays),
                                    in_axes, per_example)]  # fmt: skip

        sq = _auto_axes(gram_fn, x0, specs)(*arrays)[0]
        return "gram", sq, None, f"tied: {len(es)} calls, Gram over their rows"

    def rows(e, w_type, x, g):  # (k, *leaf.shape): this call's w̄_{k,i}, in the leaf's layout
        call = e.tap.call
        if e.role == "w":
            d, operand = call.rule.per_example_w(x, g, w_type, call.y_axis, dtype), e.tap.w
        else:
            d = _bias_rows(g.astype(dtype), call.y_axis, (len(call.y.shape) - 1,))
            operand = e.tap.b
        if e.path:  # back through the casts, reshapes, transposes (linear: any point will do)
            aval = prog.avals[operand]
            _, back = jax.vjp(_chain_fn(prog, e.path), jnp.zeros(zero.shape, zero.dtype))
            d = jax.vmap(lambda d: back(d.reshape(aval.shape).astype(aval.dtype))[0])(d)
        return d.reshape(d.shape[0], *leaf.shape).astype(dtype)

    def block(*arrays):
        total = sum(rows(e, w, x, g) for e, w, x, g in zip(
            es, w_types, arrays[::2], arrays[1::2], strict=True))  # fmt: skip
        sq = jnp.sum(total**2, axis=tuple(range(1, total.ndim)))
        return (sq, total) if keep else sq

    def arrays_fn(*arrays):
        got = ghost.in_blocks(block, list(arrays), in_axes, len(es) * size)  # (each call's)
        return got if keep else (got,)

    specs += [P(specs[0][0], *(None,) * len(leaf.shape))] * keep
    sq, *w_bars = _auto_axes(arrays_fn, x0, specs)(*arrays)
    detail = f"tied: {len(es)} calls, Σ_k w̄_k,i in blocks" + (", kept" if keep else "")
    return "per_example", sq, w_bars[0] if keep else None, detail


def _tied_gram(prog, es, leaf, xgs, w_types, dtype):
    """``(rows, per_example)`` for the Gram route of a tied leaf: ``rows(x_1, g_1, ...)``
    gives ``[(U_k, V_k)]`` for ``ghost.tied_gram_sq_norms`` (each call's factors, from its
    op's ``factors`` rule, on one split of the leaf's axes, columns in the leaf's order),
    ``per_example`` the elements a block forms per example. ``None`` where a call has no
    factors, a path does more than cast and transpose, the calls split the leaf's axes
    differently, or ``ghost.tied_gram_pays`` says the per-example sum is cheaper."""
    plans, split = [], None
    for e, (x, g), w in zip(es, xgs, w_types, strict=True):
        if e.role != "w":
            return None
        where = list(range(len(leaf.shape)))  # the leaf's axis of each of w's axes
        for k in e.path:
            node = prog.nodes[k]
            if node.name == "transpose":
                where = [where[a] for a in node.eqn.params["permutation"]]
            elif node.name == "scan_index" or prog.shape(node.outs[0]) != prog.shape(node.ins[0]):
                return None
        call, axes = e.tap.call, []

        def factors(x, g, call=call, w=w, axes=axes):
            got = call.rule.factors(x, g, w, call.y_axis, dtype)
            axes.append(None if got is None else got[2:])
            return None if got is None else got[:2]

        shapes = jax.eval_shape(factors, x, g)
        if axes[0] is None:
            return None
        a, b = ([where[i] for i in ax] for ax in axes[0])
        if sorted(a + b) != list(range(len(leaf.shape))):
            return None  # (w̄_i constant along an axis: not one product of the two)
        split = sorted(a) if split is None else split
        swap = sorted(b) == split
        if not swap and sorted(a) != split:
            return None
        u, v = (b, a) if swap else (a, b)
        dense = [not jnp.issubdtype(m.dtype, jnp.integer) for m in shapes]  # (else one-hot)
        plans.append((factors, swap, u, v, shapes[0].shape[1], dense[::-1] if swap else dense))
    sizes = [math.prod(leaf.shape[i] for i in split)]
    sizes.append(math.prod(leaf.shape) // sizes[0])

    def cost(dk, dl):  # multiply-adds per row pair of A_k A_lᵀ and B_k B_lᵀ (one-hot: 1)
        return sum(size if a and b else 1 for size, a, b in zip(sizes, dk, dl, strict=True))

    # The per-example sum: each call's w̄_{k,i}, T_k |u| |v| (a one-hot side: a scatter).
    per_ex = sum(T * math.prod(sz for sz, d in zip(sizes, dense, strict=True) if d)
                 for *_, T, dense in plans)  # fmt: skip
    gram = sum(Tk * Tl * cost(dk, dl)  # each pair once (k ≤ l)
               for i, (*_, Tk, dk) in enumerate(plans)
               for *_, Tl, dl in plans[: i + 1])  # fmt: skip
    if not ghost.tied_gram_pays(gram, per_ex):
        return None

    def ordered(M, axes):  # M's columns over the leaf's axes `axes` -> in the leaf's order
        if M.ndim == 2 or list(axes) == sorted(axes):
            return M
        M = M.reshape(*M.shape[:2], *(leaf.shape[i] for i in axes))
        M = jnp.transpose(M, (0, 1, *(2 + axes.index(i) for i in sorted(axes))))
        return M.reshape(*M.shape[:2], -1)

    def rows(*arrays):
        out = []
        for (factors, swap, u, v, _, _), x, g in zip(plans, arrays[::2], arrays[1::2],
                                                     strict=True):  # fmt: skip
            A, B = factors(x, g)
            U, V = (B, A) if swap else (A, B)
            out.append((ordered(U, u), ordered(V, v)))
        return out

    R = sum(T for *_, T, _ in plans)
    return rows, R * R + R * sum(sizes)


def _weight_grad(call, x, g):
    """``call.rule.weight_grad``: ``w̄ = B_wᵀ(g; x)``, under Auto axes if need be."""
    w = _w_type(call, x)
    return _auto_axes(lambda x, g: call.rule.weight_grad(x, g, w), x, [_w_spec(call)])(x, g)[0]


def _w_type(call, x):
    """``w``'s type for the rules: as traced, or (under ``_auto_axes``) shape and dtype only."""
    if vma._explicit_mesh(x) is None:
        return call.w
    return jax.ShapeDtypeStruct(call.w.shape, call.w.dtype)


def _w_spec(call):
    """How ``w̄`` is laid out: like ``w`` (replicated where ``w`` has no Explicit sharding)."""
    spec = getattr(getattr(call.w, "sharding", None), "spec", None)
    return jax.sharding.PartitionSpec() if spec is None else spec


def _zeros_like_type(aval):
    """Zeros of ``aval``'s shape and dtype, laid out as ``aval`` says on meshes with Explicit
    axes (so the cotangent of ``Z_k``, like ``y_k``, stays sharded over the examples)."""
    sharding = aval.sharding if vma._explicit_mesh(aval) is not None else None
    zeros = jnp.zeros(aval.shape, aval.dtype, out_sharding=sharding)
    return vma.varying_like(zeros, aval)  # inside shard_map: varying like y (else g is psummed)


def _bias_rows(g, y_axis, axes):
    """``(n, *[g.shape[a] for a in axes])``: ``g`` summed over every other axis, per example."""
    moved = [a + (a < y_axis) for a in axes]  # where the axes are once y_axis is first
    g = jnp.moveaxis(g, y_axis, 0)
    return jnp.sum(g, axis=tuple(i for i in range(1, g.ndim) if i not in moved))


def _scales_x(call, x, g) -> bool:
    """Whether the clipped sum ``Σ_i c_i B_wᵀ(g_i; x_i)`` scales ``x``'s rows rather than
    ``g``'s: both give it (``B_w`` is bilinear and example ``i``'s rows of ``x`` meet only
    its rows of ``g``), so the smaller one, where ``x`` is floating (not ``embed``'s ids)
    and no quantization recipe makes the product other than bilinear. (A scaled ``x``
    shared by several calls, as attention's q, k, v projections share theirs, is one
    array once XLA merges the equal products.)"""
    quantized = getattr(call.rule, "kw", {}).get("quant") is not None
    return jnp.issubdtype(x.dtype, jnp.inexact) and x.size < g.size and not quantized


def _weighted_sum(a, factors):
    """``Σ_i factors[i] a[i]`` over ``a``'s leading (examples') axis: ``(n, ...) -> (...)``.
    Rows of a matrix ``a: (n, k)`` (a bias, a copied vector): a reduction, which XLA fuses
    with ``a``'s producer. Wider ``a`` (``w̄_i``, a copied table, the textbook's per-example
    gradients): a matrix-vector product with ``a`` as ``(n, -1)``, as XLA:CPU runs a
    broadcast product reduced over a leading axis tens of times slower (``(32, 128, 512)``:
    42 ms against 0.5 ms; the bench CNN's ``(128, 3, 3, 64, 64)``: 18 against 1.4 ms). On a
    mesh with Explicit axes always a reduction: a contraction over the sharded examples'
    axis would need an ``out_sharding``."""
    f = factors.astype(a.dtype)
    if a.ndim <= 2 or vma._explicit_mesh(a) is not None:
        return jnp.sum(_example_scaled(a, f, 0), axis=0)
    flat = a.reshape(a.shape[0], -1)
    return jnp.matmul(f, flat, precision=lax.Precision.HIGHEST).reshape(a.shape[1:])


def _example_scaled(g, factors, y_axis):
    """``g`` with example ``i``'s slice (along ``y_axis``) scaled by ``factors[i]``."""
    shape = [1] * g.ndim
    shape[y_axis] = factors.shape[0]
    return g * factors.reshape(shape).astype(g.dtype)


# --------------------------------------------------------------------------------------
# Validation.


def _check_args(fn: str, args) -> int:
    """The number of examples ``n``: the common leading size of every array in ``args``."""
    flat = jax.tree_util.tree_flatten_with_path(args)[0]
    if not flat:
        raise ValueError(
            f"{fn}: `args` holds no arrays; pass the batch (examples along axis 0) after `params`"
        )
    first_name = first_shape = None
    for path, a in flat:
        name = "args" + jax.tree_util.keystr(path)
        shape = getattr(a, "shape", None)
        if shape is None or not hasattr(a, "dtype"):
            raise TypeError(
                f"{fn}: `{name}` must be an array with the examples along axis 0,"
                f" got {type(a).__name__}"
            )
        if len(shape) == 0:
            raise ValueError(f"{fn}: `{name}` must have the examples along axis 0, got a 0-d array")
        if first_shape is None:
            first_name, first_shape = name, tuple(shape)
        elif shape[0] != first_shape[0]:
            raise ValueError(
                f"{fn}: `{name}` has leading size {shape[0]} (shape {tuple(shape)}) but"
                f" `{first_name}` has {first_shape[0]} (shape {first_shape}); every array in"
                " `args` must have the same number of examples along axis 0"
            )
    return int(first_shape[0])


def _check_params(fn: str, params):
    """Params leaves as jax arrays, their names, and the treedef."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not flat:
        raise ValueError(f"{fn}: `params` has no array leaves")
    names, leaves = [], []
    for path, a in flat:
        name = "params" + jax.tree_util.keystr(path)
        a = jnp.asarray(a)
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(
                f"{fn}: `{name}` has dtype {a.dtype}; every params leaf must be real floating"
            )
        names.append(name)
        leaves.append(a)
    return leaves, names, treedef


def _check_losses(fn: str, out, n: int) -> None:
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise TypeError(
            f"{fn}: `loss_fn` must return one array of per-example losses of shape ({n},),"
            f" got {jax.tree.structure(out)}"
        )
    if out.shape != (n,):
        hint = " (a scalar: return the per-example losses, not their sum or mean)"
        raise ValueError(
            f"{fn}: `loss_fn` must return per-example losses of shape ({n},) (one per example"
            f" along axis 0 of `args`), got shape {out.shape}{hint if out.shape == () else ''}"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"{fn}: `loss_fn` must return real floating losses, got dtype {out.dtype}")


def _check_keywords(fn: str, fallback, plan) -> None:
    if fallback not in _FALLBACKS:
        raise ValueError(f"{fn}: `fallback` must be one of {_FALLBACKS}, got {fallback!r}")
    if plan not in _PLANS:
        raise ValueError(f"{fn}: `plan` must be one of {_PLANS}, got {plan!r}")


def _check_clip_norm(fn: str, clip_norm) -> None:
    if clip_norm is None:
        raise ValueError(f"{fn}: `clip_norm` must be a finite number > 0, got None")
    if np.ndim(clip_norm) != 0:
        raise ValueError(f"{fn}: `clip_norm` must be a scalar, got shape {np.shape(clip_norm)}")
    try:
        value = float(clip_norm)
    except jax.errors.ConcretizationTypeError:
        return  # a traced value: it cannot be checked at trace time
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{fn}: `clip_norm` must be a finite number > 0, got {value}")


# --------------------------------------------------------------------------------------
# The driver.


def _per_example(fn, loss_fn, params, args, fallback, clip, clip_norm=None, report=None,
                 plan="auto"):  # fmt: skip
    """Norms ``(n,)``; with ``clip``, ``(clipped gradient, norms)``. Appends to ``report``
    (a ``_Rows``: the rows, and the plan that runs)."""
    _check_keywords(fn, fallback, plan)
    if clip:
        _check_clip_norm(fn, clip_norm)
    n = _check_args(fn, args)
    leaves, names, treedef = _check_params(fn, params)
    L = len(leaves)
    dtype = jnp.result_type(*(a.dtype for a in leaves), jnp.float32)  # norms' dtype

    # Pass 1: the traced program (the op calls at its top level seen by their taps).
    recorders = []

    def discover(leaf_tracers, args):
        recorders.append(_Discover(n, leaf_tracers))
        return taps.recording(recorders[-1], loss_fn, treedef.unflatten(leaf_tracers), *args)

    closed, out = jax.make_jaxpr(discover, return_shape=True)(leaves, args)
    _check_losses(fn, out, n)
    calls = recorders[0].calls
    keep = {id(c.vars[3]) for c in calls if c.vars[3] is not None}
    prog = program.Program(closed, keep, lambda eqn: bilinear.op_call(eqn) is not None)
    recorded = {}
    for c in calls:
        if c.vars[3] is not None and id(c.vars[3]) in prog.slot_of:
            slots = tuple(None if v is None else prog.slot_of.get(id(v)) for v in c.vars)
            k = prog.producer.get(slots[3])
            if k is not None and None not in slots[:2]:
                recorded[k] = (c, slots[:3])
    arg_slots = prog.invars[L:]
    recorded_nodes = {id(prog.nodes[k]): (c, xwb) for k, (c, xwb) in recorded.items()}
    for k, (c, xwb) in recorded.items():  # evaluated per example through the op itself
        prog.nodes[k].apply = _reordered(c.apply, prog.nodes[k].ins, xwb)
    for node in prog.nodes:
        found = _op_of(node) if node.apply is None else None
        if found is not None:  # (its operands: x, w[, b])
            xwb = (*node.ins[:2], node.ins[2] if len(node.ins) > 2 else None)
            node.apply = _reordered(found[2], node.ins, xwb)

    def op_axis(node, ins):  # the family's op calls: where their rules put the examples
        call, xwb = recorded_nodes.get(id(node), (None, None))
        if call is None:
            return _op_axis(node, ins)
        axis = dict(zip(node.ins, ins, strict=True))  # (the op's operands, in its order)
        x_axis, others = axis.get(xwb[0]), [axis.get(s) for s in xwb[1:] if s is not None]
        if call.reason is None and x_axis == 0 and all(a is None for a in others):
            return call.y_axis
        if call.reason is not None:
            return program.Mixed(call.reason)
        if x_axis != 0:
            where = "nowhere" if x_axis is None else f"on axis {x_axis}"
            return program.Mixed(
                f"the {call.rule.name} op's input `x` (shape {call.x_shape}) has the examples"
                f" {where}, not on axis 0"
            )
        return program.Mixed(f"the {call.rule.name} op's `w` carries the examples")

    axes = program.example_axes(prog, dict.fromkeys(arg_slots, 0), op_axis)

    # Pass 2: the plan.
    entries, broadcast, reasons = _plan(prog, axes, n, L, recorded)
    routed = {e.leaf for e in entries} | set(broadcast)
    other = sorted(reasons)
    if other and fallback == "raise" and plan != "vmap" and report is None:
        j = other[0]
        raise ValueError(
            f"{fn}: `{names[j]}` is {reasons[j]}, so its per-example gradient norm has no"
            " structural formula here; pass fallback='vmap' to compute the norms of the whole"
            " model from per-example gradients (jax.vmap of jax.grad)"
        )

    def tapped_avals(t):  # a tap's data operand and output, as traced (shape and dtype)
        return tuple(jax.ShapeDtypeStruct(prog.avals[s].shape, prog.avals[s].dtype)
                     for s in (t.x, prog.nodes[t.node].outs[0]))  # fmt: skip

    chosen, why, estimate = _choose(
        plan, fallback, other, lambda: _estimate(entries, tapped_avals, dtype, n))
    if report is not None:
        report.plan, report.why, report.estimate = chosen, why, estimate
    if chosen != "structural" and (report is None or other):  # (routes: every leaf's route)
        return _textbook(loss_fn, leaves, names, treedef, args, reasons, routed, clip,
                         clip_norm, dtype, report)  # fmt: skip
    taps_used = list({id(e.tap): e.tap for e in entries}.values())
    tap_index = {id(t): i for i, t in enumerate(taps_used)}
    zs = [_zeros_like_type(prog.avals[prog.nodes[t.node].outs[0]]) for t in taps_used]
    bcast = sorted(broadcast)
    qs = [jnp.zeros((n, *leaves[j].shape), leaves[j].dtype) for j in bcast]
    arg_values = jax.tree.leaves(args)

    # Pass 3: one forward and one backward pass that stops at the g's.
    def losses_of(zs, qs):
        values = list(leaves)
        copies = {prog.invars[j]: values[j][None] + q for j, q in zip(bcast, qs, strict=True)}
        return _evaluate(prog, axes, n, values + arg_values, taps_used, zs, copies, op_axis)

    losses, pullback, xs = jax.vjp(losses_of, zs, qs, has_aux=True)
    gs, w_copies = pullback(jnp.ones_like(losses))

    def tapped(t):
        i = tap_index[id(t)]
        x, g = xs[i], gs[i]
        if t.x_fn is not None:
            x = t.x_fn(x)
        if t.y_perm is not None:
            g = jnp.transpose(g, t.y_perm)
        return x, g

    sq = 0  # then (n,), laid out like the examples
    routes: dict[int, Route] = {}
    w_bars = {}  # entry -> per-example w̄_i (or b̄_i), where the route formed them
    tied = {}  # leaf -> its calls' entries (one per-example gradient: their sum)
    for e in entries:
        if e.tied:
            tied.setdefault(e.leaf, []).append(e)
            continue
        call = e.tap.call
        x, g = tapped(e.tap)
        if e.role == "w":
            route, sq_w, w_bars[id(e)] = _sq_norms(call, x, g, dtype)
            sq = sq + sq_w
        else:
            route, rows = "bias", _bias_rows(g.astype(dtype), call.y_axis, (len(call.y.shape) - 1,))
            sq = sq + jnp.sum(rows**2, axis=tuple(range(1, rows.ndim)))
            w_bars[id(e)] = rows  # kept: the clipped sum needs no g
        detail = f"x {call.x_shape} -> y {call.y.shape}"
        routes[e.leaf] = Route(names[e.leaf], route, call.rule.name, detail)
    tied_bars = {}  # leaf -> Σ_k w̄_{k,i}, where formed and kept
    for j, es in tied.items():
        route, sq_j, tied_bars[j], detail = _tied_norms(prog, es, leaves[j], tapped, dtype)
        sq = sq + sq_j
        op = "+".join(dict.fromkeys(e.tap.call.rule.name for e in es))
        routes[j] = Route(names[j], route, op, detail)
    for j, w_i in zip(bcast, w_copies, strict=True):
        sq = sq + jnp.sum(jnp.square(w_i.astype(dtype)), axis=tuple(range(1, w_i.ndim)))
        detail = f"per-example copy {(n, *leaves[j].shape)} at " + ", ".join(
            f"`{p}`" for p in broadcast[j])
        route = "bias" if broadcast[j] in (["add"], ["add_any"]) else "broadcast"
        routes[j] = Route(names[j], route, None, detail)
    if report is not None:
        for j in range(L):
            if j in routes:
                report.append(routes[j])
            else:
                report.append(Route(names[j], "unused", None, "not used by loss_fn"))
    norms = jnp.sqrt(sq) if routes else jnp.zeros((n,), dtype)  # all unused: 0
    if not clip:
        return norms

    C = jnp.asarray(clip_norm, dtype)
    factors = C / jnp.maximum(norms, C)  # min(1, C/‖∇ℓ_i‖), 1 at a zero norm
    grads: list = [None] * L
    for j, w_i in tied_bars.items():
        if w_i is not None:  # Σ_i c_i Σ_k w̄_{k,i}
            grads[j] = _weighted_sum(w_i, factors).astype(leaves[j].dtype)
    for e in entries:
        if tied_bars.get(e.leaf) is not None:
            continue
        call = e.tap.call
        x, g = tapped(e.tap)
        if w_bars.get(id(e)) is not None:  # Σ_i c_i w̄_i (or Σ_i c_i b̄_i)
            d = _weighted_sum(w_bars[id(e)], factors)
        elif _scales_x(call, x, g):  # B_wᵀ(g; c ⊙ x): the op's own transpose, x's rows scaled
            d = _weight_grad(call, _example_scaled(x, factors, 0), g)
        else:  # B_wᵀ(c ⊙ g; x): g's rows scaled
            d = _weight_grad(call, x, _example_scaled(g, factors, call.y_axis))
        if e.path:  # back through the casts, reshapes, transposes (and a step's slice)
            operand = prog.avals[e.tap.w if e.role == "w" else e.tap.b]
            _, back = jax.vjp(_chain_fn(prog, e.path), leaves[e.leaf])
            d = back(d.reshape(operand.shape).astype(operand.dtype))[0]
        d = d.reshape(leaves[e.leaf].shape).astype(leaves[e.leaf].dtype)
        grads[e.leaf] = d if grads[e.leaf] is None else grads[e.leaf] + d
    for j, w_i in zip(bcast, w_copies, strict=True):
        d = _weighted_sum(w_i.astype(dtype), factors)
        grads[j] = d.astype(leaves[j].dtype)
    grads = [jnp.zeros_like(a) if d is None else d for a, d in zip(leaves, grads, strict=True)]
    return treedef.unflatten(grads), norms



def _textbook(loss_fn, leaves, names, treedef, args, reasons, routed, clip, clip_norm, dtype,
              report):  # fmt: skip
    """Norms (and the clipped sum) from ``jax.vmap`` of ``jax.grad`` of the whole model: the
    plan when some leaf has no structural route (a second pass for those leaves alone would
    cost about as much as this, on top of the structural pass)."""

    def one(*example):  # every array of args without its leading axis
        batch_of_one = jax.tree.map(lambda a: a[None], example)
        return jax.grad(lambda v: loss_fn(treedef.unflatten(v), *batch_of_one)[0])(leaves)

    per = jax.vmap(one)(*args)  # (n, *leaf.shape) each
    sq = sum(jnp.sum(jnp.square(d.astype(dtype)), axis=tuple(range(1, d.ndim))) for d in per)
    norms = jnp.sqrt(sq)
    if report is not None:
        why = f"whole-model vmap(grad): {_leaves(len(reasons))}"
        for j, name in enumerate(names):
            if j in reasons:
                report.append(Route(name, "fallback", None, reasons[j]))
            elif j in routed:
                report.append(Route(name, "vmap", None, why))
            else:
                report.append(Route(name, "unused", None, "not used by loss_fn"))
    if not clip:
        return norms
    C = jnp.asarray(clip_norm, dtype)
    factors = C / jnp.maximum(norms, C)
    grads = [_weighted_sum(d.astype(dtype), factors).astype(a.dtype)
             for d, a in zip(per, leaves, strict=True)]  # fmt: skip
    return treedef.unflatten(grads), norms


# --------------------------------------------------------------------------------------
# The plan: structural, or vmap(grad) of the whole model where that is cheaper.

# The plan's cost model (``PlanEstimate``), per backend. BYTE_FLOPS: flops that one byte
# of memory traffic is worth (roughly the machine's flops per byte of bandwidth).
# GROUPED_CONV: how much dearer a flop of a grouped convolution is (``vmap`` of a conv's
# weight gradient binds one; XLA:CPU ran them 3–5× slower per flop than the routes' work
# on the bench CNN). VMAP_SLOWDOWN: the weight on the textbook's count: ``"auto"`` takes
# ``vmap(grad)`` only where its count is below ``1 / VMAP_SLOWDOWN`` of the structural
# plan's (the whole-model ratios measured on the bench models ranged 1.0–1.6 times the
# counted ones, docs/DESIGN.md). CPU: calibrated there; GPU/TPU: not measured.
BYTE_FLOPS = {"cpu": 8.0, "gpu": 60.0, "tpu": 100.0}
GROUPED_CONV = {"cpu": 4.0, "gpu": 1.0, "tpu": 1.0}
VMAP_SLOWDOWN = {"cpu": 1.5, "gpu": 1.5, "tpu": 1.5}


class PlanEstimate(NamedTuple):
    """What ``plan="auto"`` compares (``RouteReport.estimate``): the work each plan does
    beyond the forward pass and the backward pass to the layers' output cotangents (which
    both do), counted on the traced programs of each tapped weight (``_work``: flops of
    the contractions, a grouped convolution's weighted by ``GROUPED_CONV``; bytes of the
    arrays they read and write).

    The structural plan's part is each tapped weight's norm route (Grams, ``w̄_i``) and its
    clipped sum (``B_wᵀ(c ⊙ g; x)`` or ``Σ c_i w̄_i``); ``vmap(grad)``'s is each weight's
    ``n`` per-example gradients, their squares and their scaled sum, at ``vmap_slowdown``
    times its count. Leaves on per-example copies and biases form the same ``n``
    per-example gradients in both plans (they cancel).
    """

    structural_flops: float
    structural_bytes: float
    vmap_flops: float
    vmap_bytes: float
    byte_flops: float  # flops one byte of memory traffic costs (BYTE_FLOPS)
    vmap_slowdown: float  # VMAP_SLOWDOWN

    def cost(self, plan: str) -> float:
        """Flops plus ``byte_flops`` per byte (times ``vmap_slowdown`` for ``"vmap"``)."""
        if plan == "structural":
            return self.structural_flops + self.byte_flops * self.structural_bytes
        return self.vmap_slowdown * (self.vmap_flops + self.byte_flops * self.vmap_bytes)

    def __str__(self):
        s_cost, v_cost = self.cost("structural") / 1e9, self.cost("vmap") / 1e9
        return (f"structural {self.structural_flops / 1e9:.3g} GFLOP +"
                f" {self.structural_bytes / 2**20:.3g} MiB = {s_cost:.3g} vs vmap"
                f" {self.vmap_flops / 1e9:.3g} GFLOP + {self.vmap_bytes / 2**20:.3g} MiB ×"
                f" {self.vmap_slowdown:g} = {v_cost:.3g} (GFLOP, {self.byte_flops:g} per byte)")


def _choose(plan, fallback, other, estimate_fn):
    """``(plan that runs, why, PlanEstimate or None)``; ``estimate_fn()`` only for "auto"."""
    if other and plan != "vmap":
        if fallback == "raise":  # (per_example_routes; the others raise)
            return "none", f"{_leaves(len(other))} and fallback='raise'", None
        return "vmap", _leaves(len(other)), None
    if plan != "auto":
        return plan, f"plan={plan!r}", None
    if fallback == "raise":
        return "structural", "auto: fallback='raise' rules out vmap(grad)", None
    estimate = estimate_fn()
    if estimate is None:  # nothing tapped: copies and biases only, alike in both plans
        return "structural", "auto: no tapped weight, the plans do alike", None
    pick = "vmap" if estimate.cost("vmap") < estimate.cost("structural") else "structural"
    return pick, f"auto: {estimate}", estimate


def _leaves(k):
    return f"{k} leaf has no structural route" if k == 1 else f"{k} leaves have no structural route"


def _estimate(entries, tapped_avals, dtype, n):
    """``PlanEstimate`` from each tapped weight's two small programs (traced abstractly,
    once per distinct shape), or ``None`` when no weight is tapped."""
    factors = jax.ShapeDtypeStruct((n,), dtype)
    totals, seen = [0.0] * 4, {}
    for e in entries:
        if e.role != "w":
            continue
        t, call = e.tap, e.tap.call
        x_raw, g_raw = tapped_avals(t)
        key = (call.rule.name, repr(sorted(getattr(call.rule, "kw", {}).items())), x_raw,
               g_raw, call.w.shape, str(call.w.dtype), call.y_axis, t.y_perm,
               t.x_fn is None)  # fmt: skip
        if key not in seen:
            def oriented(x, g, t=t):
                return (x if t.x_fn is None else t.x_fn(x),
                        g if t.y_perm is None else jnp.transpose(g, t.y_perm))  # fmt: skip

            def structural(x, g, c, call=call, oriented=oriented):
                x, g = oriented(x, g)
                _, sq, w_bars = _sq_norms(call, x, g, dtype)
                if w_bars is not None:  # (as pass 3 forms them)
                    return sq, jnp.sum(_example_scaled(w_bars, c, 0), axis=0)
                return sq, _weight_grad(call, x, _example_scaled(g, c, call.y_axis))

            def textbook(x, g, c, call=call, oriented=oriented):
                x, g = oriented(x, g)
                w = _w_type(call, x)
                one = lambda x_i, g_i: call.rule.weight_grad(  # noqa: E731
                    x_i[None], jnp.expand_dims(g_i, call.y_axis), w)
                w_bars = jax.vmap(one, in_axes=(0, call.y_axis))(x, g).astype(dtype)
                sq = jnp.sum(w_bars**2, axis=tuple(range(1, w_bars.ndim)))
                return sq, _weighted_sum(w_bars, c)

            seen[key] = [*_work(jax.make_jaxpr(structural)(x_raw, g_raw, factors).jaxpr),
                         *_work(jax.make_jaxpr(textbook)(x_raw, g_raw, factors).jaxpr)]  # fmt: skip
        totals = [a + b for a, b in zip(totals, seen[key], strict=True)]
    if not seen:
        return None
    return PlanEstimate(*totals, BYTE_FLOPS.get(_backend(), BYTE_FLOPS["gpu"]),
                        VMAP_SLOWDOWN.get(_backend(), VMAP_SLOWDOWN["gpu"]))  # fmt: skip


def _backend():
    return jax.default_backend()


def _nbytes(aval):
    return math.prod(aval.shape) * jnp.dtype(aval.dtype).itemsize


def _work(jaxpr, times=1):
    """``(flops, bytes)`` of a jaxpr: ``2·m·k·n`` per contraction (``dot_general``, conv;
    a grouped conv's times ``GROUPED_CONV``) and the bytes of the arrays XLA reads or
    writes in memory: contractions' operands and results, reductions' operands, scatters'
    and gathers' results (elementwise work is taken as fused into them). Sub-jaxprs
    counted, a scan's body ``length`` times."""
    flops = nbytes = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        ins = [v.aval for v in eqn.invars if hasattr(v.aval, "shape")]
        outs = [v.aval for v in eqn.outvars]
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            k = math.prod(ins[0].shape[a] for a in lc)
            flops += 2.0 * math.prod(outs[0].shape) * k
            nbytes += sum(map(_nbytes, ins + outs))
        elif name == "conv_general_dilated":
            rhs, spec = ins[1], eqn.params["dimension_numbers"].rhs_spec
            per_out = math.prod(rhs.shape) // rhs.shape[spec[0]]  # in-features × window
            groups = max(eqn.params["feature_group_count"], eqn.params["batch_group_count"])
            rate = 1.0 if groups == 1 else GROUPED_CONV.get(_backend(), GROUPED_CONV["gpu"])
            flops += 2.0 * math.prod(outs[0].shape) * per_out * rate
            nbytes += sum(map(_nbytes, ins + outs))
        elif name.startswith(("reduce_", "argm", "cum")):
            nbytes += sum(map(_nbytes, ins))
        elif name.startswith(("scatter", "gather")):
            nbytes += sum(map(_nbytes, outs))
        steps = eqn.params.get("length", 1) if name == "scan" else 1
        for p in eqn.params.values():
            for sub in p if isinstance(p, tuple) else (p,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's
                if hasattr(sub, "eqns"):
                    f, b = _work(sub, steps)
                    flops, nbytes = flops + f, nbytes + b
    return flops * times, nbytes * times


# --------------------------------------------------------------------------------------
# Public functions.


def per_example_grad_norms(loss_fn: Callable, params, *args, fallback: str = "vmap",
                           plan: str = "auto"):
    r"""``‖∇_params ℓ_i‖₂`` for every example ``i``, from the layers' structure.

        ‖∇ℓ_i‖² = Σ_layers ‖X_iᵀ G_i‖²_F + ‖Σ_t G_i[t]‖²  (+ the fallback leaves' ‖·‖²)

    One forward and one backward pass (the backward pass stops at each layer's output
    cotangent ``G``; no weight gradient is formed), plus ``O(n (d_in + d_out))`` work per
    2-D layer; inputs with a sequence axis take the Gram or per-example route (see
    ``per_example_routes``).

    Args:
      loss_fn: ``loss_fn(params, *args) -> (n,)`` per-example losses. Example ``i`` is
        index ``i`` along axis 0 of every array in ``args``, and loss ``i`` depends on
        example ``i`` only (no statistics across the batch).
      params: a pytree of real floating arrays. Each leaf gets a structural route (the
        module docstring); a leaf with none gets ``fallback``.
      *args: pytrees of arrays, each with the ``n`` examples along axis 0.
      fallback: when a leaf has no structural route: ``"vmap"`` (the whole model by
        ``jax.vmap`` of ``jax.grad``) or ``"raise"`` (a ``ValueError`` naming the leaf and
        the reason; ``plan="auto"`` then never takes ``vmap(grad)`` either).
      plan: ``"auto"`` (the structural plan, or ``jax.vmap`` of ``jax.grad`` of the whole
        model where ``PlanEstimate`` counts it cheaper), ``"structural"`` or ``"vmap"``
        (forced; ``"vmap"`` needs no route, so it never raises). ``per_example_routes``
        says which runs and why.

    Returns:
      ``(n,)`` norms in the widest floating dtype of ``params`` (at least float32).

    Raises:
      TypeError: ``loss_fn`` returns something other than one real floating array;
        non-float params leaves; non-array ``args``.
      ValueError: losses not of shape ``(n,)``; ``args`` of different leading sizes;
        a leaf needing the fallback when ``fallback="raise"`` (and ``plan`` is not
        ``"vmap"``); an unknown ``fallback`` or ``plan``.

    Examples:
      >>> import jax.numpy as jnp, jaxlinear
      >>> p = jaxlinear.Params(jnp.array([[1.0], [2.0]]), jnp.array([0.0]))
      >>> x = jnp.array([[2.0, 2.0], [0.0, 0.0]])
      >>> loss = lambda p, x: jaxlinear.linear(p, x)[:, 0]  # dW_i = x_i, db_i = 1
      >>> jaxlinear.per_example_grad_norms(loss, p, x).tolist()  # sqrt(‖x_i‖² + 1)
      [3.0, 1.0]
    """
    return _per_example("per_example_grad_norms", loss_fn, params, args, fallback, False,
                        plan=plan)


def clipped_grad(loss_fn: Callable, params, *args, clip_norm, fallback: str = "vmap",
                 plan: str = "auto"):
    r"""``Σ_i min(1, C / ‖∇ℓ_i‖) ∇ℓ_i`` and the norms ``‖∇ℓ_i‖``: per-example clipping.

        c_i = min(1, C / ‖∇ℓ_i‖),   W̄ = Xᵀ diag(c) G,   b̄ = Σ_i c_i Σ_t G_i[t]

    On the structural plan the norms come from ``per_example_grad_norms``' pass; the
    clipped gradient of each dense layer is its own pullback applied to ``G`` with row
    ``i`` scaled by ``c_i`` (one more set of ``Xᵀ G`` contractions, no second backward pass
    through the network; on the ``"per_example"`` sequence route, whose norms formed each
    ``dW_i``, ``Σ_i c_i dW_i``).
    Leaves on a per-example copy get ``Σ_i c_i Q̄_i``. On the ``"vmap"`` plan (see
    ``plan``) every leaf's ``Σ_i c_i ∇ℓ_i`` comes from its per-example gradients.
    ``c_i = 1`` at a zero norm.

    Args:
      loss_fn: ``loss_fn(params, *args) -> (n,)`` per-example losses, as in
        ``per_example_grad_norms``: example ``i`` is index ``i`` along axis 0 of every
        array in ``args``, and loss ``i`` depends on example ``i`` only.
      params: a pytree of real floating arrays (the structural and fallback leaves as in
        ``per_example_grad_norms``).
      *args: pytrees of arrays, each with the ``n`` examples along axis 0.
      clip_norm: ``C > 0``, a scalar (checked at trace time when it is not traced).
      fallback: when a leaf has no structural route: ``"vmap"`` (the whole model by
        ``jax.vmap`` of ``jax.grad``) or ``"raise"`` (a ``ValueError`` naming the leaf),
        as in ``per_example_grad_norms``.
      plan: ``"auto"``, ``"structural"`` or ``"vmap"``, as in ``per_example_grad_norms``.

    Returns:
      ``(grads, norms)``: ``grads`` in the structure and dtypes of ``params``; ``norms``
      ``(n,)`` the unclipped per-example norms.

    Raises:
      TypeError: as in ``per_example_grad_norms``.
      ValueError: as in ``per_example_grad_norms``, and for a ``clip_norm`` that is not a
        finite scalar ``> 0``.

    Examples:
      >>> import jax.numpy as jnp, jaxlinear
      >>> p = jaxlinear.Params(jnp.array([[1.0], [2.0]]), None)
      >>> x = jnp.array([[3.0, 4.0], [0.0, 1.0]])
      >>> grads, norms = jaxlinear.clipped_grad(lambda p, x: jaxlinear.linear(p, x)[:, 0],
      ...                                       p, x, clip_norm=2.5)
      >>> norms.tolist(), grads.W[:, 0].tolist()  # dW_i = x_i; c = (1/2, 1): x_0 / 2 + x_1
      ([5.0, 1.0], [1.5, 3.0])
    """
    return _per_example("clipped_grad", loss_fn, params, args, fallback, True, clip_norm,
                        plan=plan)


def per_example_routes(loss_fn: Callable, params, *args, fallback: str = "vmap",
                       plan: str = "auto") -> RouteReport:
    r"""Which route gives each params leaf its per-example gradient norm, and why.

    Traces ``loss_fn`` as ``per_example_grad_norms`` does (abstractly: nothing is
    computed) and reports the plan that runs (``RouteReport.plan``: ``"structural"`` or
    ``"vmap"``; ``"none"`` where ``fallback="raise"`` would raise) and why
    (``RouteReport.why``, with ``RouteReport.estimate`` where ``plan="auto"`` compared the
    two), and per leaf: ``"rank_one"``, ``"gram"`` (ghost norms: no per-example gradient
    formed), ``"per_example"`` (the op's transpose in ``w`` under ``jax.vmap``: ``n``
    copies of that leaf's gradient; a leaf used by several calls reads ``"gram"`` or
    ``"per_example"`` with detail ``"tied: K calls ..."`` and ``op`` their ops joined by
    ``+``: the Gram over the calls' rows, or their ``w̄_{k,i}`` summed), ``"bias"``,
    ``"broadcast"`` (``n`` copies of the leaf where it meets the examples), ``"fallback"``
    (with the reason; then every other leaf reads ``"vmap"``: the whole model takes
    ``jax.vmap`` of ``jax.grad``) or ``"unused"``. Where "auto" picks ``vmap(grad)``
    although every leaf has a route, the rows keep the routes the structural plan would
    take.

    Args:
      loss_fn: ``loss_fn(params, *args) -> (n,)`` per-example losses, as in
        ``per_example_grad_norms``.
      params: a pytree of real floating arrays.
      *args: pytrees of arrays, each with the ``n`` examples along axis 0.
      fallback: as in ``per_example_grad_norms`` (here it never raises: the report says).
      plan: as in ``per_example_grad_norms``.

    Returns:
      A ``RouteReport``: a tuple of ``Route(leaf, route, op, detail)`` in the order of
      ``jax.tree.leaves(params)``, with ``.plan``, ``.why`` and ``.estimate``; ``print()``
      it for the plan and a table, ``.counts()`` for a summary.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> layers = jaxlinear.init_mlp(jax.random.key(0), [3, 4, 2])
      >>> loss = lambda p, x: jnp.sum(jaxlinear.mlp(p, x), axis=-1)
      >>> report = jaxlinear.per_example_routes(loss, layers, jnp.ones((5, 3), jnp.float32))
      >>> [(r.leaf, r.route) for r in report][:2]
      [('params[0].W', 'rank_one'), ('params[0].b', 'bias')]
      >>> report.plan
      'structural'
    """
    _check_keywords("per_example_routes", fallback, plan)
    report = _Rows()
    jax.eval_shape(
        lambda params, args: _per_example(
            "per_example_routes", loss_fn, params, args, fallback, False, report=report,
            plan=plan,
        ),
        params,
        args,
    )
    return RouteReport(report, report.plan, report.why, report.estimate)


class _Rows(list):
    """``Route`` rows as the driver appends them, and the plan it chose."""

    plan, why, estimate = "structural", "", None
