r"""The traced program of a loss, flattened, with the examples' axis of every value.

``per_example.py`` works on the jaxpr of ``loss_fn(params, *args)``, where ``jax.jit``,
``jax.checkpoint``, custom derivative rules and ``jax.vmap`` are explicit:

- ``Program`` inlines every equation that carries one sub-jaxpr called with its own
  operands (``jit``, ``remat``, ``closed_call``, ``custom_vmap_call`` and whatever
  call-like primitive a later JAX adds), except those named in ``keep`` (the family's own
  op calls, seen by their taps), those with control flow or collectives (``scan``,
  ``while``, ``cond``, ``shard_map``) and those with a derivative rule of their own
  (``custom_jvp_call``, ``custom_vjp_call``: ``jax.nn.relu``'s zero slope at 0, a
  straight-through estimator), which stay one equation so that the backward pass runs
  their rule (their callee is still read for the examples' axis). What is left is a flat
  list of ``Node``\ s over numbered value slots.
- ``example_axes`` runs a small dataflow analysis from the args (examples on axis 0):
  each slot's examples' axis is an ``int``; ``None`` for a value that depends on no
  example (params, constants, random masks drawn from a key); a ``Mixed`` (a ``str``
  saying why) where the examples share an axis with something else or the rule for a
  primitive is not known. ``vmap`` over the examples is nothing special here: after
  tracing, its equations carry the examples as an ordinary axis.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

# A scan of at most this many steps is written out step by step (its body inlined once per
# step: weights stacked on the scanned axis become one slice per step).
UNROLL = 128


def _index(a, t):
    return [lax.index_in_dim(a, t, keepdims=False)]


def _stack(*parts):
    return [jnp.stack(parts)]


# Equations that are not inlined even though they hold a jaxpr.
_OPAQUE = frozenset({"scan", "while", "cond", "shard_map", "xla_pmap", "pmap"})
# Equations kept whole for their own derivative rules (their callee is read for the axes).
_RULED = frozenset({"custom_jvp_call", "custom_vjp_call"})
_CALLEE_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")

# Primitives applied elementwise, whose operands have one rank (size-1 and rank-0 operands
# broadcast): the examples' axis passes through.
ELEMENTWISE = frozenset(
    """abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp complex conj
    convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1
    floor ge gt igamma igammac imag integer_pow is_finite le lgamma log log1p logistic lt max
    min mul ne neg nextafter not or population_count pow real reduce_precision rem round rsqrt
    select_n shift_left shift_right_arithmetic shift_right_logical sign sin sinh sqrt square
    stop_gradient sub tan tanh xor random_bits random_wrap random_unwrap threefry2x32
    random_fold_in random_seed random_split random_clone optimization_barrier
    bitcast_convert_type""".split()
)
_REDUCE = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax argmin"
    .split()
)
_CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())


class Mixed(str):
    """Why a value has no single examples' axis (a ``str``)."""


@dataclasses.dataclass(frozen=True)
class Lit:
    """A literal operand."""

    val: object


@dataclasses.dataclass
class Node:
    """One equation of the flattened program: ``outs = eqn(*ins)`` over slots."""

    eqn: object
    ins: list  # slot numbers, or Lit
    outs: list  # slot numbers
    apply: object = None  # a kept op call: the op itself, apply(x, w, b) (set by the driver)
    fn: object = None  # a step made here (unrolling a scan): fn(*ins) -> [outs]
    label: str = ""  # its name: "scan_index" (params["t"]) or "scan_stack"
    params: dict = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.label if self.fn is not None else self.eqn.primitive.name


def callee(eqn):
    """``(jaxpr, consts)`` that ``eqn`` calls with its own operands, or ``None``."""
    if eqn.primitive.name in _OPAQUE:
        return None
    for key in _CALLEE_PARAMS:
        sub = eqn.params.get(key)
        if sub is None:
            continue
        jaxpr, consts = (sub.jaxpr, list(sub.consts)) if hasattr(sub, "consts") else (sub, [])
        if not hasattr(jaxpr, "eqns"):
            return None
        if len(jaxpr.constvars) == len(consts) and len(jaxpr.invars) == len(eqn.invars) and len(
            jaxpr.outvars
        ) == len(eqn.outvars):
            return jaxpr, consts
    return None


