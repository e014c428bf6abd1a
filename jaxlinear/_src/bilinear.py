r"""The rule builder: both bindings of a bilinear map ``y = B(x, w) (+ b)`` from three functions.

Every layer that is bilinear in its input and its weights (dense, ``dot_general``,
``einsum``, convolutions, embeddings) has the same derivative story:

    ẏ = B(ẋ, w) + B(x, ẇ) + ḃ,   x̄ = B_xᵀ(g; w),   w̄ = B_wᵀ(g; x),
    b̄ = Σ g over all but the last axis.

So an op author writes three plain ``jnp``/``lax`` functions, once:

``forward(x, w, *, preferred_element_type, **params) -> y``
``transpose_x(g, w, x_aval, *, preferred_element_type, **params) -> x̄``
``transpose_w(g, x, w_aval, *, preferred_element_type, **params) -> w̄``

and ``bilinear_op`` turns them into a ``BilinearOp`` with two bindings:

``op.custom_vjp(x, w, b=None, **kw)``
    a ``jax.custom_vjp`` whose forward pass saves exactly ``(x, w)`` and whose backward
    pass calls the two transposes (and sums ``g`` for the bias). Reverse mode only. It
    is bound through a primitive (``jaxlinear_<name>_custom_vjp``) whose JVP is the
    ``custom_vjp`` call, so that ``vmap`` batches the op whole, as ``dual``'s rules do.
``op.dual(x, w, b=None, **kw)``
    a primitive (``jaxlinear_<name>``) whose JVP binds a second primitive, the
    pushforward ``B(dx, w) + B(x, dw) + db`` (``jaxlinear_<name>_pushforward``); both
    are transposed by the same two transposes. Every transform composes: ``jvp``,
    ``jacfwd``, ``hessian``, ``linear_transpose`` in either operand, ``grad``, ``vmap``,
    ``jit``, ``shard_map``.

The builder owns the mixed-precision policy, so every op gets it: operands cast to
``compute_dtype`` (default: the promoted dtype of ``x`` and ``w``), products accumulated
in ``accumulation_dtype`` (float32 for 16-bit floats; passed to the author's functions
as ``preferred_element_type``), the bias added in that dtype, one final rounding to the
output dtype (``out_dtype``, default the compute dtype); cotangents come back in each
primal's dtype. Inside ``shard_map`` each cotangent is summed over the manual axes along
which it varies but its primal does not (``vma.psum_to``): the adjoint of replication.
With ``quant=`` (a ``Recipe``, ``quant.py``) each of the three products runs in fp8 or
int8 with dynamic scales; the op's optional ``scale_axes`` rule says which axes may carry
a per-row or per-channel scale.

Both bindings take ``gather=fsdp.Gather(axis, dim)`` (or a weight marked by
``fsdp_gather``): ``w`` is then an FSDP shard, gathered in the forward pass, saved as the
shard and gathered again in the backward pass, ``w̄`` reduce-scattered (``fsdp.py``).

The builder validates nothing: a layer function checks shapes and dtypes first and
passes hashable static parameters (tuples, not lists).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxlinear._src import fsdp, ghost, taps, vma
from jaxlinear._src import quant as _quant

_NAMES = ("x", "w", "b")  # the operands, in order; also the names used in `wrt`
_RESERVED = (
    "compute_dtype", "out_dtype", "quant", "preferred_element_type", "mask", "gather", "residuals"
)
_BUILDER_ONLY = ("preferred_element_type", "mask", "gather", "residuals")  # never op parameters


def accumulation_dtype(dtype) -> np.dtype:
    """float32 for 16-bit floats (bfloat16, float16); the dtype itself otherwise."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        return jnp.dtype(jnp.float32)
    return dtype


def policy(x_dtype, w_dtype, compute_dtype=None, out_dtype=None):
    """``(compute, accumulation, output)`` dtypes of ``B(x, w)`` under the precision policy."""
    cd = jnp.result_type(x_dtype, w_dtype) if compute_dtype is None else jnp.dtype(compute_dtype)
    acc = accumulation_dtype(cd)
    if out_dtype is None:
        return cd, acc, cd
    out = jnp.dtype(out_dtype)
    return cd, jnp.promote_types(acc, out), out


def contract(fn, a, b, cd, acc, *aval, **params):
    """``fn(a, b, *aval, preferred_element_type=acc, **params)`` with ``a``, ``b`` rounded to the
    compute dtype ``cd``: one of the op's three functions under the policy.

    On CPU, 16-bit operands accumulated in a wider dtype are widened to it after the
    rounding. That is exact (a product of two 16-bit floats is exact in float32), so the
    result is the same; XLA:CPU's own passes rewrite some 16-bit products with float32
    results (an operand or the result transposed) into forms it has no kernel for
    (``Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32``, issue #29).
    Other platforms keep the 16-bit operands (``lax.platform_dependent``, decided when
    lowering).
    """
    a, b = a.astype(cd), b.astype(cd)

    def call(a, b):
        return fn(a, b, *aval, preferred_element_type=acc, **params)

    if jnp.dtype(acc) == jnp.dtype(cd) or not jnp.issubdtype(cd, jnp.floating):
        return call(a, b)
    info = jnp.finfo(cd)

    def widen(a):  # reduce_precision: XLA may drop a float32 -> 16-bit -> float32 round trip
        return lax.reduce_precision(a.astype(acc), info.nexp, info.nmant)

    wide = lambda a, b: call(widen(a), widen(b))  # noqa: E731
    return lax.platform_dependent(a, b, cpu=wide, default=call)


def _add_bias(y, b):
    """``y + b`` with ``b: (d,)`` on ``y``'s last axis, in ``y``'s dtype."""
    return y + lax.expand_dims(b.astype(y.dtype), tuple(range(y.ndim - 1)))


def apply_forward(
    forward, x, w, b=None, *, compute_dtype=None, out_dtype=None, quant=None, scale_axes=None,
    **params,
):  # fmt: skip
    """``B(x, w) + b`` under the policy: cast, accumulate wide, add ``b``, round once.

    ``quant``: a ``Recipe`` (``quant.py``); the product is then its ``forward`` product
    (operands quantized with the op's ``scale_axes``), the rest of the policy unchanged.
    """
    cd, acc, out = policy(x.dtype, w.dtype, compute_dtype, out_dtype)
    if quant is not None:  # --- quantization hook (quant.py) ---
        y = _quant.apply(quant, "forward", forward, scale_axes, x, w, **params).astype(acc)
    else:
        y = contract(forward, x, w, cd, acc, **params).astype(acc)
    if b is not None:
        y = _add_bias(y, b)
    return y.astype(out)


@functools.lru_cache(maxsize=1024)
def _out_shape(forward, x_shape, w_shape, cd, acc, params):
    """The shape of ``forward``'s result (traced once per signature, on shapes only)."""
    fn = functools.partial(forward, preferred_element_type=acc, **dict(params))
    S = jax.ShapeDtypeStruct
    return tuple(jax.eval_shape(fn, S(x_shape, cd), S(w_shape, cd)).shape)


def out_shape(forward, x, w, *, compute_dtype=None, out_dtype=None, quant=None, **params):
    """The shape of ``B(x, w)``; ``x`` and ``w`` need only ``.shape`` and ``.dtype``."""
    del quant  # a recipe changes values, not shapes
    cd, acc, _ = policy(x.dtype, w.dtype, compute_dtype, out_dtype)
    items = tuple(sorted(params.items()))
    return _out_shape(forward, tuple(x.shape), tuple(w.shape), cd, acc, items)


