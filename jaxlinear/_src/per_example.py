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

How leaves are matched to ops (all at trace time):

1. *Discovery*: ``loss_fn`` is traced once with ``jax.make_jaxpr``; every op call passes
   through ``taps.call``, and the recorder notes the jaxpr variables of its operands and
   output. A params leaf is *structural* when its variable reaches exactly one op call
   as ``w`` or ``b``, directly or through casts and reshapes (Flax's ``promote_dtype``,
   a ``(1, d)`` row bias), and is used nowhere else; or when it is added to an op's
   output right after the op as a bias broadcast over the output's trailing axes (Flax's
   ``Linear``, ``Conv``, ``Einsum`` add their bias outside the op). The op's input must
   have the ``n`` examples on axis 0 (checked by tracing ``loss_fn`` once more, abstractly,
   on ``n + 1`` examples: a time-major ``(T, n, d)`` with ``T = n`` is not read as
   examples) and the op must keep that axis (``example_axis``).
2. *Computation*: ``loss_fn`` runs again under ``jax.vjp``; each op call that holds a
   structural leaf returns ``y + Z_k`` with an input ``Z_k = 0`` of ``y``'s shape and keeps
   its input ``x_k``. The cotangent of ``Z_k`` is ``g_k``.
3. *Fallback*: every other params leaf (used outside the ops, shared by two op calls,
   reached through an op inside ``jax.jit``, ``lax.scan``, ``jax.vmap``, ... within
   ``loss_fn``, an op whose input is not ``(n, ...)``) gets its per-example gradients
   from ``jax.vmap`` of ``jax.grad`` of the single-example loss with respect to just those
   leaves (``fallback="vmap"``: memory ``n`` times those leaves), or raises a
   ``ValueError`` naming the leaf and the reason (``fallback="raise"``).
   ``per_example_routes`` reports the route of every leaf and why.

Assumptions: the examples do not interact (loss ``i`` depends only on row ``i`` of every
array in ``args``: no batch norm or other statistics across the batch), and ``loss_fn`` is
deterministic in its Python control flow (it is traced twice; a different sequence of
op calls on the second trace raises). A ``jax.jit``-wrapped ``loss_fn`` hides its ops
(its leaves go to the fallback): pass the plain function and jit the whole step instead.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlinear._src import taps, vma

_FALLBACKS = ("vmap", "raise")
# Unary primitives that hand a value on unchanged up to its dtype or its shape: a leaf may
# reach an op's `w` or `b` through them (a cast by Flax's promote_dtype, a row bias made
# (d,)). Its gradient is then the op's, reshaped and cast back.
_PASS = frozenset({"convert_element_type", "copy", "copy_p", "reshape"})
# A bias added after the op may also be broadcast on its way.
_BIAS_PASS = _PASS | {"broadcast_in_dim", "squeeze"}


class Route(NamedTuple):
    """How one params leaf gets its per-example gradient norm (``per_example_routes``)."""

    leaf: str  # e.g. "params['conv1'].W"
    route: str  # "rank_one" | "gram" | "per_example" | "bias" | "fallback" | "unused"
    op: str | None  # the op that holds it ("affine", "conv", "embed", ...), or None
    detail: str  # shapes, or why the fallback


class RouteReport(tuple):
    """``Route`` rows, one per params leaf; ``str()`` prints them as a table."""

    def __str__(self):
        rows = [("leaf", "route", "op", "detail"), *((r.leaf, r.route, r.op or "-", r.detail)
                                                      for r in self)]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3]
            for row in rows
        )

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
        self.calls.append(_Call(rule, variables, shape, w_aval, y_aval, y_axis, reason))
        return y


class _Shapes:
    """A recorder that notes each op call's input shape (``_check_example_axes``)."""

    def __init__(self):
        self.x_shapes: list[tuple[int, ...]] = []

    def layer(self, rule, apply, x, w, b):
        self.x_shapes.append(tuple(np.shape(x)))
        return apply(x, w, b)