class Program:
    """A closed jaxpr flattened into ``nodes`` over slots (see the module docstring).

    Attributes:
      avals: each slot's abstract value.
      consts: ``{slot: value}`` for the constants.
      invars: the slots of the jaxpr's inputs; ``outvars`` those of its outputs (or Lit).
      slot_of: ``{id(var): slot}`` for the variables of the top-level jaxpr.
      producer: ``{slot: node index}``; ``users``: ``{slot: [node index, ...]}``.
    """

    def __init__(self, closed, keep=frozenset(), keep_eqn=None):
        self.avals, self.consts, self.nodes, self.slot_of = [], {}, [], {}
        self.keep, self.keep_eqn = keep, keep_eqn
        const_slots = [self._const(c, v.aval) for c, v in zip(closed.consts, closed.jaxpr.constvars,
                                                               strict=True)]  # fmt: skip
        self.invars = [self._new(v.aval) for v in closed.jaxpr.invars]
        top = closed.jaxpr
        for v, s in zip(top.constvars + top.invars, const_slots + self.invars, strict=True):
            self.slot_of[id(v)] = s
        self.outvars = self._inline(top, const_slots + self.invars, top_level=True)
        live = {s for s in self.outvars if not isinstance(s, Lit)}
        kept = []
        for node in reversed(self.nodes):  # drop what the losses do not use
            if any(s in live for s in node.outs) or (node.eqn is not None and node.eqn.effects):
                kept.append(node)
                live.update(s for s in node.ins if not isinstance(s, Lit))
        self.nodes = kept[::-1]
        self.producer, self.users = {}, {}
        for k, node in enumerate(self.nodes):
            for s in node.outs:
                self.producer[s] = k
            for s in node.ins:
                if not isinstance(s, Lit):
                    self.users.setdefault(s, []).append(k)

    def _new(self, aval):
        self.avals.append(aval)
        return len(self.avals) - 1

    def _const(self, value, aval):
        s = self._new(aval)
        self.consts[s] = value
        return s

    def _inline(self, jaxpr, ins, top_level=False):
        env = {id(v): s for v, s in zip(jaxpr.constvars + jaxpr.invars, ins, strict=True)}

        def read(v):
            return Lit(v.val) if isinstance(v, jex_core.Literal) else env[id(v)]

        for eqn in jaxpr.eqns:
            refs = [read(v) for v in eqn.invars]
            kept = top_level and any(id(v) in self.keep for v in eqn.outvars)
            kept = kept or (self.keep_eqn is not None and self.keep_eqn(eqn))
            sub = None if kept or eqn.primitive.name in _RULED else callee(eqn)
            if not kept and eqn.primitive.name == "scan" and eqn.params["length"] <= UNROLL:
                outs = self._unroll(eqn, refs)
            elif sub is not None:
                inner, consts = sub
                const_slots = [self._const(c, v.aval) for c, v in zip(consts, inner.constvars,
                                                                      strict=True)]  # fmt: skip
                outs = self._inline(inner, const_slots + refs)
            else:
                outs = [self._new(v.aval) for v in eqn.outvars]
                self.nodes.append(Node(eqn, refs, outs))
            for v, s in zip(eqn.outvars, outs, strict=True):
                env[id(v)] = s
                if top_level:
                    self.slot_of[id(v)] = s
        return [read(v) for v in jaxpr.outvars]

    def _unroll(self, eqn, refs):
        """A ``scan`` written out step by step: its body inlined ``length`` times."""
        p = eqn.params
        body, length = p["jaxpr"], p["length"]
        n_c, n_k = p["num_consts"], p["num_carry"]
        consts, carry, xs = refs[:n_c], refs[n_c:n_c + n_k], refs[n_c + n_k:]
        body_consts = [self._const(c, v.aval) for c, v in zip(body.consts, body.jaxpr.constvars,
                                                              strict=True)]  # fmt: skip
        ys = []
        for t in (reversed(range(length)) if p["reverse"] else range(length)):
            x_t = [self._index(x, t) for x in xs]
            outs = self._inline(body.jaxpr, body_consts + consts + carry + x_t)
            carry, y = outs[:n_k], outs[n_k:]
            ys.append((t, y))
        ys.sort(key=lambda ty: ty[0])
        stacked = []
        for i, v in enumerate(eqn.outvars[n_k:]):
            parts = [y[i] for _, y in ys]
            out = self._new(v.aval)
            self.nodes.append(Node(None, parts, [out], fn=_stack, label="scan_stack"))
            stacked.append(out)
        return carry + stacked

    def _index(self, ref, t):
        aval = self.avals[ref]
        out = self._new(aval.update(shape=aval.shape[1:]))
        fn = functools.partial(_index, t=t)
        self.nodes.append(Node(None, [ref], [out], fn=fn, label="scan_index", params={"t": t}))
        return out

    def shape(self, ref):
        return tuple(np.shape(ref.val)) if isinstance(ref, Lit) else tuple(self.avals[ref].shape)


