r"""Low-precision products: recipes, dynamic scales, quantize / dequantize.

A bilinear layer's training step is three products, and the builder (``bilinear.py``)
writes each one down; a ``Recipe`` says how each is computed:

| product | formula | operands (``lhs``, ``rhs``) |
|---|---|---|
| ``forward`` | ``y = B(x, w)`` | ``(x, w)`` |
| ``grad_x`` | ``x̄ = B_xᵀ(g; w)`` | ``(g, w)`` |
| ``grad_w`` | ``w̄ = B_wᵀ(g; x)`` | ``(g, x)`` |

For one product ``P(a, b)`` with operands in formats ``F_a``, ``F_b`` (largest finite
value ``F.max``: 448 for e4m3, 57344 for e5m2, 127 for int8):

    s_a = max|a| · f32(1 / F_a.max)     over the reduced axes; 1 where 0 or not finite
    q_a = rne_F_a(clip(a / s_a, −F_a.max, F_a.max))
    P(a, b) ≈ (s_a ⊗ s_b) ⊙ P(q_a, q_b)

``rne`` rounds to the nearest value of the format, ties to even (XLA's conversion for
fp8; ``jnp.round`` then a cast for int8). ``P(q_a, q_b)`` runs *in the low format*, with
the recipe's accumulation dtype (float32 for fp8, int32 for int8) as
``preferred_element_type``, and the scales multiply its result in float32 (an int8
product that could sum more than ``2³¹ / 127²`` terms into one element accumulates in
float32 instead: int32 could overflow). The bfloat16 and float32 formats are not scaled
(``s = 1``, ``q = a`` cast). Complex operands are refused.

Scales are *dynamic and stateless* (torchao's "dynamic scaling"): computed from the
current values in every call, nothing kept between steps. Scaling granularity:

* ``"tensor"``: one scale for the whole operand;
* ``"axis"``: one scale per index of each axis the product *keeps* (carries through
  to its result): per row (token) of an activation or a cotangent, per output channel
  of the weight in the forward product, per input channel in ``x̄``'s product, per
  column of ``g`` and ``x`` in ``w̄``'s product. Such a scale is constant along the
  product's contracted axes, so it factors out of the product exactly (``s_a ⊗ s_b``
  is laid out on the result's axes). Which axes an op keeps is its ``scale_axes`` rule
  (``bilinear_op(..., scale_axes=)``); an op without one (or an axis that does not pass
  straight through, such as a convolution's spatial axes or a grouped channel axis)
  gets per-tensor scales.

The named recipes (``RECIPES``) are ``"fp8_hybrid"``, ``"fp8_rowwise"`` and ``"int8"``;
``Recipe`` makes custom ones.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = {
    "e4m3": jnp.dtype(jnp.float8_e4m3fn),
    "e5m2": jnp.dtype(jnp.float8_e5m2),
    "int8": jnp.dtype(jnp.int8),
    "bfloat16": jnp.dtype(jnp.bfloat16),
    "float32": jnp.dtype(jnp.float32),
}
_SCALED = ("e4m3", "e5m2", "int8")  # formats that carry a scale
_ACCUMULATIONS = ("float32", "int32")
_SCALINGS = ("tensor", "axis")
_PRODUCTS = ("forward", "grad_x", "grad_w")


def format_max(fmt: str) -> float:
    """The largest value a scaled format represents: 448 (e4m3), 57344 (e5m2), 127 (int8,
    symmetric: −128 is never used)."""
    if fmt == "int8":
        return 127.0
    return float(jnp.finfo(FORMATS[fmt]).max)


class Operand(NamedTuple):
    """One operand of a product: its format and its scaling granularity.

    Attributes:
      format: ``"e4m3"`` (``float8_e4m3fn``), ``"e5m2"`` (``float8_e5m2``), ``"int8"``,
        ``"bfloat16"`` or ``"float32"`` (the last two: a cast, no scale).
      scaling: ``"tensor"`` (one scale) or ``"axis"`` (one per index of each axis the
        product keeps: per row, per channel; see the module docstring).
    """

    format: str
    scaling: str = "tensor"


class Product(NamedTuple):
    """How one product ``P(lhs, rhs)`` is computed: two ``Operand``s and the accumulation.

    Attributes:
      lhs: the first operand (``x`` in the forward product, ``g`` in both gradients).
      rhs: the second operand (``w``, ``w``, ``x``).
      accumulation: ``"float32"`` or ``"int32"`` (int8 × int8 only): the
        ``preferred_element_type`` of the low-precision product.
    """

    lhs: Operand
    rhs: Operand
    accumulation: str = "float32"


class Recipe(NamedTuple):
    """A quantization recipe: one ``Product`` for each of the three products.

    Hashable (a static argument of the ops). Strings and pairs are accepted where an
    ``Operand`` is expected: ``Recipe.make`` spells them out.

    Attributes:
      forward: ``y = B(x, w)``: operands ``(x, w)``.
      grad_x: ``x̄ = B_xᵀ(g; w)``: operands ``(g, w)``.
      grad_w: ``w̄ = B_wᵀ(g; x)``: operands ``(g, x)``.
      name: a label (shown in reprs and reports).

    Examples:
      >>> import jaxlinear
      >>> r = jaxlinear.Recipe.make(
      ...     forward=(("e4m3", "axis"), ("e4m3", "axis")),
      ...     grad_x=("e5m2", "e4m3"), grad_w=("bfloat16", "bfloat16"), name="mine")
      >>> r.grad_x.lhs, r.grad_x.accumulation
      (Operand(format='e5m2', scaling='tensor'), 'float32')
    """

    forward: Product
    grad_x: Product
    grad_w: Product
    name: str = "custom"

    @classmethod
    def make(cls, *, forward, grad_x, grad_w, name="custom") -> Recipe:
        """A ``Recipe`` from short forms: each product a ``Product`` or ``(lhs, rhs)`` /
        ``(lhs, rhs, accumulation)``; each operand an ``Operand``, a format string
        (per-tensor) or ``(format, scaling)``. Accumulation defaults to int32 for
        int8 × int8, else float32."""
        prods = {}
        for key, p in (("forward", forward), ("grad_x", grad_x), ("grad_w", grad_w)):
            if isinstance(p, Product):
                prods[key] = p
                continue
            lhs, rhs, *acc = p
            lhs, rhs = (
                o if isinstance(o, Operand) else Operand(o) if isinstance(o, str) else Operand(*o)
                for o in (lhs, rhs)
            )
            if not acc:
                acc = ["int32" if lhs.format == rhs.format == "int8" else "float32"]
            prods[key] = Product(lhs, rhs, *acc)
        return _check(cls(**prods, name=name))


def _check(recipe: Recipe) -> Recipe:
    """``recipe`` if every field is valid, else a ``ValueError`` naming the bad one."""
    for key in _PRODUCTS:
        p = getattr(recipe, key)
        if not isinstance(p, Product):
            raise TypeError(f"Recipe: `{key}` must be a Product, got {type(p).__name__}")
        for side in ("lhs", "rhs"):
            o = getattr(p, side)
            if o.format not in FORMATS:
                raise ValueError(
                    f"Recipe: `{key}.{side}.format` must be one of {sorted(FORMATS)},"
                    f" got {o.format!r}"
                )
            if o.scaling not in _SCALINGS:
                raise ValueError(
                    f"Recipe: `{key}.{side}.scaling` must be 'tensor' or 'axis', got {o.scaling!r}"
                )
        if p.accumulation not in _ACCUMULATIONS:
            raise ValueError(
                f"Recipe: `{key}.accumulation` must be 'float32' or 'int32', got {p.accumulation!r}"
            )
        ints = [p.lhs.format == "int8", p.rhs.format == "int8"]
        if p.accumulation == "int32" and not all(ints):
            raise ValueError(
                f"Recipe: `{key}.accumulation` 'int32' needs two int8 operands, got"
                f" {p.lhs.format!r} × {p.rhs.format!r}"
            )
    return recipe


def _make(name, fwd, gx, gw):
    return Recipe.make(forward=fwd, grad_x=gx, grad_w=gw, name=name)


RECIPES = {
    # e4m3 forward, e5m2 gradients (their range), one scale per tensor.
    "fp8_hybrid": _make("fp8_hybrid", ("e4m3", "e4m3"), ("e5m2", "e4m3"), ("e5m2", "e4m3")),
    # The same formats, one scale per row / channel of every operand.
    "fp8_rowwise": _make(
        "fp8_rowwise",
        (("e4m3", "axis"), ("e4m3", "axis")),
        (("e5m2", "axis"), ("e4m3", "axis")),
        (("e5m2", "axis"), ("e4m3", "axis")),
    ),
    # Symmetric int8, int32 accumulation: activations and cotangents per row, the weight
    # per output channel (forward) / input channel (x̄), w̄'s operands per column.
    "int8": _make(
        "int8",
        (("int8", "axis"), ("int8", "axis")),
        (("int8", "axis"), ("int8", "axis")),
        (("int8", "axis"), ("int8", "axis")),
    ),
}


def resolve(fn: str, quant) -> Recipe | None:
    """``quant`` as a ``Recipe`` (a name from ``RECIPES`` or a ``Recipe``); ``None`` stays."""
    if quant is None or isinstance(quant, Recipe):
        return quant if quant is None else _check(quant)
    if isinstance(quant, str) and quant in RECIPES:
        return RECIPES[quant]
    raise ValueError(
        f"{fn}: `quant` must be None, a jaxlinear.Recipe or one of {sorted(RECIPES)}, got {quant!r}"
    )


# --------------------------------------------------------------------------------------
# Scales, quantize, dequantize.


def scale(a, fmt: str, axes=None):
    """The dynamic scale of ``a`` in ``fmt``: ``max|a| · r`` over ``axes`` (all if
    ``None``), kept as size-1 axes, float32, with ``r = 1 / fmt.max`` rounded to float32;
    1 where that is 0 or not finite (all-zero slices, inf/nan). Unscaled formats
    (bfloat16, float32): 1."""
    if fmt not in _SCALED:
        return jnp.ones((1,) * np.ndim(a), jnp.float32)
    amax = jnp.max(jnp.abs(a.astype(jnp.float32)), axis=axes, keepdims=True)
    s = amax * np.float32(1 / format_max(fmt))  # (XLA turns ÷ constant into × reciprocal)
    return jnp.where(jnp.isfinite(s) & (s > 0), s, jnp.float32(1))


def quantize(a, s, fmt: str):
    """``q = rne(clip(a / s, ±fmt.max))`` in ``FORMATS[fmt]`` (a plain cast if unscaled)."""
    if fmt not in _SCALED:
        return a.astype(FORMATS[fmt])
    m = jnp.float32(format_max(fmt))
    v = jnp.clip(a.astype(jnp.float32) / s, -m, m)
    if fmt == "int8":
        v = jnp.round(v)  # half to even
    return v.astype(FORMATS[fmt])


def dequantize(q, s):
    """``q · s`` in float32: the value ``q`` stands for."""
    return q.astype(jnp.float32) * s


def quantize_operand(a, op: Operand, kept=()):
    """``(q, s)``: ``a`` quantized with ``op``'s format; ``s`` reduced over every axis but
    ``kept`` (the axes the product keeps) when ``op.scaling == "axis"``, else over all."""
    keep = set(kept) if op.scaling == "axis" else set()
    axes = tuple(i for i in range(np.ndim(a)) if i not in keep)
    s = scale(a, op.format, axes)
    return quantize(a, s, op.format), s


def _on_result(s, amap, out_ndim):
    """A keepdims scale of an operand, laid out on the result's axes (``amap``: pairs
    ``(operand axis, result axis)`` of the kept axes); size 1 on every other axis."""
    pairs = sorted((oa, ra) for oa, ra in amap if s.shape[oa] != 1)  # in operand order
    vals = s.reshape([s.shape[oa] for oa, _ in pairs])
    order = sorted(range(len(pairs)), key=lambda i: pairs[i][1])  # into result order
    vals = vals.transpose(order) if len(pairs) > 1 else vals
    shape = [1] * out_ndim
    for oa, ra in pairs:
        shape[ra] = s.shape[oa]
    return vals.reshape(shape)


def _terms(a, a_map, b, b_map) -> int:
    """An upper bound on the terms summed into one result element: the elements of either
    operand per index of its kept axes."""
    return min(
        int(np.prod(t.shape, dtype=np.int64)) // max(1, int(np.prod([t.shape[i] for i, _ in m])))
        for t, m in ((a, a_map), (b, b_map))
    )


@functools.lru_cache(maxsize=256)
def _takes_mixed(fn, shapes, acc, params):
    """Whether ``fn`` takes operands of two different formats (``lax.dot_general`` does,
    ``lax.conv_general_dilated`` refuses): traced on shapes only, once per signature."""
    f = functools.partial(fn, preferred_element_type=acc, **dict(params))
    try:
        jax.eval_shape(f, *(jax.ShapeDtypeStruct(*sd) for sd in shapes))
    except (TypeError, ValueError):  # (jnp's TypePromotionError is a ValueError)
        return False
    return True


def apply(recipe: Recipe, which: str, fn, scale_axes, a, b, /, *args, **params):
    """One product of ``recipe`` (``which``: ``"forward"``, ``"grad_x"``, ``"grad_w"``),
    float32: the builder's hook. ``scale_axes``: the op's rule (``None``: per tensor)."""
    maps = ((), ()) if scale_axes is None else scale_axes(which, a.ndim, b.ndim, **params)
    return product(fn, a, b, getattr(recipe, which), maps, *args, **params)


def product(fn, a, b, spec: Product, maps, /, *args, **params):
    """``P(a, b) ≈ (s_a ⊗ s_b) ⊙ fn(q_a, q_b)`` in float32 (see the module docstring).

    Args:
      fn: the op's function for this product (``forward``, ``transpose_x`` or
        ``transpose_w``), called as ``fn(q_a, q_b, *args, preferred_element_type=acc,
        **params)`` (``args``: the operand solved for, for a transpose: only its shape
        is read).
      a, b: the operands, any floating dtype.
      spec: the ``Product`` of the recipe.
      maps: ``(a_map, b_map)``, each a tuple of ``(operand axis, result axis)`` pairs: the
        axes the product keeps (the op's ``scale_axes`` rule); ``()``: per tensor only.
    """
    a_map, b_map = maps
    for t in (a, b):
        if not jnp.issubdtype(t.dtype, jnp.floating):
            raise TypeError(
                f"quant: a recipe quantizes real floating operands, got {t.dtype} (shape"
                f" {tuple(t.shape)}); complex products have no fp8/int8 form here"
            )
    qa, sa = quantize_operand(a, spec.lhs, [i for i, _ in a_map])
    qb, sb = quantize_operand(b, spec.rhs, [i for i, _ in b_map])
    acc = jnp.dtype(spec.accumulation)
    if acc == jnp.int32 and _terms(a, a_map, b, b_map) * 127**2 >= 2**31:
        acc = jnp.dtype(jnp.float32)  # int32 could overflow: sum the exact products in float32
    if qa.dtype != qb.dtype:
        shapes = tuple((tuple(np.shape(t)), jnp.dtype(t.dtype)) for t in (qa, qb, *args))
        if not _takes_mixed(fn, shapes, acc, tuple(sorted(params.items()))):
            # Two formats where the op takes one dtype: both in a dtype that holds every
            # value of each exactly (bfloat16 for two fp8 formats), so the products agree.
            fp8 = all(t.dtype.itemsize == 1 and jnp.issubdtype(t.dtype, jnp.floating)
                      for t in (qa, qb))  # fmt: skip
            common = jnp.bfloat16 if fp8 else jnp.float32
            qa, qb = qa.astype(common), qb.astype(common)
    y = fn(qa, qb, *args, preferred_element_type=acc, **params)
    s = _on_result(sa, a_map, y.ndim) * _on_result(sb, b_map, y.ndim)
    return y.astype(jnp.float32) * s