def _check_example_axes(calls, loss_fn, params, args, n):
    """Axis 0 of each op's input must *be* the examples, not merely have ``n`` entries (a
    time-major ``(T, n, d)`` input with ``T = n``): ``loss_fn`` is traced again, abstractly,
    on ``n + 1`` examples, and a call whose input does not become ``(n + 1, *rest)`` is not
    tapped (its leaves take the fallback). Skipped where ``loss_fn`` cannot be traced at
    another batch size (sizes written into it) or makes other op calls there: then axis 0
    is trusted, as before."""
    shapes = _Shapes()
    bigger = jax.tree.map(lambda a: jax.ShapeDtypeStruct((n + 1, *a.shape[1:]), a.dtype), args)
    try:
        jax.eval_shape(lambda args: taps.recording(shapes, loss_fn, params, *args), bigger)
    except Exception:  # any failure at another batch size: nothing to check
        return
    if len(shapes.x_shapes) != len(calls):
        return
    for call, shape in zip(calls, shapes.x_shapes, strict=True):
        if call.reason is None and shape != (n + 1, *call.x_shape[1:]):
            call.y_axis = None
            call.reason = (
                f"used by a jaxlinear {call.rule.name} call whose input `x` (shape"
                f" {call.x_shape}) has {n} entries on axis 0 that are not the examples (with"
                f" {n + 1} examples its shape is {shape}; a batch size written into loss_fn"
                " does this too)"
            )


@dataclasses.dataclass
class _Entry:
    """A structural leaf: the ``w`` or a bias of one op call."""

    leaf: int
    call: int
    role: str  # "w" | "b"
    axes: tuple[int, ...] = ()  # for "b": the axes of y the bias spans, in order


def _bias_axes(leaf_shape, chain, y_shape):
    """The axes of ``y`` that each axis of a bias broadcast by ``chain`` spans, in order.

    ``chain``: the equations from the leaf to the array added to ``y`` (reshapes that only
    add or drop size-1 axes, broadcasts, squeezes, casts). ``None`` when the leaf's axes do
    not land, in order, on axes of ``y`` (then the bias is not one this module can read).
    """
    shape = tuple(leaf_shape)
    labels = [i if s != 1 else None for i, s in enumerate(shape)]
    for eqn in chain:
        name, out = eqn.primitive.name, tuple(eqn.outvars[0].aval.shape)
        if name == "reshape":
            if [s for s in shape if s != 1] != [s for s in out if s != 1]:
                return None
            it = iter(lab for lab, s in zip(labels, shape, strict=True) if s != 1)
            labels = [next(it) if s != 1 else None for s in out]
        elif name == "broadcast_in_dim":
            new = [None] * len(out)
            for i, d in enumerate(eqn.params["broadcast_dimensions"]):
                new[d] = labels[i] if shape[i] == out[d] else None
            labels = new
        elif name == "squeeze":
            gone = {d % len(shape) for d in eqn.params["dimensions"]}
            labels = [lab for i, lab in enumerate(labels) if i not in gone]
        shape = out
    if len(shape) != len(y_shape):
        return None
    if any(s not in (1, t) for s, t in zip(shape, y_shape, strict=True)):
        return None  # (lax's add broadcasts size-1 axes itself)
    axes = tuple(i for i, lab in enumerate(labels) if lab is not None)
    if [labels[i] for i in axes] != sorted(labels[i] for i in axes):
        return None
    return axes


def _subjaxprs(eqn) -> bool:
    """Whether ``eqn`` is a higher-order primitive (holds a jaxpr: jit, scan, cond, remat...)."""
    for p in eqn.params.values():
        for q in p if isinstance(p, (tuple, list)) else (p,):
            if hasattr(q, "eqns") or hasattr(q, "jaxpr"):
                return True
    return False