@functools.lru_cache(maxsize=1024)
def _example_axis(forward, x_shape, w_shape, cd, acc, params):
    """Where axis 0 of ``x`` lands in ``y``, read off shapes: the one axis of ``y`` whose size
    follows ``x.shape[0]`` (tried at 2 and 3); ``None`` if the op contracts that axis, pairs
    it with an axis of ``w`` (the shapes then fail) or spreads it over several axes."""
    shapes = []
    for size in (2, 3):
        try:
            shapes.append(_out_shape(forward, (size, *x_shape[1:]), w_shape, cd, acc, params))
        except (TypeError, ValueError):
            return None
    a, b = shapes
    moved = [i for i, (p, q) in enumerate(zip(a, b, strict=False)) if p != q]
    if len(a) != len(b) or len(moved) != 1 or (a[moved[0]], b[moved[0]]) != (2, 3):
        return None
    return moved[0]


def apply_pushforward(
    forward, x, w, dx=None, dw=None, db=None, *, compute_dtype=None, out_dtype=None,
    quant=None, scale_axes=None, **params,
):  # fmt: skip
    """The JVP ``B(dx, w) + B(x, dw) + db``, summed wide, rounded once; ``None`` = zero tangent.

    ``quant``: each term is the recipe's ``forward`` product (``dx`` quantized as ``x``,
    ``dw`` as ``w``).
    """
    cd, acc, out = policy(x.dtype, w.dtype, compute_dtype, out_dtype)

    def product(a, b):
        if quant is not None:  # --- quantization hook (quant.py) ---
            return _quant.apply(quant, "forward", forward, scale_axes, a, b, **params)
        return contract(forward, a, b, cd, acc, **params)

    terms = []
    if dx is not None:
        terms.append(product(dx, w))
    if dw is not None:
        terms.append(product(x, dw))
    if terms:
        dy = functools.reduce(lambda a, t: a + t.astype(acc), terms[1:], terms[0].astype(acc))
    else:
        shape = out_shape(forward, x, w, compute_dtype=compute_dtype, out_dtype=out_dtype, **params)
        dy = jnp.zeros(shape, acc)
    if db is not None:
        dy = _add_bias(dy, db)
    return dy.astype(out)


def apply_pullback(
    transpose_x,
    transpose_w,
    x,
    w,
    g,
    *,
    wrt=_NAMES,
    compute_dtype=None,
    out_dtype=None,
    quant=None,
    scale_axes=None,
    **params,
):
    """The VJP ``(x̄, w̄, b̄)``; an entry not named in ``wrt`` is ``None`` and is not computed.

    ``x̄`` comes back in ``x``'s dtype, ``w̄`` and ``b̄`` in ``w``'s. The operand being
    solved for needs only ``.shape`` and ``.dtype`` (an aval will do). ``quant``: ``x̄``
    and ``w̄`` are the recipe's ``grad_x`` and ``grad_w`` products (``b̄`` stays exact).
    """
    cd, acc, _ = policy(x.dtype, w.dtype, compute_dtype, out_dtype)
    dx = dw = db = None
    if quant is not None:  # --- quantization hook (quant.py) ---
        if "x" in wrt:
            dx = _quant.apply(quant, "grad_x", transpose_x, scale_axes, g, w, x, **params)
            dx = dx.astype(x.dtype)
        if "w" in wrt:
            dw = _quant.apply(quant, "grad_w", transpose_w, scale_axes, g, x, w, **params)
            dw = dw.astype(w.dtype)
        wrt = tuple(n for n in wrt if n == "b")
    if "x" in wrt:
        dx = contract(transpose_x, g, w, cd, acc, x, **params).astype(x.dtype)
    if "w" in wrt:
        dw = contract(transpose_w, g, x, cd, acc, w, **params).astype(w.dtype)
    if "b" in wrt:
        db = bias_cotangent(g, w.dtype)
    return dx, dw, db


def bias_cotangent(g, dtype):
    """``b̄ = Σ g`` over every axis but the last (the adjoint of broadcasting ``b``), summed wide."""
    lead = tuple(range(g.ndim - 1))
    return jnp.sum(g.astype(accumulation_dtype(g.dtype)), axis=lead).astype(dtype)


def _exact_cast(a, dtype):
    """``a`` cast to ``dtype`` where ``a``'s own dtype holds every value of ``dtype`` (bfloat16
    in float32: the cast back is exact), else ``a`` unchanged (a "compute" residual)."""
    if dtype is None or jnp.promote_types(dtype, a.dtype) != a.dtype:
        return a
    return a.astype(dtype)


class _Static(NamedTuple):
    """The static (hashable) part of a ``custom_vjp`` call."""

    kw: tuple  # sorted (name, value) pairs: compute_dtype, out_dtype and the op's params
    b_dtype: np.dtype | None  # None: no bias
    residuals: str  # "exact" | "compute"
    x_dtype: np.dtype
    w_dtype: np.dtype


def _aval(a):
    """The abstract value of an operand (``UndefinedPrimal``, tracer or array)."""
    return a.aval if ad.is_undefined_primal(a) else vma._aval(a)


def _resolve(x, w, gather):
    """``(w, gather)``: a weight marked by ``fsdp_gather`` becomes its shard and its
    ``Gather``; not while a per-example pass records (its rules read whole weights), nor
    under ``jax.vmap`` of ``x`` alone (tied to a batched ``x``, the re-gathered weight
    would be batched too: one copy per example)."""
    if gather is None and taps._ACTIVE.get() is not None:
        return w, None
    if gather is None and _batched(x) and not _batched(w):
        return w, None
    return fsdp.resolve(w, gather)


def _batched(a) -> bool:
    """Whether ``a`` carries a ``jax.vmap`` axis (a batching tracer's ``batch_dim``)."""
    return getattr(a, "batch_dim", None) is not None


def _zeros_to_none(tangents):
    return [None if (t is None or type(t) is ad.Zero) else t for t in tangents]


def _moved(a, axis, size):
    """``a`` with its vmapped axis at 0: moved there, or broadcast if it has none."""
    if axis is None:
        return jnp.broadcast_to(a, (size, *a.shape))
    return jnp.moveaxis(a, axis, 0)


# The dual binding's primitive of every op, so the per-example driver can read an op's
# equation in a traced program (inside jit, remat, vmap, ...) as that op's call.
OPS_BY_PRIMITIVE: dict = {}


def op_call(eqn):
    """``(op, kw, apply)`` when ``eqn`` (of a traced program) is a call of the family's op
    ``op`` bound with ``kw``: its dual primitive, its custom_vjp binding's primitive, or a
    ``jax.custom_vjp`` call of the op (read off the backward rule JAX keeps, ``_vjp_bwd``
    bound to the op with the call's ``_Static``);
    ``apply(x, w, b)`` binds it again. ``None`` otherwise."""
    prim = getattr(eqn, "primitive", None)
    op = OPS_BY_PRIMITIVE.get(prim)
    if op is not None:
        kw = dict(eqn.params)
        bind = op.custom_vjp if prim is op.custom_vjp_primitive else op.dual
        rule_kw = {k: v for k, v in kw.items() if k != "residuals"}  # a binding's, not B's
        return op, rule_kw, lambda x, w, b: bind(x, w, b, **kw)
    bwd = eqn.params.get("bwd") if eqn is not None else None
    op = getattr(getattr(bwd, "f", None), "__self__", None)
    if not isinstance(op, BilinearOp) or getattr(bwd.f, "__func__", None) is not (
        BilinearOp._vjp_bwd
    ):
        return None
    for _, args in getattr(bwd, "transforms", ()):
        for a in args if isinstance(args, tuple) else ():
            for v in a if isinstance(a, tuple) else (a,):
                static = getattr(v, "val", v)
                if isinstance(static, _Static):
                    apply = functools.partial(
                        op.custom_vjp, residuals=static.residuals, **dict(static.kw)
                    )
                    return op, dict(static.kw), apply
    return None