# --------------------------------------------------------------------------------------
# The examples' axis of every slot.


def example_axes(prog: Program, in_axes: dict, rule=None) -> dict:
    """``{slot: axis | None | Mixed}``, from ``in_axes`` (``{slot: axis}`` of the inputs).

    ``rule(node, ins)``: the outputs' axis for primitives this module does not know (the
    family's), or ``None`` to leave them to it. A node that calls a jaxpr (an op call kept
    whole) gets its callee's analysis.
    """
    axes = dict.fromkeys(range(len(prog.avals)))
    axes.update(in_axes)
    for node in prog.nodes:
        ins = [None if isinstance(s, Lit) else axes[s] for s in node.ins]
        if all(a is None for a in ins):
            continue  # no example reaches it
        mixed = next((a for a in ins if isinstance(a, Mixed)), None)
        if mixed is not None:
            out = [mixed] * len(node.outs)
        else:
            out = None if rule is None else rule(node, ins)
            sub = callee(node.eqn) if out is None and node.fn is None else None
            if sub is not None:
                inner = Program(jex_core.ClosedJaxpr(sub[0], sub[1]))
                inner_axes = example_axes(inner, dict(zip(inner.invars, ins, strict=True)), rule)
                out = [None if isinstance(s, Lit) else inner_axes[s] for s in inner.outvars]
            elif out is None:
                out = _rule(prog, node, ins)
            if not isinstance(out, list):
                out = [out] * len(node.outs)
        for s, a in zip(node.outs, out, strict=True):
            axes[s] = a
    return axes


def _rule(prog, node, ins):
    """The examples' axis of ``node``'s outputs from its operands' (some not ``None``)."""
    name, p = node.name, (node.params if node.fn is not None else node.eqn.params)
    shapes = [prog.shape(s) for s in node.ins]
    out_shape = prog.shape(node.outs[0])
    carried = [(a, sh) for a, sh in zip(ins, shapes, strict=True) if a is not None]
    if name in ELEMENTWISE or name == "concatenate":
        axs = {a for a, _ in carried}
        if len(axs) != 1:
            return Mixed(f"`{name}` meets the examples on different axes {sorted(axs)}")
        (ax,) = axs
        if name == "concatenate" and p["dimension"] == ax:
            return Mixed("`concatenate` along the examples' axis")
        return ax
    if len(carried) == 1 and len(node.ins) >= 1 and ins[0] is not None:
        ax = ins[0]
        if name == "broadcast_in_dim":
            return int(p["broadcast_dimensions"][ax])
        if name == "transpose":
            return list(p["permutation"]).index(ax)
        if name == "squeeze":
            dims = {d % len(shapes[0]) for d in p["dimensions"]}
            return Mixed("`squeeze` of the examples' axis") if ax in dims else ax - sum(
                d < ax for d in dims)  # fmt: skip
        if name == "expand_dims":
            return ax + sum(d <= ax for d in p["dimensions"])
        if name == "reshape":
            return _reshape_axis(shapes[0], out_shape, ax)
        if name in _REDUCE:
            dims = set(p["axes"])
            if ax in dims:  # loss i then reads other examples: batch statistics, usually
                return Mixed(
                    f"`{name}` over the examples' axis (statistics of the batch, as"
                    " BatchNorm computes in training mode, mix the examples: evaluate such"
                    " layers with their running statistics, e.g. `model.eval()` or"
                    " `use_running_average=True`)"
                )
            return ax - sum(d < ax for d in dims)
        if name in _CUMULATIVE or name in ("sort", "argsort"):
            key = "axis" if name in _CUMULATIVE else "dimension"
            return Mixed(f"`{name}` along the examples' axis") if p[key] == ax else ax
        if name in ("slice", "dynamic_slice", "pad", "rev", "reduce_window_sum", "top_k",
                    "split", "dynamic_update_slice", "reduce_window_max"):  # fmt: skip
            if out_shape[ax] != shapes[0][ax] or (name == "rev" and ax in p["dimensions"]):
                return Mixed(f"`{name}` slices or reorders the examples' axis")
            if name == "split" and p["axis"] == ax:
                return Mixed("`split` along the examples' axis")
            if name == "pad" and tuple(p["padding_config"][ax]) != (0, 0, 0):
                return Mixed("`pad` of the examples' axis")
            return ax
    if name == "dot_general":
        return _dot_axis(p["dimension_numbers"], shapes, ins)
    if name == "conv_general_dilated":
        dn = p["dimension_numbers"]
        if ins[1] is None and ins[0] == dn.lhs_spec[0] and p["batch_group_count"] == 1:
            return int(dn.out_spec[0])
        return Mixed("`conv_general_dilated` uses the examples' axis other than as its batch")
    if name == "gather":
        return _gather_axis(p["dimension_numbers"], shapes, ins, out_shape)
    if name == "scan_index":
        return Mixed("a `scan` over the examples' axis") if ins[0] == 0 else ins[0] - 1
    if name == "scan_stack":
        axs = set(ins)
        if len(axs) != 1 or not isinstance(ins[0], int):
            return Mixed("`scan` outputs with the examples on different axes")
        return ins[0] + 1
    if name in ("scan", "while", "cond"):
        return Mixed(f"computed inside `{name}`, whose body this analysis does not enter")
    return Mixed(f"`{name}` has no examples' axis rule here")