def _analyse(jaxpr, calls, num_leaves):
    """``(entries, reasons)``: the structural leaves and why each other used leaf is not.

    ``jaxpr.invars`` are the params leaves, then the args.
    """
    producers, uses = {}, collections.defaultdict(list)
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            producers[id(v)] = eqn
        for v in eqn.invars:
            uses[id(v)].append(eqn)
    outs = collections.Counter(id(v) for v in jaxpr.outvars)
    leaf_of = {id(v): j for j, v in enumerate(jaxpr.invars[:num_leaves])}

    def n_uses(v):
        return len(uses[id(v)]) + outs[id(v)]

    def chase(v, passing):
        """Back from ``v`` to a leaf through single-use pass-through equations:
        ``(leaf or None, chain from the leaf on, whether the leaf itself is used once)``."""
        chain = []
        while id(v) not in leaf_of:
            eqn = producers.get(id(v))
            if eqn is None or eqn.primitive.name not in passing or n_uses(v) != 1:
                return None, chain, False
            chain.append(eqn)
            v = eqn.invars[0]
        return leaf_of[id(v)], chain[::-1], n_uses(v) == 1

    def bias_after(k, call):
        """A leaf added to the op's output right after it, as a trailing-axes bias."""
        v = call.vars[3]
        while n_uses(v) == 1 and uses[id(v)][0].primitive.name in ("convert_element_type", "copy"):
            v = uses[id(v)][0].outvars[0]
        if n_uses(v) != 1 or uses[id(v)][0].primitive.name != "add":
            return None
        add = uses[id(v)][0]
        other = add.invars[1] if add.invars[0] is v else add.invars[0]
        if other is v or not hasattr(other, "aval"):
            return None
        j, chain, once = chase(other, _BIAS_PASS)
        if j is None or not once:
            return None
        axes = _bias_axes(jaxpr.invars[j].aval.shape, chain, call.y.shape)
        if axes is None or call.y_axis in axes:
            return None
        return _Entry(j, k, "b", axes)

    entries, reasons, reach = [], {}, collections.Counter()
    for k, call in enumerate(calls):
        _, w_var, b_var, _ = call.vars
        for role, v in (("w", w_var), ("b", b_var)):
            if v is None:
                continue
            j, _, once = chase(v, _PASS)
            if j is None:
                continue
            reach[j] += 1
            if call.reason is not None:
                reasons.setdefault(j, call.reason)
            elif role == "b" and call.y_axis == len(call.y.shape) - 1:
                reasons.setdefault(j, f"the bias of a {call.rule.name} call on its examples' axis")
            elif once:
                entries.append(_Entry(j, k, role, (len(call.y.shape) - 1,) if role == "b" else ()))
        if b_var is None and call.reason is None:
            entry = bias_after(k, call)
            if entry is not None:
                entries.append(entry)
    structural = {e.leaf for e in entries}
    op_eqns = {id(producers.get(id(c.vars[3]))) for c in calls if c.vars[3] is not None}
    for j in range(num_leaves):
        v = jaxpr.invars[j]
        if j in structural or j in reasons or n_uses(v) == 0:
            continue
        others = [e for e in uses[id(v)] if id(e) not in op_eqns]
        names = sorted({e.primitive.name for e in others})
        if reach[j] > 1:
            reasons[j] = f"used by {reach[j]} jaxlinear op calls (shared weights)"
        elif outs[id(v)]:
            reasons[j] = "returned by loss_fn"
        elif any(_subjaxprs(e) for e in others):
            reasons[j] = (
                f"passed into `{names[0]}` within loss_fn (jax.jit, lax.scan, lax.cond,"
                " jax.checkpoint or a custom rule), where its op calls are not seen one by one"
            )
        else:
            reasons[j] = "used outside jaxlinear's ops (by " + ", ".join(f"`{n}`" for n in names)
            reasons[j] += ", and by a jaxlinear op)" if reach[j] else ")"
    return entries, reasons


# --------------------------------------------------------------------------------------
# Pass 2: computation.


class _Compute:
    """Pass 2: the op calls holding structural leaves add ``Z_k`` and keep ``x_k``."""

    def __init__(self, fn, calls, slots, zs):
        self.fn, self.calls, self.slots, self.zs = fn, calls, slots, zs
        self.k = 0
        self.xs: list = [None] * len(zs)

    def layer(self, rule, apply, x, w, b):
        k, self.k = self.k, self.k + 1
        y = apply(x, w, b)
        slot = self.slots.get(k)
        if slot is None:
            return y
        call = self.calls[k]
        if np.shape(x) != call.x_shape or np.shape(y) != call.y.shape:
            raise RuntimeError(
                f"{self.fn}: `loss_fn` made different jaxlinear op calls when traced again"
                f" (call {k}: x of shape {np.shape(x)}, expected {call.x_shape});"
                " its Python control flow must not change between traces"
            )
        self.xs[slot] = x
        return y + self.zs[slot]


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
    return jnp.zeros(aval.shape, aval.dtype, out_sharding=sharding)