def per_example_rule(op: BilinearOp, params: dict):
    """The per-example rule (``taps``' protocol) of one call of ``op`` bound with ``params``
    (the dual primitive's parameters, or ``compute_dtype``/``out_dtype`` and the op's own)."""
    return _Rule(op, tuple(sorted(params.items())))


class _Rule:
    """One call's per-example rule (the protocol in ``taps``): the op and its static kw."""

    __slots__ = ("kw", "op")

    def __init__(self, op: BilinearOp, kw: tuple):
        self.op, self.kw = op, dict(kw)

    @property
    def name(self) -> str:
        return self.op.name

    def _params(self):
        return {k: v for k, v in self.kw.items() if k not in _RESERVED}

    def example_axis(self, x, w):
        """Where the examples (axis 0 of ``x``) land in ``y``; ``None``: the op mixes them."""
        if np.ndim(x) == 0:
            return None
        cd, acc, _ = policy(x.dtype, w.dtype, self.kw["compute_dtype"], self.kw["out_dtype"])
        params = tuple(sorted(self._params().items()))
        return _example_axis(
            self.op.forward_fn, tuple(np.shape(x)), tuple(np.shape(w)), cd, acc, params
        )

    def sq_norms(self, x, g, w_aval, y_axis, dtype):
        """``(route, ‖w̄_i‖² (n,), w̄_i or None)``: the op's ghost rule, else the generic route."""
        x, g, params = x.astype(dtype), g.astype(dtype), self._params()
        rule = self.op.per_example_rule
        if rule is not None:
            got = rule(x, g, w_aval, y_axis=y_axis, preferred_element_type=dtype, **params)
            if got is not None:
                return got if len(got) == 3 else (*got, None)

        size = int(np.prod(w_aval.shape))
        keep = ghost.keeps(x.shape[0], size, x.size + g.size)

        def sq(x, g):  # ‖w̄_i‖² of a block, and w̄_i where kept for the clipped sum Σ c_i w̄_i
            w_bars = self.per_example_w(x, g, w_aval, y_axis, dtype)  # (k, *w.shape)
            sq = jnp.sum(w_bars**2, axis=tuple(range(1, w_bars.ndim)))
            return (sq, w_bars) if keep else sq

        if keep:  # all n kept anyway: one call, no blocks
            return ("per_example", *sq(x, g))
        return "per_example", ghost.in_blocks(sq, [x, g], [0, y_axis], size), None

    def factors(self, x, g, w_aval, y_axis, dtype):
        """The op's ``factors`` rule on ``x``, ``g`` in ``dtype``, or ``None``."""
        if self.op.factors_rule is None:
            return None
        x, g = x.astype(dtype), g.astype(dtype)
        return self.op.factors_rule(x, g, w_aval, y_axis=y_axis, preferred_element_type=dtype,
                                    **self._params())  # fmt: skip

    def per_example_w(self, x, g, w_aval, y_axis, dtype):
        """``w̄_i = B_wᵀ(g_i; x_i)`` for every example: ``(n, *w.shape)`` in ``dtype`` (the
        op's ``transpose_w`` under ``jax.vmap``; the generic route, and the per-example sum
        of a leaf used by several calls)."""
        params = self._params()

        def one(x_i, g_i):  # example i alone: its size-1 example axes put back
            g_i = jnp.expand_dims(g_i, y_axis)
            x_i = x_i[None]
            return self.op.transpose_w(g_i, x_i, w_aval, preferred_element_type=dtype, **params)

        return jax.vmap(one, in_axes=(0, y_axis))(x.astype(dtype), g.astype(dtype))

    def weight_grad(self, x, g, w_aval):
        """``w̄ = B_wᵀ(g; x)`` under the op's precision policy, in ``w_aval``'s dtype: the op's
        ``per_example_sum`` where it has one (and no ``quant``), else its pullback."""
        summed = self.op.per_example_sum
        if summed is not None and self.kw.get("quant") is None:
            kw = self.kw
            cd, acc, _ = policy(x.dtype, w_aval.dtype, kw["compute_dtype"], kw["out_dtype"])
            w_bar = summed(x.astype(cd), g.astype(cd), w_aval, preferred_element_type=acc,
                           **self._params())  # fmt: skip
            if w_bar is not None:
                return w_bar.astype(w_aval.dtype)
        return self.op.pullback(x, w_aval, g, wrt=("w",), **self.kw)[1]


class BatchRule(NamedTuple):
    """What a ``batch`` hook returns: how ``vmap`` binds an op again (see ``bilinear_op``).

    The builder moves the vmapped axis of each batched operand to 0 (an unbatched ``x``
    whose tangent ``dx`` is batched is broadcast, and likewise ``w`` and ``dw``), applies
    ``x`` to ``x`` and ``dx`` and ``w`` to ``w`` and ``dw``, binds ``op``'s primitive (or
    its pushforward primitive) with ``params`` merged over the current ones, and applies
    ``out`` to the result. Operand and output transforms are reshapes or transposes: JAX
    differentiates them itself, the bound op keeps its explicit rules.

    Attributes:
      params: the bound op's static parameters that change (merged over the current ones).
      out_dim: the vmapped axis of ``y`` (after ``out``).
      x: ``x`` (vmapped axis at 0) -> the bound op's first operand; ``None``: as it is.
      w: ``w`` (vmapped axis at 0) -> its second operand; ``None``: as it is.
      out: ``(y_bound, axis_size) -> y``; ``None``: the bound result is ``y``.
      op: the ``BilinearOp`` to bind (another op of the family); ``None``: this op.
    """

    params: dict
    out_dim: int
    x: Callable | None = None
    w: Callable | None = None
    out: Callable | None = None
    op: BilinearOp | None = None


def _bias_like(b, b_dim, y, out_dim):
    """A bias ``(d,)`` (or a batch of them, vmapped axis ``b_dim``) shaped to broadcast on
    ``y``'s own last axis, where ``y`` has the vmapped axis at ``out_dim``."""
    last = y.ndim - 2 if out_dim == y.ndim - 1 else y.ndim - 1  # the unbatched y's last axis
    shape = [1] * y.ndim
    shape[last] = b.shape[-1]
    if b_dim is not None:
        b = jnp.moveaxis(b, b_dim, 0)  # (size, d)
        shape[out_dim] = b.shape[0]
        b = b if out_dim < last else b.T
    return jnp.broadcast_to(b.reshape(shape), y.shape)