def _reshape_axis(shape, out_shape, ax):
    before, n = math.prod(shape[:ax]), shape[ax]
    for j in range(len(out_shape)):
        if math.prod(out_shape[:j]) == before and out_shape[j] == n:
            return j
    return Mixed(f"`reshape` {shape} -> {out_shape} merges or splits the examples' axis")


def _dot_axis(dims, shapes, ins):
    (lc, rc), (lb, rb) = dims
    out = None
    for side, (contract, batch, shape, ax) in enumerate(
        ((lc, lb, shapes[0], ins[0]), (rc, rb, shapes[1], ins[1]))
    ):
        if ax is None:
            continue
        if ax in contract:
            return Mixed("`dot_general` contracts the examples' axis")
        if ax in batch:
            here = list(batch).index(ax)
            other = (rb if side == 0 else lb)[here]
            if ins[1 - side] not in (None, other):
                return Mixed("`dot_general` pairs the examples with another axis")
        else:
            kept = [d for d in range(len(shape)) if d not in contract and d not in batch]
            offset = len(lb) + (0 if side == 0 else len(shapes[0]) - len(lc) - len(lb))
            if ins[1 - side] is not None:
                return Mixed("`dot_general` makes pairs of examples")
            here = offset + kept.index(ax)
        if out is not None and out != here:
            return Mixed("`dot_general` makes pairs of examples")
        out = here
    return out


def _gather_axis(dn, shapes, ins, out_shape):
    operand_ax, idx_ax = ins[0], ins[1]
    offset = list(dn.offset_dims)
    batch_pos = [d for d in range(len(out_shape)) if d not in offset]
    idx_rank = len(shapes[1])
    ivd = idx_rank - 1  # jax's gather: the index vector is the last axis of the indices
    out = None
    if idx_ax is not None:
        if idx_ax == ivd:
            return Mixed("`gather` indices carry the examples in their index vector")
        out = batch_pos[idx_ax]
    if operand_ax is not None:
        obd = tuple(getattr(dn, "operand_batching_dims", ()))
        if operand_ax in obd:
            sibd = dn.start_indices_batching_dims[obd.index(operand_ax)]
            if idx_ax != sibd:
                return Mixed("`gather` pairs the examples with another axis")
            return out
        if operand_ax in dn.collapsed_slice_dims or operand_ax in dn.start_index_map:
            return Mixed("`gather` indexes into the examples' axis")
        rest = [d for d in range(len(shapes[0])) if d not in dn.collapsed_slice_dims
                and d not in obd]  # fmt: skip
        here = offset[rest.index(operand_ax)]
        if out is not None and out != here:
            return Mixed("`gather` makes pairs of examples")
        out = here
    return out