def _bias_rows(g, y_axis, axes):
    """``(n, *[g.shape[a] for a in axes])``: ``g`` summed over every other axis, per example."""
    moved = [a + (a < y_axis) for a in axes]  # where the axes are once y_axis is first
    g = jnp.moveaxis(g, y_axis, 0)
    return jnp.sum(g, axis=tuple(i for i in range(1, g.ndim) if i not in moved))


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


def _per_example(fn, loss_fn, params, args, fallback, clip, clip_norm=None, report=None):
    """Norms ``(n,)``; with ``clip``, ``(clipped gradient, norms)``. Appends to ``report``."""
    if fallback not in _FALLBACKS:
        raise ValueError(f"{fn}: `fallback` must be one of {_FALLBACKS}, got {fallback!r}")
    if clip:
        _check_clip_norm(fn, clip_norm)
    n = _check_args(fn, args)
    leaves, names, treedef = _check_params(fn, params)
    L = len(leaves)
    dtype = jnp.result_type(*(a.dtype for a in leaves), jnp.float32)  # norms' dtype

    # Pass 1: discovery.
    recorders = []

    def discover(leaf_tracers, args):
        recorders.append(_Discover(n, leaf_tracers))
        return taps.recording(recorders[-1], loss_fn, treedef.unflatten(leaf_tracers), *args)

    closed, out = jax.make_jaxpr(discover, return_shape=True)(leaves, args)
    _check_losses(fn, out, n)
    calls = recorders[0].calls
    _check_example_axes(calls, loss_fn, treedef.unflatten(leaves), args, n)
    entries, reasons = _analyse(closed.jaxpr, calls, L)
    if not recorders[0].readable:  # matching reads each tracer's jaxpr variable (`.val`)
        why = "not matched to an op: this JAX version's tracers expose no jaxpr variables"
        reasons = {j: reasons.get(j, why) for j in range(L) if j in reasons or j in
                   {e.leaf for e in entries}}  # fmt: skip
        entries = []
    other = sorted(reasons)
    if other and fallback == "raise":
        j = other[0]
        raise ValueError(
            f"{fn}: `{names[j]}` is {reasons[j]}, so its per-example gradient norm has no"
            " structural formula here; pass fallback='vmap' to compute it from per-example"
            " gradients of that leaf (jax.vmap of jax.grad), or use the leaf directly as the"
            " weight or bias of one top-level jaxlinear op call"
        )

    # Pass 2: one forward and one backward pass that stops at the g's.
    tapped = sorted({e.call for e in entries})
    slots = {k: slot for slot, k in enumerate(tapped)}
    zs = [_zeros_like_type(calls[k].y) for k in tapped]

    def losses_of(zs, other_values):
        values = list(leaves)
        for j, v in zip(other, other_values, strict=True):
            values[j] = v
        computing = _Compute(fn, calls, slots, zs)
        losses = taps.recording(computing, loss_fn, treedef.unflatten(values), *args)
        if computing.k != len(calls):
            raise RuntimeError(
                f"{fn}: `loss_fn` made {computing.k} jaxlinear op calls when traced again,"
                f" {len(calls)} the first time; its Python control flow must not change"
                " between traces"
            )
        return losses, computing.xs

    losses, pullback, xs = jax.vjp(losses_of, zs, [leaves[j] for j in other], has_aux=True)
    gs, _ = pullback(jnp.ones_like(losses))

    sq = 0  # then (n,), laid out like the examples
    routes: dict[int, Route] = {}
    w_bars = {}  # call -> per-example w̄_i, where the route formed them
    for e in entries:
        call, x, g = calls[e.call], xs[slots[e.call]], gs[slots[e.call]]
        if e.role == "w":
            route, sq_w, w_bars[e.call] = _sq_norms(call, x, g, dtype)
            sq = sq + sq_w
        else:
            route, rows = "bias", _bias_rows(g.astype(dtype), call.y_axis, e.axes)
            sq = sq + jnp.sum(rows**2, axis=tuple(range(1, rows.ndim)))
        detail = f"x {call.x_shape} -> y {call.y.shape}"
        routes[e.leaf] = Route(names[e.leaf], route, call.rule.name, detail)
    if other:
        sq = sq + _fallback_sq(loss_fn, leaves, treedef, args, other, dtype)
    if report is not None:
        for j in range(L):
            if j in routes:
                report.append(routes[j])
            elif j in reasons:
                report.append(Route(names[j], "fallback", None, reasons[j]))
            else:
                report.append(Route(names[j], "unused", None, "not used by loss_fn"))
    norms = jnp.sqrt(sq) if entries or other else jnp.zeros((n,), dtype)  # all unused: 0
    if not clip:
        return norms

    C = jnp.asarray(clip_norm, dtype)
    factors = C / jnp.maximum(norms, C)  # min(1, C/‖∇ℓ_i‖), 1 at a zero norm
    grads: list = [None] * L
    for e in entries:
        call, x, g = calls[e.call], xs[slots[e.call]], gs[slots[e.call]]
        # (Sums over the examples are reductions, not contractions: on a mesh with Explicit
        # axes a contraction over the sharded examples' axis would need an out_sharding.)
        if e.role == "w" and w_bars.get(e.call) is not None:  # Σ_i c_i w̄_i
            d = jnp.sum(_example_scaled(w_bars[e.call], factors, 0), axis=0)
        elif e.role == "w":  # B_wᵀ(c ⊙ g; x): the op's own transpose, g's rows scaled
            scaled = _example_scaled(g, factors, call.y_axis)
            d = _weight_grad(call, x, scaled)
        else:  # Σ_i c_i b̄_i
            scaled = _example_scaled(g.astype(dtype), factors, call.y_axis)
            d = jnp.sum(_bias_rows(scaled, call.y_axis, e.axes), axis=0)
        grads[e.leaf] = d.reshape(leaves[e.leaf].shape).astype(leaves[e.leaf].dtype)
    if other:  # one more backward pass, for these leaves only
        _, other_grads = pullback(factors.astype(losses.dtype))
        for j, d in zip(other, other_grads, strict=True):
            grads[j] = d
    grads = [jnp.zeros_like(a) if d is None else d for a, d in zip(leaves, grads, strict=True)]
    return treedef.unflatten(grads), norms