class BilinearOp:
    """Both bindings of one bilinear op; made by ``bilinear_op`` (see there)."""

    def __init__(
        self,
        name: str,
        forward: Callable,
        transpose_x: Callable,
        transpose_w: Callable,
        *,
        batch: Callable | None = None,
        out_sharding: Callable | None = None,
        pullback: Callable | None = None,
        pushforward: Callable | None = None,
        per_example: Callable | None = None,
        per_example_sum: Callable | None = None,
        factors: Callable | None = None,
        scale_axes: Callable | None = None,
    ):
        self.name = name
        self.per_example_rule, self.per_example_sum = per_example, per_example_sum
        self.factors_rule = factors
        self.scale_axes = scale_axes
        self.forward_fn, self.transpose_x, self.transpose_w = forward, transpose_x, transpose_w
        self._batch_hook, self._out_sharding = batch, out_sharding
        self._pullback_fn = pullback or self._composed_pullback
        self._pushforward_fn = pushforward or self._composed_pushforward
        self.primitive = Primitive(f"jaxlinear_{name}")
        self.pushforward_primitive = Primitive(f"jaxlinear_{name}_pushforward")
        self.custom_vjp_primitive = Primitive(f"jaxlinear_{name}_custom_vjp")
        OPS_BY_PRIMITIVE[self.primitive] = self
        OPS_BY_PRIMITIVE[self.custom_vjp_primitive] = self
        self._register()
        self._custom_vjp = self._make_custom_vjp()

    def __repr__(self):
        return f"BilinearOp({self.name!r})"

    # ---------------------------------------------------------------------------------
    # The formulas under the policy (plain functions; every binding calls these).

    # The author's functions are looked up on the instance at call time, so a test can
    # wrap them (count calls, inject a wrong rule) and see what each transform runs.
    def _composed_pullback(self, x, w, g, **kw):
        kw = {**kw, "scale_axes": self.scale_axes} if "quant" in kw else kw
        return apply_pullback(self.transpose_x, self.transpose_w, x, w, g, **kw)

    def _composed_pushforward(self, x, w, dx, dw, db, **kw):
        kw = {**kw, "scale_axes": self.scale_axes} if "quant" in kw else kw
        return apply_pushforward(self.forward_fn, x, w, dx, dw, db, **kw)

    def forward(self, x, w, b=None, *, compute_dtype=None, out_dtype=None, gather=None, **params):
        """``y = B(x, w) + b``, policy applied: cast, accumulate wide, add ``b``, round once.

        Args:
          x: the first operand.
          w: the second operand (the weights); with ``gather``, its shard.
          b: bias on the output's last axis, or ``None``.
          compute_dtype: cast ``x`` and ``w`` to this dtype (accumulation stays wide).
          out_dtype: dtype of ``y`` (default: the compute dtype).
          gather: an ``fsdp.Gather``: ``w`` is a shard, gathered here; or ``None``.
          **params: the op's static parameters (and ``quant``, a resolved recipe).
        """
        if gather is not None:
            w = gather.gather(w, after=x)
        if "quant" in params:
            params["scale_axes"] = self.scale_axes
        return apply_forward(
            self.forward_fn, x, w, b, compute_dtype=compute_dtype, out_dtype=out_dtype, **params
        )

    def pushforward(self, x, w, dx=None, dw=None, db=None, *, gather=None, **kw):
        """``dy = B(dx, w) + B(x, dw) + db``; a ``None`` tangent is zero and its term skipped.

        Args:
          x: the first operand (the primal point).
          w: the second operand (the primal point); with ``gather``, its shard.
          dx: tangent of ``x``, or ``None``.
          dw: tangent of ``w`` (with ``gather``, of its shard), or ``None``.
          db: tangent of the bias, or ``None``.
          gather: an ``fsdp.Gather`` (``w`` and ``dw`` are shards, gathered here), or ``None``.
          **kw: ``compute_dtype``, ``out_dtype``, ``quant`` and the op's static parameters.
        """
        if gather is not None:
            w = gather.gather(w, after=x if dx is None else dx)
            dw = None if dw is None else gather.gather(dw)
        # A recipe (kw["quant"]) goes through the composed products: a fused rule knows none.
        fn = self._composed_pushforward if "quant" in kw else self._pushforward_fn
        return fn(x, w, dx, dw, db, **kw)

    def pullback(self, x, w, g, *, wrt=_NAMES, b=None, gather=None, **kw):
        """``(x̄, w̄, b̄)`` for the names in ``wrt`` (others ``None``); ``b̄`` in ``b``'s dtype,
        summed wide and rounded once to it (a float32 ``b`` beside a bfloat16 ``w`` too).

        Args:
          x: the first operand (the primal point).
          w: the second operand (the primal point); with ``gather``, its shard: gathered
            again here (after ``g``: the FSDP residual policy), and ``w̄`` comes back
            reduce-scattered to the shard.
          g: the output cotangent, shaped like ``y``.
          wrt: the names among ``"x"``, ``"w"``, ``"b"`` to compute.
          b: the bias, for ``b̄``'s dtype (``None``: ``w``'s dtype).
          gather: an ``fsdp.Gather``, or ``None``.
          **kw: ``compute_dtype``, ``out_dtype``, ``quant`` and the op's static parameters.
        """
        if gather is not None:
            w = gather.gather(w, after=g) if "x" in wrt else gather.whole_aval(_aval(w))
        fn = self._composed_pullback if "quant" in kw else self._pullback_fn  # (see pushforward)
        dx, dw, db = fn(x, w, g, wrt=tuple(wrt), **kw)
        if gather is not None and dw is not None:
            dw = gather.scatter(dw)
        if db is not None and b is not None and db.dtype != b.dtype:
            db = bias_cotangent(g, b.dtype)  # (XLA drops the first, unused sum)
        return dx, dw, db

    def _out_aval(self, x, w, *operands, compute_dtype, out_dtype, gather=None, **params):
        """``y``'s abstract value; varying along every manual axis any operand varies along."""
        w_shard, w = w, w if gather is None else gather.whole_type(w)
        params.pop("quant", None)
        shape = out_shape(
            self.forward_fn, x, w, compute_dtype=compute_dtype, out_dtype=out_dtype, **params
        )
        _, _, out = policy(x.dtype, w.dtype, compute_dtype, out_dtype)
        sharding = None if self._out_sharding is None else self._out_sharding(x, w)
        if sharding is not None:
            aval = x.update(shape=shape, dtype=out, weak_type=False, sharding=sharding)
        else:
            aval = x.update(shape=shape, dtype=out, weak_type=False)
        axes = frozenset().union(*(vma.varying_axes(a) for a in (x, w_shard, *operands)))
        return vma.with_varying(aval, axes)

    # ---------------------------------------------------------------------------------
    # Binding 1: jax.custom_vjp. fwd saves exactly (x, w); bwd = the two transposes.

    def _make_custom_vjp(self):
        @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
        def call(static, x, w, b):
            return self.forward(x, w, b, **dict(static.kw))

        call.defvjp(self._vjp_fwd, self._vjp_bwd)
        return call

    def _vjp_fwd(self, static: _Static, x, w, b):
        kw = dict(static.kw)
        if static.residuals == "compute":
            # Save the operands as the forward pass casts them (the casts are reused).
            x, w = _exact_cast(x, kw["compute_dtype"]), _exact_cast(w, kw["compute_dtype"])
        y = self.forward(x, w, b, **kw)
        if b is not None and vma.varying_axes(b) != vma.varying_axes(w):
            # Inside shard_map, a b replicated unlike w: keep its type in a zero-size slice.
            return y, (x, w, b[:0])
        return y, (x, w)  # residuals: exactly x and w (never y, never b)

    def _vjp_bwd(self, static: _Static, residuals, g):
        kw = dict(static.kw)
        x, w, *b_type = residuals
        # "compute" residuals back in the primals' dtypes: exact (see _exact_cast), and XLA
        # folds the round trip into the backward products' own cast to compute_dtype; so
        # each cotangent is rounded once, from the accumulator to its primal's dtype.
        x, w = x.astype(static.x_dtype), w.astype(static.w_dtype)
        b_like = b_type[0] if b_type else jax.ShapeDtypeStruct((0,), static.b_dtype or w.dtype)
        wrt = _NAMES if static.b_dtype is not None else _NAMES[:2]
        dx, dw, db = self.pullback(x, w, g, wrt=wrt, b=b_like, **kw)
        # Inside shard_map: sum over the manual axes along which each primal is replicated.
        db = vma.psum_to(db, b_type[0] if b_type else w)
        return vma.psum_to(dx, x), vma.psum_to(dw, w), db

    def custom_vjp(
        self,
        x,
        w,
        b=None,
        *,
        compute_dtype=None,
        out_dtype=None,
        residuals="exact",
        gather=None,
        quant=None,
        **params,
    ):
        r"""``y = B(x, w) + b`` as a ``jax.custom_vjp``: reverse mode through the transposes.

        Works under ``grad``, ``vjp``, ``jacrev``, ``vmap``, ``jit``, ``checkpoint``,
        ``scan``, ``shard_map`` and ``linear_transpose``; forward mode raises JAX's
        ``TypeError`` (use ``dual``). It is bound through the primitive
        ``jaxlinear_<name>_custom_vjp`` so that ``vmap`` binds the op again on the batched
        shapes (its ``BatchRule``, as ``dual`` does): ``grad`` of ``vmap`` then runs the
        backward pass once for all examples, contracting over them.

        Args:
          x: the first operand (validated by the caller).
          w: the second operand, the weights (validated by the caller).
          b: ``(y.shape[-1],)`` bias on the output's last axis, or ``None``.
          compute_dtype: cast ``x`` and ``w`` to this dtype (accumulation stays wide).
          out_dtype: dtype of ``y`` (default: the compute dtype).
          residuals: ``"exact"`` (default): the forward pass saves ``x`` and ``w`` as
            given; ``"compute"``: it saves them cast to ``compute_dtype`` (less memory,
            no recast in the backward pass; the same cotangents, in the primals' dtypes).
          gather: an ``fsdp.Gather`` (FSDP): ``w`` is a shard, gathered in the forward
            pass, saved as the shard and gathered again in the backward pass; ``w̄``
            comes back reduce-scattered. ``None``: ``w`` as given, unless it is a weight
            marked by ``fsdp_gather`` (then its shard and its ``Gather``).
          quant: ``None``, a recipe name (``"fp8_hybrid"``, ``"fp8_rowwise"``, ``"int8"``)
            or a ``Recipe``: each of the three products in low precision with dynamic
            scales (``jaxlinear._src.quant``); the bias and the output rounding as above.
          **params: the op's static (hashable) parameters, passed to its three functions.

        Returns:
          ``y`` in ``out_dtype``.
        """
        if residuals not in ("exact", "compute"):
            raise ValueError(
                f"{self.name}: `residuals` must be 'exact' or 'compute', got {residuals!r}"
            )
        w, gather = _resolve(x, w, gather)
        if gather is not None and gather.spec is not None:  # under jit: on the shards
            bind = functools.partial(
                self.custom_vjp,
                compute_dtype=compute_dtype,
                out_dtype=out_dtype,
                residuals=residuals,
                quant=quant,
                **params,
            )
            return self._on_shards(bind, x, w, b, gather, compute_dtype, out_dtype, params)
        static = _Static(
            self._static(compute_dtype, out_dtype, params, quant, gather),
            None if b is None else jnp.dtype(b.dtype),
            residuals,
            jnp.dtype(x.dtype),
            jnp.dtype(w.dtype),
        )
        kw = dict(static.kw, residuals=residuals)

        def apply(x, w, b):
            return self.custom_vjp_primitive.bind(*((x, w) if b is None else (x, w, b)), **kw)

        return taps.call(_Rule(self, static.kw), apply, x, w, b)

    # The custom_vjp binding is bound through a primitive, so that ``vmap`` sees the op
    # whole: its batching rule is the op's ``BatchRule`` (``_batched_bind``), which binds
    # this primitive again on the batched shapes; its JVP is ``jax.jvp`` of the
    # ``jax.custom_vjp`` call (so ``grad`` runs ``_vjp_fwd``/``_vjp_bwd``, forward mode
    # raises JAX's error). ``jax.vmap`` of a ``jax.custom_vjp`` itself would batch the
    # backward function per example and sum the weight cotangents afterwards.

    def _vjp_static(self, x, w, b, residuals, kw) -> _Static:
        b_dtype = None if b is None else jnp.dtype(b.dtype)
        items = tuple(sorted(kw.items()))
        return _Static(items, b_dtype, residuals, jnp.dtype(x.dtype), jnp.dtype(w.dtype))

    def _vjp_call(self, x, w, *b, residuals, **kw):
        """The ``jax.custom_vjp`` call for this primitive's operands and parameters."""
        b = b[0] if b else None
        return self._custom_vjp(self._vjp_static(x, w, b, residuals, kw), x, w, b)

    def _vjp_jvp(self, primals, tangents, **kw):
        live = [type(t) is not ad.Zero for t in tangents]

        def f(*args):  # the operands with a zero tangent are constants
            args = iter(args)
            operands = (next(args) if u else p for p, u in zip(primals, live, strict=True))
            return self._vjp_call(*operands, **kw)

        return jax.jvp(
            f,
            [p for p, u in zip(primals, live, strict=True) if u],
            [t for t, u in zip(tangents, live, strict=True) if u],
        )

    def _on_shards(self, bind, x, w, b, gather, compute_dtype, out_dtype, params):
        """A weight marked ``fsdp_gather(..., spec=)`` under ``jit``: see ``fsdp.on_shards``."""
        cd, acc, _ = policy(x.dtype, w.dtype, compute_dtype, out_dtype)
        items = tuple(sorted(params.items()))
        y_axis = _example_axis(self.forward_fn, tuple(x.shape), tuple(w.shape), cd, acc, items)
        return fsdp.on_shards(self.name, bind, x, w, b, gather, y_axis)

    def _static(self, compute_dtype, out_dtype, params, quant=None, gather=None):
        for k in _BUILDER_ONLY:
            if k in params:
                raise TypeError(f"{self.name}: `{k}` is set by the builder, not an op parameter")
        kw = dict(
            compute_dtype=None if compute_dtype is None else jnp.dtype(compute_dtype),
            out_dtype=None if out_dtype is None else jnp.dtype(out_dtype),
            **params,
        )
        quant = _quant.resolve(self.name, quant)
        if quant is not None:  # only then a parameter: the primitives' params stay as before
            kw["quant"] = quant
        for k, v in kw.items():
            try:
                hash(v)
            except TypeError:
                raise TypeError(
                    f"{self.name}: parameter `{k}` must be hashable (static), got"
                    f" {type(v).__name__} {v!r}; use tuples, not lists"
                ) from None
        if gather is not None:
            kw["gather"] = gather
        return tuple(sorted(kw.items()))

    # ---------------------------------------------------------------------------------
    # Binding 2: the dual primitives (explicit JVP and explicit transposes).

    def dual(
        self,
        x,
        w,
        b=None,
        *,
        compute_dtype=None,
        out_dtype=None,
        gather=None,
        quant=None,
        **params,
    ):
        r"""``y = B(x, w) + b`` as a primitive with an explicit JVP *and* explicit transposes.

        Same arguments as ``custom_vjp`` (but ``residuals``). Supports every transform:
        ``jvp``, ``jacfwd``, ``hessian``, ``linearize``, ``linear_transpose`` in ``x`` or
        in ``(w, b)``, ``grad``, ``vjp``, ``vmap``, ``jit``, ``shard_map``.

        Args:
          x: the first operand, as in ``custom_vjp``.
          w: the second operand (the weights), as in ``custom_vjp``.
          b: bias on the output's last axis, or ``None``.
          compute_dtype: cast ``x`` and ``w`` to this dtype (accumulation stays wide).
          out_dtype: dtype of ``y`` (default: the compute dtype).
          gather: as in ``custom_vjp``: the primitives take the shard, their linearization
            saves it, and their transposes gather again.
          quant: as in ``custom_vjp``: the JVP's terms are the recipe's forward product and
            the transposes its gradient products.
          **params: the op's static parameters.
        """
        w, gather = _resolve(x, w, gather)
        if gather is not None and gather.spec is not None:  # under jit: on the shards
            bind = functools.partial(
                self.dual, compute_dtype=compute_dtype, out_dtype=out_dtype, quant=quant, **params
            )
            return self._on_shards(bind, x, w, b, gather, compute_dtype, out_dtype, params)
        static = self._static(compute_dtype, out_dtype, params, quant, gather)
        kw = dict(static)

        def apply(x, w, b):
            return self.primitive.bind(*((x, w) if b is None else (x, w, b)), **kw)

        return taps.call(_Rule(self, static), apply, x, w, b)

    def _bind_pushforward(self, x, w, dx, dw, db, **kw):
        """Bind the pushforward primitive on the non-zero tangents; ``None`` if all are zero."""
        tangents = _zeros_to_none((dx, dw, db))
        mask = tuple(t is not None for t in tangents)
        if not any(mask):
            return None
        present = (t for t in tangents if t is not None)
        return self.pushforward_primitive.bind(x, w, *present, mask=mask, **kw)

    @staticmethod
    def _split(args, mask):
        """``(x, w, dx|None, dw|None, db|None)`` from the pushforward operands and the mask."""
        x, w, *tangents = args
        it = iter(tangents)
        return (x, w, *(next(it) if m else None for m in mask))

    # forward primitive ------------------------------------------------------------------

    def _fwd_impl(self, x, w, *b, **kw):
        return self.forward(x, w, *b or [None], **kw)

    def _fwd_abstract_eval(self, x, w, *b, **kw):
        return self._out_aval(x, w, *b, **kw)

    def _fwd_jvp(self, primals, tangents, **kw):
        x, w, *_ = primals
        y = self.primitive.bind(*primals, **kw)
        dy = self._bind_pushforward(x, w, *tangents, *[None] * (3 - len(tangents)), **kw)
        return y, jnp.zeros_like(y) if dy is None else dy

    def _fwd_transpose(self, ct, x, w, *b, **kw):
        """Transpose in ``x`` (``w``, ``b`` fixed) or in ``(w, b)`` (``x`` fixed)."""
        operands = (x, w, *b)
        undefined = [ad.is_undefined_primal(a) for a in operands]
        if undefined[0] and undefined[1]:
            raise ValueError(
                f"jaxlinear_{self.name}: cannot transpose with respect to both `x` and `w`:"
                " the map is bilinear, not linear, in (x, w)"
            )
        if type(ct) is ad.Zero:
            return [None] * len(operands)
        wrt = tuple(n for n, u in zip(_NAMES, undefined, strict=False) if u)
        x_, w_, *b_ = (_aval(a) if u else a for a, u in zip(operands, undefined, strict=True))
        cts = self.pullback(x_, w_, ct, wrt=wrt, b=b_[0] if b_ else None, **kw)
        # Inside shard_map: sum over the manual axes along which the operand is replicated.
        return [
            vma.psum_to(c, _aval(a)) if u else None
            for c, a, u in zip(cts, operands, undefined, strict=False)
        ]

    def _fwd_batch(self, args, dims, **kw):
        """Either binding's primitive under ``vmap``: bound again as the op's ``BatchRule``
        says, else ``jax.vmap`` of the binding itself (the formulas, or the custom_vjp)."""
        x, w, *b = args
        x_dim, w_dim, *b_dim = dims
        got = self._batched_bind(x, w, None, None, x_dim, w_dim, None, None, b, b_dim, kw)
        if got is not None:
            return got
        binding = self._vjp_call if "residuals" in kw else self._fwd_impl
        fn = jax.vmap(lambda *a: binding(*a, **kw), in_axes=tuple(dims))
        return fn(*args), 0

    def _batched_bind(self, x, w, dx, dw, x_dim, w_dim, dx_dim, dw_dim, rest, rest_dim, kw):
        """Bind the op (or another of the family) again, as the op's batching hook says.

        ``x`` and ``dx`` are batched together (the unbatched one broadcast), as are ``w``
        and ``dw``; ``rest`` is ``[]`` or ``[b]`` (bias or bias tangent, vmapped axis
        ``rest_dim[0]``). The bias is bound with the op where it stays on the last axis
        of the result; otherwise the op is bound in the accumulation dtype and the bias
        added afterwards, then rounded once, as the policy does. ``None`` (the caller
        falls back to ``jax.vmap`` of the formulas) if the op has no hook, the hook
        declines, or there is no product to bind (only a bias tangent).
        """
        pushforward = "mask" in kw
        if self._batch_hook is None or (pushforward and dx is None and dw is None):
            return None
        if kw.get("gather") is not None:  # FSDP: jax.vmap of the formulas (they gather)
            return None
        b, b_dim = (rest[0], rest_dim[0]) if rest else (None, None)
        dims = (x_dim, w_dim, dx_dim, dw_dim, b_dim)
        size = next(
            a.shape[d] for a, d in zip((x, w, dx, dw, b), dims, strict=True) if d is not None
        )
        x_b = x_dim is not None or dx_dim is not None
        w_b = w_dim is not None or dw_dim is not None
        if x_b or w_b:
            op_params = {k: v for k, v in kw.items() if k not in _RESERVED}
            x_ndim, w_ndim = x.ndim - (x_dim is not None), w.ndim - (w_dim is not None)
            rule = self._batch_hook(x_ndim, w_ndim, x_b, w_b, axis_size=size, **op_params)
            if rule is None:
                return None
            rule = rule if isinstance(rule, BatchRule) else BatchRule(*rule)
            if size == 0 and (rule.x or rule.w or rule.out):
                return None  # folding a zero-size axis into another loses the other's size
        else:  # only the bias is batched: bind once, unbatched, and add the batch of biases
            rule = BatchRule({}, 0, out=lambda y, size: jnp.broadcast_to(y, (size, *y.shape)))

        def batched(a, t, a_dim, t_dim, f):  # the same transform for an operand and its tangent
            a, t = _moved(a, a_dim, size), None if t is None else _moved(t, t_dim, size)
            return (a, t) if f is None else (f(a), None if t is None else f(t))

        if x_b:
            x, dx = batched(x, dx, x_dim, dx_dim, rule.x)
        if w_b:
            w, dw = batched(w, dw, w_dim, dw_dim, rule.w)
        op = rule.op or self
        kw = {**kw, **rule.params}
        inside = b is not None and b_dim is None and rule.out is None
        if inside:  # a bias must stay on the last axis of the bound result
            static = {k: v for k, v in kw.items() if k not in ("mask", "residuals")}
            inside = rule.out_dim != len(out_shape(op.forward_fn, x, w, **static)) - 1
        if b is not None and not inside:  # bind in the accumulation dtype, add b, round once
            _, acc, out = policy(x.dtype, w.dtype, kw["compute_dtype"], kw["out_dtype"])
            kw["out_dtype"] = acc
        if pushforward:
            kw["mask"] = (dx is not None, dw is not None, inside)
            present = [t for t in (dx, dw, b if inside else None) if t is not None]
            y = op.pushforward_primitive.bind(x, w, *present, **kw)
        else:  # the binding that is being batched: dual, or custom_vjp (it has `residuals`)
            prim = op.custom_vjp_primitive if "residuals" in kw else op.primitive
            y = prim.bind(x, w, *([b] if inside else []), **kw)
        if rule.out is not None:
            y = rule.out(y, size)
        if b is not None and not inside:
            y = (y + _bias_like(b.astype(acc), b_dim, y, rule.out_dim)).astype(out)
        return y, rule.out_dim

    # pushforward primitive ----------------------------------------------------------------

    def _push_impl(self, *args, mask, **kw):
        return self.pushforward(*self._split(args, mask), **kw)

    def _push_abstract_eval(self, *args, mask, **kw):
        del mask
        return self._out_aval(*args, **kw)

    def _push_jvp(self, primals, tangents, *, mask, **kw):
        # push(x, w; dx, dw, db) = B(dx, w) + B(x, dw) + db. Differentiating every operand
        # (dots for the new tangents): [B(ḋx, w) + B(x, ḋw) + ḋb] + [B(dx, ẇ) + B(ẋ, dw)],
        # and the bracket on the right is push(x=dx, w=dw; dx=ẋ, dw=ẇ): roles swapped.
        x, w, dx, dw, _ = self._split(primals, mask)
        x_dot, w_dot, *dots = _zeros_to_none(tangents)
        _, _, dx_dot, dw_dot, db_dot = self._split((None, None, *dots), mask)
        out = self.pushforward_primitive.bind(*primals, mask=mask, **kw)
        terms = [
            self._bind_pushforward(x, w, dx_dot, dw_dot, db_dot, **kw),
            self._bind_pushforward(
                x if dx is None else dx,  # dx is None: its term B(dx, ẇ) is dropped below
                w if dw is None else dw,  # dw is None: its term B(ẋ, dw) is dropped below
                None if dw is None else x_dot,
                None if dx is None else w_dot,
                None,
                **kw,
            ),
        ]
        terms = [t for t in terms if t is not None]
        if not terms:
            return out, jnp.zeros_like(out)
        return out, terms[0] if len(terms) == 1 else terms[0] + terms[1]

    def _push_transpose(self, ct, *args, mask, **kw):
        x, w, *tangents = args
        if ad.is_undefined_primal(x) or ad.is_undefined_primal(w):
            raise ValueError(
                f"jaxlinear_{self.name}_pushforward: the pushforward is linear in the tangents"
                " (dx, dw, db) only; it cannot be transposed with respect to the primal `x` or `w`"
            )
        if type(ct) is ad.Zero:
            return [None] * len(args)
        names = [n for n, m in zip(_NAMES, mask, strict=True) if m]
        wrt = tuple(n for n, t in zip(names, tangents, strict=True) if ad.is_undefined_primal(t))
        b_like = next((t.aval for n, t in zip(names, tangents, strict=True) if n == "b"), None)
        cts = self.pullback(x, w, ct, wrt=wrt, b=b_like, **kw)
        by_name = dict(zip(_NAMES, cts, strict=True))
        out = [None, None]
        for n, t in zip(names, tangents, strict=True):
            if not ad.is_undefined_primal(t):
                out.append(None)
                continue
            c = by_name[n]
            if n == "b":
                c = c.astype(t.aval.dtype)
            # Inside shard_map: sum over the manual axes along which this tangent is replicated.
            out.append(vma.psum_to(c, t.aval))
        return out

    def _push_batch(self, args, dims, *, mask, **kw):
        kw = dict(mask=mask, **kw)
        x, w, dx, dw, db = self._split(args, mask)
        x_dim, w_dim, dx_dim, dw_dim, db_dim = self._split(dims, mask)
        rest, rest_dim = ([], []) if db is None else ([db], [db_dim])
        got = self._batched_bind(x, w, dx, dw, x_dim, w_dim, dx_dim, dw_dim, rest, rest_dim, kw)
        if got is not None:
            return got
        fn = jax.vmap(lambda *a: self._push_impl(*a, **kw), in_axes=tuple(dims))
        return fn(*args), 0

    def _register(self):
        """Register each primitive's rules; evaluation and lowering are the formulas."""

        def no_residuals(f):  # the custom_vjp primitive's other rules are the dual's
            return lambda *a, residuals, **kw: f(*a, **kw)

        rules = (
            (self.primitive, self._fwd_impl, self._fwd_abstract_eval, self._fwd_jvp,
             self._fwd_transpose, self._fwd_batch),
            (self.pushforward_primitive, self._push_impl, self._push_abstract_eval,
             self._push_jvp, self._push_transpose, self._push_batch),
            (self.custom_vjp_primitive, no_residuals(self._fwd_impl),
             no_residuals(self._fwd_abstract_eval), self._vjp_jvp,
             no_residuals(self._fwd_transpose), self._fwd_batch),
        )  # fmt: skip
        for prim, impl, abstract_eval, jvp, transpose, batch in rules:
            prim.def_impl(impl)
            prim.def_abstract_eval(abstract_eval)
            ad.primitive_jvps[prim] = jvp
            ad.primitive_transposes[prim] = transpose
            batching.primitive_batchers[prim] = batch
            mlir.register_lowering(prim, mlir.lower_fun(impl, multiple_results=False))


def bilinear_op(
    name: str,
    forward: Callable,
    transpose_x: Callable,
    transpose_w: Callable,
    *,
    batch: Callable | None = None,
    out_sharding: Callable | None = None,
    pullback: Callable | None = None,
    pushforward: Callable | None = None,
    per_example: Callable | None = None,
    per_example_sum: Callable | None = None,
    factors: Callable | None = None,
    scale_axes: Callable | None = None,
) -> BilinearOp:
    r"""Build both bindings of a bilinear op ``y = B(x, w) (+ b)`` from ``B`` and its transposes.

        ẏ = B(ẋ, w) + B(x, ẇ) + ḃ,   x̄ = B_xᵀ(g; w),   w̄ = B_wᵀ(g; x),   b̄ = Σ g

    The three functions are plain ``jnp``/``lax`` code. They receive the operands already
    cast to the compute dtype and must pass ``preferred_element_type`` (the accumulation
    dtype) on to their ``lax``/``jnp`` contraction; the builder adds the bias, rounds once,
    and returns cotangents in each primal's dtype. ``**params`` are the op's static
    keyword parameters, exactly as given to ``custom_vjp``/``dual`` (hashable).

    Args:
      name: the primitives are named ``jaxlinear_<name>`` and ``jaxlinear_<name>_pushforward``.
      forward: ``forward(x, w, *, preferred_element_type, **params) -> y``.
      transpose_x: ``transpose_x(g, w, x_aval, *, preferred_element_type, **params) -> x̄``,
        the linear transpose of ``x -> B(x, w)``; ``x_aval`` has ``x``'s ``.shape``/``.dtype``.
      transpose_w: ``transpose_w(g, x, w_aval, *, preferred_element_type, **params) -> w̄``,
        the linear transpose of ``w -> B(x, w)``.
      batch: optional vmap rule ``batch(x_ndim, w_ndim, x_batched, w_batched, *,
        axis_size, **params) -> BatchRule | (new_params, out_dim) | None``, called with
        the unbatched ranks, which operands carry the vmapped axis (moved to 0 by the
        builder; an operand is batched if it or its tangent is) and its size. It says
        how to bind the family again so the explicit rules keep running under ``vmap``
        (and ``grad`` of ``vmap``): a ``BatchRule`` may reshape ``x`` and ``dx`` alike,
        ``w`` and ``dw`` alike, and the result (a convolution folds the vmapped axis
        into its batch or feature groups), or bind another op (dense with a batched
        ``W`` binds ``dot_general``); a pair ``(new_params, out_dim)`` is the short form
        for the same op with new params. The builder handles the bias (batched or not;
        bound with the op where it stays on the result's last axis, else added after,
        in the accumulation dtype) and the pushforward primitive (tangents batched
        independently of the primals). Without a hook (or on ``None``), ``vmap`` runs
        the formulas under ``jax.vmap``: correct values, but ``grad`` then
        differentiates the formulas' ``lax`` ops with JAX's own rules.
      out_sharding: optional ``(x_aval, w_aval) -> Sharding | None``: ``y``'s sharding
        on meshes with Explicit axes.
      pullback: optional fused ``pullback(x, w, g, *, wrt, compute_dtype, out_dtype,
        **params) -> (x̄, w̄, b̄)`` replacing the composed transposes (the dense layer routes
        through ``formulas.pullback`` this way).
      pushforward: optional fused ``pushforward(x, w, dx, dw, db, *, compute_dtype,
        out_dtype, **params)``.
      per_example: optional ghost rule for per-example gradient norms
        (``per_example_grad_norms``, ``clipped_grad``): ``per_example(x, g, w_aval, *,
        y_axis, preferred_element_type, **params) -> (route, sq) | None``, the squared
        norms ``sq: (n,)`` of the per-example ``w̄_i = B_wᵀ(g_i; x_i)`` from the layer
        input ``x: (n, ...)`` (examples on axis 0) and the output cotangent ``g`` (examples
        on ``y_axis``), both already in the norms' dtype, without forming the ``w̄_i``;
        ``route`` names the formula (e.g. ``"gram"``). ``None`` declines (e.g. when the
        shapes make it dearer). A rule that forms the ``w̄_i`` its own way returns
        ``(route, sq, w̄_i: (n, *w.shape))`` (clipping then reuses them). Without it, or
        when it declines, the generic route forms each ``w̄_i`` with ``transpose_w`` under
        ``jax.vmap`` over the examples.
      per_example_sum: optional ``per_example_sum(x, g, w_aval, *, preferred_element_type,
        **params) -> w̄ | None``: ``B_wᵀ(g; x)`` formed the per-example rule's way (e.g. a
        block of examples at a time), for ``clipped_grad``'s sum ``B_wᵀ(c ⊙ g; x)`` where
        the rule returned no ``w̄_i``, when that is cheaper than ``transpose_w`` (operands in
        the compute dtype, ``preferred_element_type`` the accumulation dtype; unquantized).
        ``None`` declines: ``transpose_w``.
      factors: optional rule for a weight used by several calls (a tied embedding, a
        weight shared by layers or scan steps), whose per-example gradient is the sum
        over the calls: ``factors(x, g, w_aval, *, y_axis, preferred_element_type,
        **params) -> (A, B, a_axes, b_axes) | None`` with ``w̄_i = Σ_t A_i[t] ⊗ B_i[t]``,
        ``A: (n, T, |a|)`` over ``w``'s axes ``a_axes`` and ``B: (n, T, |b|)`` over
        ``b_axes`` (each flattened in the order given). The norm of the sum over the
        calls is then a Gram over their concatenated rows, cross terms included.
        ``None`` declines.
      scale_axes: optional rule for quantization recipes (``quant=``) with per-axis
        scaling: ``scale_axes(product, a_ndim, b_ndim, **params) -> (a_map, b_map)`` for
        ``product`` in ``"forward"`` (operands ``x, w``; result ``y``), ``"grad_x"``
        (``g, w``; ``x̄``) and ``"grad_w"`` (``g, x``; ``w̄``): for each operand, the
        ``(operand axis, result axis)`` pairs of the axes the product carries straight
        through to its result (a per-row or per-channel scale along them factors out of
        the product). Without it, every scale is per tensor.

    Returns:
      A ``BilinearOp`` ``op``: ``op.custom_vjp(x, w, b=None, *, compute_dtype=None,
      out_dtype=None, **params)`` and ``op.dual(...)`` (same arguments) are the two
      bindings; ``op.forward``, ``op.pushforward``, ``op.pullback`` the plain formulas;
      ``op.primitive`` and ``op.pushforward_primitive`` the dual primitives,
      ``op.custom_vjp_primitive`` the custom_vjp binding's. Both bindings are
      seen by ``per_example_grad_norms`` / ``clipped_grad`` (through ``taps.call``).

    Examples:
      A 1-D cross-correlation ``y[i] = Σ_k x[i + k] w[k]`` ("valid" windows), its
      transpose in ``x`` (a full convolution of ``g`` with ``w``) and in ``w`` (a
      correlation of ``x`` with ``g``):

      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> def corr(x, w, *, preferred_element_type):
      ...     n = x.shape[0] - w.shape[0] + 1
      ...     return sum(x[k : k + n] * w[k] for k in range(w.shape[0]))
      >>> def corr_tx(g, w, x_aval, *, preferred_element_type):
      ...     return jnp.convolve(g, w, mode="full")
      >>> def corr_tw(g, x, w_aval, *, preferred_element_type):
      ...     return jnp.correlate(x, g, mode="valid")
      >>> op = jaxlinear.bilinear_op("my_corr", corr, corr_tx, corr_tw)
      >>> x, w = jnp.array([1., 2., 3., 4.]), jnp.array([1., -1.])
      >>> op.custom_vjp(x, w).tolist()
      [-1.0, -1.0, -1.0]
      >>> jax.grad(lambda x: op.custom_vjp(x, w) @ jnp.array([1., 2., 3.]))(x).tolist()
      [1.0, 1.0, 1.0, -3.0]
      >>> jax.jvp(lambda w: op.dual(x, w), (w,), (jnp.array([1., 0.]),))[1].tolist()
      [1.0, 2.0, 3.0]
    """
    return BilinearOp(
        name,
        forward,
        transpose_x,
        transpose_w,
        batch=batch,
        out_sharding=out_sharding,
        pullback=pullback,
        pushforward=pushforward,
        per_example=per_example,
        per_example_sum=per_example_sum,
        factors=factors,
        scale_axes=scale_axes,
    )