def _fallback_sq(loss_fn, leaves, treedef, args, other, dtype):
    """``(n,)`` squared norms of the per-example gradients w.r.t. the leaves ``other``."""

    def one(*example):  # every array of args without its leading axis
        def loss(values):
            full = list(leaves)
            for j, v in zip(other, values, strict=True):
                full[j] = v
            batch_of_one = jax.tree.map(lambda a: a[None], example)
            return loss_fn(treedef.unflatten(full), *batch_of_one)[0]

        grads = jax.grad(loss)([leaves[j] for j in other])
        return sum(jnp.sum(jnp.square(d.astype(dtype))) for d in grads)

    return jax.vmap(one)(*args)


# --------------------------------------------------------------------------------------
# Public functions.


def per_example_grad_norms(loss_fn: Callable, params, *args, fallback: str = "vmap"):
    r"""``‖∇_params ℓ_i‖₂`` for every example ``i``, from the layers' structure.

    .. math:: \|\nabla \ell_i\|^2 = \sum_{\text{layers}} \|X_i^\top G_i\|_F^2
              + \|\textstyle\sum_t G_i[t]\|^2 \;(+\text{fallback leaves})

    One forward and one backward pass (the backward pass stops at each layer's output
    cotangent ``G``; no weight gradient is formed), plus ``O(n (d_in + d_out))`` work per
    2-D layer; see the module docstring for inputs with a sequence axis.

    Args:
      loss_fn: ``loss_fn(params, *args) -> (n,)`` per-example losses. Example ``i`` is
        index ``i`` along axis 0 of every array in ``args``, and loss ``i`` depends on
        example ``i`` only (no statistics across the batch).
      params: a pytree of real floating arrays. Leaves used as the ``W`` or ``b`` of one
        ``jaxlinear.linear`` / ``dual_linear`` call (``mlp`` included) at the top level of
        ``loss_fn``, on an input ``(n, ..., d_in)``, get the structural formula; the
        others get ``fallback``.
      *args: pytrees of arrays, each with the ``n`` examples along axis 0.
      fallback: for the other leaves: ``"vmap"`` (per-example gradients of just those
        leaves, ``jax.vmap`` of ``jax.grad``) or ``"raise"`` (a ``ValueError`` naming the
        leaf and the reason).

    Returns:
      ``(n,)`` norms in the widest floating dtype of ``params`` (at least float32).

    Raises:
      TypeError: ``loss_fn`` returns something other than one real floating array;
        non-float params leaves; non-array ``args``.
      ValueError: losses not of shape ``(n,)``; ``args`` of different leading sizes;
        a leaf needing the fallback when ``fallback="raise"``.

    Examples:
      >>> import jax.numpy as jnp, jaxlinear
      >>> p = jaxlinear.Params(jnp.array([[1.0], [2.0]]), jnp.array([0.0]))
      >>> x = jnp.array([[2.0, 2.0], [0.0, 0.0]])
      >>> loss = lambda p, x: jaxlinear.linear(p, x)[:, 0]  # dW_i = x_i, db_i = 1
      >>> jaxlinear.per_example_grad_norms(loss, p, x).tolist()  # sqrt(‖x_i‖² + 1)
      [3.0, 1.0]
    """
    return _per_example("per_example_grad_norms", loss_fn, params, args, fallback, False)


def clipped_grad(loss_fn: Callable, params, *args, clip_norm, fallback: str = "vmap"):
    r"""``Σ_i min(1, C / ‖∇ℓ_i‖) ∇ℓ_i`` and the norms ``‖∇ℓ_i‖``: per-example clipping.

    .. math:: c_i = \min\!\left(1, \frac{C}{\|\nabla \ell_i\|}\right), \qquad
              \bar W = X^\top \operatorname{diag}(c)\, G, \quad
              \bar b = \textstyle\sum_i c_i \sum_t G_i[t]

    The norms come from ``per_example_grad_norms``' pass; the clipped gradient of each
    dense layer is its own pullback applied to ``G`` with row ``i`` scaled by ``c_i`` (one
    more set of ``Xᵀ G`` contractions, no second backward pass through the network; on the
    ``"per_example"`` sequence route, whose norms formed each ``dW_i``, ``Σ_i c_i dW_i``).
    Fallback leaves get theirs from one more backward pass with the loss cotangent ``c``.
    ``c_i = 1`` at a zero norm.

    Args:
      loss_fn, params, *args, fallback: as in ``per_example_grad_norms``.
      clip_norm: ``C > 0``, a scalar (checked at trace time when it is not traced).

    Returns:
      ``(grads, norms)``: ``grads`` in the structure and dtypes of ``params``; ``norms``
      ``(n,)`` the unclipped per-example norms.

    Raises:
      As ``per_example_grad_norms``, and ``ValueError`` for a ``clip_norm`` that is not a
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
    return _per_example("clipped_grad", loss_fn, params, args, fallback, True, clip_norm)


def per_example_routes(loss_fn: Callable, params, *args) -> RouteReport:
    r"""Which route gives each params leaf its per-example gradient norm, and why.

    Traces ``loss_fn`` as ``per_example_grad_norms`` does (abstractly: nothing is
    computed) and reports, per leaf: ``"rank_one"``, ``"gram"`` (ghost norms: no
    per-example gradient formed), ``"per_example"`` (the op's transpose in ``w`` under
    ``jax.vmap``: ``n`` copies of that leaf's gradient), ``"bias"``, ``"fallback"`` (with
    the reason: ``jax.vmap`` of ``jax.grad`` for that leaf) or ``"unused"``.

    Args:
      loss_fn, params, *args: as in ``per_example_grad_norms``.

    Returns:
      A ``RouteReport``: a tuple of ``Route(leaf, route, op, detail)`` in the order of
      ``jax.tree.leaves(params)``; ``print()`` it for a table, ``.counts()`` for a summary.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> layers = jaxlinear.init_mlp(jax.random.key(0), [3, 4, 2])
      >>> loss = lambda p, x: jnp.sum(jaxlinear.mlp(p, x), axis=-1)
      >>> report = jaxlinear.per_example_routes(loss, layers, jnp.ones((5, 3), jnp.float32))
      >>> [(r.leaf, r.route) for r in report][:2]
      [('params[0].W', 'rank_one'), ('params[0].b', 'bias')]
    """
    report: list[Route] = []
    jax.eval_shape(
        lambda params, args: _per_example(
            "per_example_routes", loss_fn, params, args, "vmap", False, report=report
        ),
        params,
        args,
    )
    return RouteReport(report)
