r"""Convolution ``y = conv(x, w)``: its forward map and its two transposes, written out.

``lax.conv_general_dilated`` is bilinear in ``(x, w)``. Ignoring the spatial axes it
is a matmul ``[m, j] [j, k] -> [m, k]`` (batch ``m``, in-features ``j``, out-features
``k``), and its two transposes are convolutions too:

* ``x̄ = conv(G, flip(w)ᵀ)``: the cotangent convolved with the spatially flipped kernel,
  in/out feature axes swapped; the window strides become input (lhs) dilation, the
  input dilation becomes the window strides, the kernel dilation stays; the padding
  before is ``k_dilated − 1 − pad_lo`` (``k_dilated = (k − 1)·rhs_dilation + 1``) and
  the padding after is what makes the result exactly as long as ``x``.
* ``w̄ = conv(x, G)``: a correlation of the input with the cotangent, ``x`` and ``G``
  read with their batch and feature axes swapped (batch becomes the contraction);
  window strides and kernel (rhs) dilation trade places; feature groups become batch
  groups and batch groups become feature groups.

``transpose_x`` and ``transpose_w`` below are those two formulas; each is one call of
``lax.conv_general_dilated`` with rearranged arguments (a transposed convolution *is*
a convolution). JAX's ``_conv_general_dilated_transpose_lhs`` / ``_rhs``
(``jax/_src/lax/convolution.py``) state the same rules for JAX's own autodiff.

Shapes follow ``dimension_numbers = (lhs_spec, rhs_spec, out_spec)`` in
``lax.ConvDimensionNumbers`` form: ``lhs_spec = (batch, feature, *spatial)`` axes of
``x``, ``rhs_spec = (out_feature, in_feature, *spatial)`` axes of ``w``, ``out_spec``
likewise for ``y``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from jaxlinear._src import ghost, vma
from jaxlinear._src.bilinear import BatchRule, bilinear_op
from jaxlinear._src.ops._checks import no_out_sharding, out_dtype, promoted
from jaxlinear._src.params import _SCHEMES, SCHEMES, Params, as_key, layout_of
from jaxlinear._src.quant import resolve
from jaxlinear._src.validation import (
    _dtype,
    canonical_compute_dtype,
    canonical_precision,
    layer_inputs,
    promoted_compute_dtype,
)


class ConvSpec(NamedTuple):
    """The static arguments of one convolution, canonical (explicit padding, tuples)."""

    window_strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    dimension_numbers: lax.ConvDimensionNumbers
    feature_group_count: int = 1
    batch_group_count: int = 1


def _dilated(size, dilation):
    """Length of an axis of ``size`` entries with ``dilation − 1`` zeros between neighbours."""
    return 0 if size == 0 else (size - 1) * dilation + 1


def _swap01(spec):
    """``(a, b, *rest) -> (b, a, *rest)``: read batch as feature and feature as batch."""
    return (spec[1], spec[0], *spec[2:])


def _split_axis(a, axis, groups):
    """``a`` with ``axis`` (size ``groups·n``) split into two axes ``(groups, n)``."""
    shape = list(a.shape)
    shape[axis : axis + 1] = [groups, shape[axis] // groups]
    return a.reshape(shape)


def _merge_axis(a, src, dst):
    """Drop axis ``src``, folding it into axis ``dst`` (numbered without it) as the major part."""
    a = jnp.moveaxis(a, src, dst)  # now src sits just before the axis it joins
    shape = list(a.shape)
    shape[dst : dst + 2] = [shape[dst] * shape[dst + 1]]
    return a.reshape(shape)


def _typed(a, *others):
    """Where ``a`` lives on a mesh whose shardings are types (Explicit axes), else ``None``.

    A transpose contracts the batch (``w̄``) or the output features (``x̄``); on such meshes
    ``lax`` must be told where the result lives: where the operand solved for does
    (replicated, if only ``others`` are on the mesh).
    """
    if vma._explicit_mesh(a) is not None:
        return vma._aval(a).sharding
    mesh = next((m for m in map(vma._explicit_mesh, others) if m is not None), None)
    return None if mesh is None else NamedSharding(mesh, PartitionSpec())


def forward(x, w, *, spec: ConvSpec, precision=None, preferred_element_type=None):
    """``y = conv(x, w)``: ``lax.conv_general_dilated`` with the arguments in ``spec``."""
    return lax.conv_general_dilated(
        x,
        w,
        spec.window_strides,
        spec.padding,
        spec.lhs_dilation,
        spec.rhs_dilation,
        spec.dimension_numbers,
        feature_group_count=spec.feature_group_count,
        batch_group_count=spec.batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def transpose_x(g, w, x_aval, *, spec: ConvSpec, precision=None, preferred_element_type=None):
    """``x̄ = conv(G, flip(w)ᵀ)``: the transpose of ``x -> conv(x, w)``, shaped like ``x``.

    Args:
      g: cotangent of ``y``, laid out by ``out_spec``.
      w: the kernel, laid out by ``rhs_spec``.
      x_aval: anything with ``x``'s ``.shape`` (its values are not read).
      spec: the forward convolution's static arguments.
      precision, preferred_element_type: passed to the convolution.

    Returns:
      ``x̄`` with ``x``'s shape (dtype: ``preferred_element_type`` or the operands').
    """
    lhs_spec, rhs_spec, out_spec = spec.dimension_numbers
    sdims = rhs_spec[2:]  # the kernel's spatial axes
    groups = max(spec.feature_group_count, spec.batch_group_count)  # at most one is > 1
    if groups > 1:
        # The group index lives in w's out-feature axis; in the transposed conv the kernel's
        # roles swap, so move it to the in-feature axis, where the swapped spec reads groups.
        w = _merge_axis(_split_axis(w, rhs_spec[0], groups), rhs_spec[0], rhs_spec[1])
    w = lax.rev(w, sdims)  # spatially flipped kernel
    k = [_dilated(w.shape[d], r) for d, r in zip(sdims, spec.rhs_dilation, strict=True)]
    n_in = [
        _dilated(x_aval.shape[d], r) for d, r in zip(lhs_spec[2:], spec.lhs_dilation, strict=True)
    ]
    n_out = [
        _dilated(g.shape[d], s) for d, s in zip(out_spec[2:], spec.window_strides, strict=True)
    ]
    before = [kd - 1 - lo for kd, (lo, _) in zip(k, spec.padding, strict=True)]
    # After-padding: the full correlation of the strided-dilated G with the kernel has
    # n_out + k − 1 entries; keep exactly n_in of them, starting at `before`.
    after = [ni + kd - 1 - no - b for ni, kd, no, b in zip(n_in, k, n_out, before, strict=True)]
    out = lax.conv_general_dilated(
        g,
        w,
        window_strides=spec.lhs_dilation,  # input dilation becomes the stride ...
        padding=tuple(zip(before, after, strict=True)),
        lhs_dilation=spec.window_strides,  # ... and the stride becomes input dilation
        rhs_dilation=spec.rhs_dilation,
        dimension_numbers=lax.ConvDimensionNumbers(out_spec, _swap01(rhs_spec), lhs_spec),
        feature_group_count=groups,
        batch_group_count=1,
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=None if spec.batch_group_count > 1 else _typed(x_aval, g, w),
    )
    if spec.batch_group_count > 1:
        # Batch groups came out as feature groups: move them back into x's batch axis.
        out = _merge_axis(
            _split_axis(out, lhs_spec[1], spec.batch_group_count), lhs_spec[1], lhs_spec[0]
        )
    return out


def transpose_w(g, x, w_aval, *, spec: ConvSpec, precision=None, preferred_element_type=None):
    """``w̄ = conv(x, G)``: the transpose of ``w -> conv(x, w)``, shaped like ``w``.

    Batch and feature axes of ``x``, ``G`` and ``w̄`` are read swapped, so the batch is
    contracted; strides and kernel dilation trade places; feature groups ↔ batch groups.

    Args:
      g: cotangent of ``y``, laid out by ``out_spec``.
      x: the input, laid out by ``lhs_spec``.
      w_aval: anything with ``w``'s ``.shape`` (its values are not read).
      spec: the forward convolution's static arguments.
      precision, preferred_element_type: passed to the convolution.

    Returns:
      ``w̄`` with ``w``'s shape.
    """
    lhs_spec, rhs_spec, out_spec = spec.dimension_numbers
    if np.size(g) == 0:  # nothing flows back; avoid a degenerate (zero-size) kernel
        return jnp.zeros(w_aval.shape, preferred_element_type or jnp.result_type(x, g))
    n_in = [_dilated(x.shape[d], r) for d, r in zip(lhs_spec[2:], spec.lhs_dilation, strict=True)]
    k = [_dilated(w_aval.shape[d], r) for d, r in zip(rhs_spec[2:], spec.rhs_dilation, strict=True)]
    n_out = [
        _dilated(g.shape[d], s) for d, s in zip(out_spec[2:], spec.window_strides, strict=True)
    ]
    lo = [p for p, _ in spec.padding]
    hi = [no - ni + kd - 1 - p for no, ni, kd, p in zip(n_out, n_in, k, lo, strict=True)]
    return lax.conv_general_dilated(
        x,
        g,
        window_strides=spec.rhs_dilation,  # kernel dilation becomes the stride ...
        padding=tuple(zip(lo, hi, strict=True)),
        lhs_dilation=spec.lhs_dilation,
        rhs_dilation=spec.window_strides,  # ... and the stride dilates G, now the kernel
        dimension_numbers=lax.ConvDimensionNumbers(
            _swap01(lhs_spec), _swap01(out_spec), _swap01(rhs_spec)
        ),
        feature_group_count=spec.batch_group_count,  # batch groups ↔ feature groups
        batch_group_count=spec.feature_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=_typed(w_aval, g, x),
    )


def _patches(x, kernel, out, spec: ConvSpec):
    """Example by example, the input patches ``U: (n, T, K, C_in)`` of the convolution: row ``t``
    of ``U[i]`` holds, for each of the ``K = prod(kernel)`` kernel offsets (row-major), the
    ``C_in`` input channels that offset meets at output position ``t`` (``T = prod(out)``).

    Formed by slicing: ``x`` padded (and input-dilated: ``lax.pad``'s interior padding)
    once, then one strided slice per offset, stacked. ``lax.conv_general_dilated_patches``
    forms the same entries as a convolution with a one-hot kernel (``feature_group_count =
    C_in``), which XLA:CPU ran 1.4–3× slower than these copies on the bench CNN's layers.
    """
    lhs_spec = spec.dimension_numbers[0]
    x = jnp.transpose(x, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))  # (n, *spatial, C_in)
    dilated = zip(spec.padding, spec.lhs_dilation, strict=True)
    x = lax.pad(
        x,
        jnp.zeros((), x.dtype),
        [(0, 0, 0), *((lo, hi, r - 1) for (lo, hi), r in dilated), (0, 0, 0)],
    )
    strides = (1, *spec.window_strides, 1)
    pieces = []
    for offset in np.ndindex(*kernel):
        start = [j * r for j, r in zip(offset, spec.rhs_dilation, strict=True)]
        span = [(o - 1) * s + 1 if o else 0 for o, s in zip(out, spec.window_strides, strict=True)]
        limit = [a + b for a, b in zip(start, span, strict=True)]
        pieces.append(lax.slice(x, (0, *start, 0), (x.shape[0], *limit, x.shape[-1]), strides))
    u = jnp.stack(pieces, axis=-2)  # (n, *out, K, C_in)
    return u.reshape(x.shape[0], int(np.prod(out, dtype=int)), len(pieces), x.shape[-1])


class _Rows(NamedTuple):
    """Sizes of one convolution's per-example products ``w̄_i = U_iᵀ G_i``, group by group."""

    kernel: list  # the kernel's spatial sizes
    out: list  # y's spatial sizes
    T: int  # output positions
    K: int  # kernel offsets
    c: int  # input channels per group
    d: int  # patch length: K·c
    p: int  # output channels per group


def _rows_of(x, g, w_aval, spec: ConvSpec) -> _Rows:
    lhs_spec, rhs_spec, out_spec = spec.dimension_numbers
    kernel = [w_aval.shape[a] for a in rhs_spec[2:]]
    out = [g.shape[a] for a in out_spec[2:]]
    c = x.shape[lhs_spec[1]] // spec.feature_group_count
    p = g.shape[out_spec[1]] // spec.feature_group_count
    T, K = int(np.prod(out, dtype=int)), int(np.prod(kernel, dtype=int))
    return _Rows(kernel, out, T, K, c, K * c, p)


def _matrices(x, g, r: _Rows, spec: ConvSpec):
    """A block of ``k`` examples' patches ``U: (k, groups, T, d)`` and ``G: (k, groups, T, p)``."""
    out_spec, groups = spec.dimension_numbers[2], spec.feature_group_count
    k = g.shape[out_spec[0]]
    U = _patches(x, r.kernel, r.out, spec).reshape(k, r.T, r.K, groups, r.c)
    G = jnp.transpose(g, (out_spec[0], *out_spec[2:], out_spec[1])).reshape(k, r.T, groups, r.p)
    if groups > 1:  # (k, groups, T, ·): the groups are independent products
        U, G = U.transpose(0, 3, 1, 2, 4), G.transpose(0, 2, 1, 3)
    return U.reshape(k, groups, r.T, r.d), G.reshape(k, groups, r.T, r.p)


def _w_layout(w_bars, r: _Rows, spec: ConvSpec):
    """``(..., groups, d, p)`` products -> ``(..., *w.shape)`` in ``w``'s layout."""
    rhs_spec, groups = spec.dimension_numbers[1], spec.feature_group_count
    lead = w_bars.shape[:-3]
    w_bars = w_bars.reshape(*lead, groups, *r.kernel, r.c, r.p)  # d = (*kernel, c)
    if groups > 1:
        w_bars = jnp.moveaxis(w_bars, len(lead), -2)  # (..., *kernel, c, groups, p)
    w_bars = w_bars.reshape(*lead, *r.kernel, r.c, groups * r.p)
    axes = [*rhs_spec[2:], rhs_spec[1], rhs_spec[0]]  # the axis of w each axis above is
    m = len(lead)
    return w_bars.transpose(*range(m), *(m + axes.index(a) for a in range(len(axes))))


def _per_example(x, g, w_aval, *, y_axis, preferred_element_type, spec: ConvSpec, precision=None):
    r"""Per-example ``w̄_i = U_iᵀ G_i`` from example ``i``'s input patches ``U_i: (T, d)``
    (``_patches``; ``T`` output positions, ``d = K·C_in/groups`` for ``K`` kernel offsets)
    and ``G_i: (T, p)`` (``p = C_out/groups``), group by group:

    - ``"gram"`` when ``gram_pays(T, d, p)``: ``Σ_groups ⟨U_i U_iᵀ, G_i G_iᵀ⟩``, no ``w̄_i`` formed;
    - else ``"per_example"``: the ``w̄_i`` as one batched matrix product over the examples
      (not ``jax.vmap`` of the transpose: XLA:CPU's partitioner miscomputes that batched
      convolution when the examples are sharded, see docs/DESIGN.md), squared and summed.

    Patches (``K`` times ``x``'s size) and ``w̄_i`` are formed for a block of examples
    at a time (``ghost.in_blocks``). ``w̄_i`` are returned for the clipped sum where
    ``ghost.keeps`` allows twice the layer's ``|x| + |g|`` for them: keeping saves a second
    pass over the patches (``_per_example_sum``, as dear as this one) at ``n·|w|`` of
    memory (the bench CNN's third conv, ``n·|w|`` 1.1 times its ``|x| + |g|``, is kept; its
    fourth, 3 times, is not).

    Declined for batch groups (``w̄_i`` then mixes examples' channels): the generic route.
    """
    del y_axis  # out_spec[0]: the examples are the batch axis
    lhs_spec, _, out_spec = spec.dimension_numbers
    if spec.batch_group_count != 1:
        return None
    r, groups = _rows_of(x, g, w_aval, spec), spec.feature_group_count
    gram = r.T == 1 or ghost.gram_pays(r.T, r.d, r.p)

    def sq_norms(x, g):  # a block of k examples -> (k,)
        U, G = _matrices(x, g, r, spec)
        k = U.shape[0]
        if gram:
            U, G = U.reshape(k * groups, r.T, r.d), G.reshape(k * groups, r.T, r.p)
            return ghost.matmul_sq_norms(U, G)[1].reshape(k, groups).sum(axis=1)
        w_bars = jnp.einsum("ngtd,ngtp->ngdp", U, G, precision=precision)  # (k, groups, d, p)
        sq = jnp.sum(w_bars**2, axis=(1, 2, 3))
        return (sq, _w_layout(w_bars, r, spec)) if keep else sq

    n, size = x.shape[lhs_spec[0]], int(np.prod(w_aval.shape))
    keep = not gram and ghost.keeps(n, size, 2 * (x.size + g.size))
    per_example = groups * r.T * (r.d + (2 * r.T if gram else r.p)) + (0 if gram else size)
    got = ghost.in_blocks(sq_norms, [x, g], [lhs_spec[0], out_spec[0]], per_example)
    route = "rank_one" if r.T == 1 else "gram" if gram else "per_example"
    return (route, *got) if keep else (route, got)


def _per_example_sum(x, g, w_aval, *, preferred_element_type, spec: ConvSpec, precision=None):
    """``w̄ = Σ_i U_iᵀ G_i = B_wᵀ(g; x)`` the per-example rule's way: patches of a block of
    examples at a time (``ghost.summed_in_blocks``), one matrix product per block. The
    clipped sum ``B_wᵀ(c ⊙ g; x)`` where the rule kept no ``w̄_i``: XLA:CPU ran
    ``transpose_w``'s convolution (batch as features, with transposed copies of ``x`` and
    ``g``) about twice as long on the bench CNN's layers. ``None`` for batch groups."""
    lhs_spec, _, out_spec = spec.dimension_numbers
    if spec.batch_group_count != 1:
        return None
    r = _rows_of(x, g, w_aval, spec)

    def block(x, g):  # a block of examples -> (groups, d, p)
        U, G = _matrices(x, g, r, spec)
        return jnp.einsum("ngtd,ngtp->gdp", U, G, precision=precision,
                          preferred_element_type=preferred_element_type)  # fmt: skip

    per_example = spec.feature_group_count * r.T * (r.d + r.p)
    w_bar = ghost.summed_in_blocks(block, [x, g], [lhs_spec[0], out_spec[0]], per_example)
    return _w_layout(w_bar, r, spec)


def batch(x_ndim, w_ndim, x_batched, w_batched, *, axis_size, spec: ConvSpec, **_):
    """vmap: the vmapped axis (at 0) folded into a batch or feature axis, one convolution.

    As JAX's ``_conv_general_dilated_batch_rule`` (``jax/_src/lax/convolution.py``):

    * ``x`` batched: into ``x``'s batch axis (inside each batch group, if any); it comes
      out of ``y``'s batch axis.
    * ``w`` batched: into ``w``'s out-feature axis (inside each group, if any); it comes
      out of ``y``'s feature axis.
    * both: ``x``'s into its feature axis and ``feature_group_count × B`` (or its batch
      axis and ``batch_group_count × B``), ``w``'s into its out-feature axis: example
      ``i`` is group ``i`` (of ``B`` groups of groups); it comes out of ``y``'s features.

    Every fold puts the vmapped axis outside (major to) the axis it joins.
    """
    del x_ndim, w_ndim
    lhs_spec, rhs_spec, out_spec = spec.dimension_numbers
    fgc, bgc = spec.feature_group_count, spec.batch_group_count
    n = axis_size

    def unfold(axis):  # y: (..., n·k at axis, ...) -> (..., n, k, ...)
        return lambda y, size: _split_axis(y, axis, size)

    def fold_inside_groups(axis, groups):
        # a: (n, ..., G·k at axis + 1, ...) -> (..., G·n·k at axis, ...): each group keeps
        # its block, with the n examples inside it.
        def fold(a):
            a = _merge_axis(_split_axis(a, axis + 1, groups), 0, axis + 1)  # (.., G, n·k, ..)
            return _merge_axis(a, axis, axis)

        return fold

    if x_batched and w_batched:
        if bgc > 1:
            x_fold, new = lhs_spec[0], spec._replace(batch_group_count=bgc * n)
        else:
            x_fold, new = lhs_spec[1], spec._replace(feature_group_count=fgc * n)
        return BatchRule(
            {"spec": new},
            out_spec[1],
            x=lambda a: _merge_axis(a, 0, x_fold),
            w=lambda a: _merge_axis(a, 0, rhs_spec[0]),
            out=unfold(out_spec[1]),
        )
    if x_batched:
        fold = (
            (lambda a: _merge_axis(a, 0, lhs_spec[0]))
            if bgc == 1
            else fold_inside_groups(lhs_spec[0], bgc)
        )
        return BatchRule({}, out_spec[0], x=fold, out=unfold(out_spec[0]))
    groups = max(fgc, bgc)
    if groups == 1:
        fold, out = (lambda a: _merge_axis(a, 0, rhs_spec[0])), unfold(out_spec[1])
    else:
        fold = fold_inside_groups(rhs_spec[0], groups)

        def out(y, size):  # (.., G·n·k, ..) -> (.., G, n, k, ..) -> (.., n, G·k, ..)
            y = _split_axis(_split_axis(y, out_spec[1], groups), out_spec[1] + 1, size)
            return _merge_axis(y, out_spec[1], out_spec[1] + 1)

    return BatchRule({}, out_spec[1], w=fold, out=out)


def scale_axes(product, a_ndim, b_ndim, *, spec: ConvSpec, **_):
    """Quantization: the axes each product carries straight through to its result.

    ``y``: ``x``'s batch axis (per example) and ``w``'s out-features; ``x̄``: ``g``'s batch
    and ``w``'s in-features; ``w̄``: ``g``'s features and ``x``'s. Spatial axes are windows
    (per tensor along them); a grouped in-feature axis and batch groups are per tensor.
    """
    del a_ndim, b_ndim
    lhs_spec, rhs_spec, out_spec = spec.dimension_numbers
    plain = spec.feature_group_count == 1 and spec.batch_group_count == 1
    batch_ok = spec.batch_group_count == 1
    if product == "forward":  # (x, w) -> y
        return ((lhs_spec[0], out_spec[0]),) * batch_ok, ((rhs_spec[0], out_spec[1]),)
    if product == "grad_x":  # (g, w) -> x̄
        return ((out_spec[0], lhs_spec[0]),) * batch_ok, ((rhs_spec[1], lhs_spec[1]),) * plain
    return ((out_spec[1], rhs_spec[0]),), ((lhs_spec[1], rhs_spec[1]),) * plain  # (g, x) -> w̄


CONV = bilinear_op(
    "conv",
    forward,
    transpose_x,
    transpose_w,
    batch=batch,
    per_example=_per_example,
    per_example_sum=_per_example_sum,
    scale_axes=scale_axes,
)


# --------------------------------------------------------------------------------------
# Validation: one check per mistake, at trace time, naming the function and the argument.
# `names` maps the lax argument names to the ones the caller's signature uses.

_LAX_NAMES = {
    "lhs": "lhs",
    "rhs": "rhs",
    "window_strides": "window_strides",
    "lhs_dilation": "lhs_dilation",
    "rhs_dilation": "rhs_dilation",
    "feature_group_count": "feature_group_count",
}
_PADDINGS = ("SAME", "VALID", "SAME_LOWER")


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_count(fn, name, value):
    if not _is_int(value) or value < 1:
        raise ValueError(f"{fn}: `{name}` must be a positive int, got {value!r}")
    return int(value)


def _check_window(fn, name, value, n, default=None):
    """A tuple of ``n`` positive ints (``value=None`` gives ``default``; ``n=None``: any)."""
    if value is None and default is not None:
        return (default,) * n
    try:
        values = tuple(value)
    except TypeError:
        values = None
    if (
        values is None
        or len(values) != (len(values) if n is None else n)
        or not all(_is_int(v) and v >= 1 for v in values)
    ):
        count = "" if n is None else f"{n} "
        raise ValueError(
            f"{fn}: `{name}` must be a sequence of {count}positive ints (one per spatial axis),"
            f" got {value!r}"
        )
    return tuple(int(v) for v in values)


def _check_dimension_numbers(fn, dimension_numbers, lhs_shape, rhs_shape):
    """``dimension_numbers`` as a ``ConvDimensionNumbers`` of permutations of the axes."""
    ndim = len(lhs_shape)
    dn = dimension_numbers
    if dn is None or isinstance(dn, lax.ConvDimensionNumbers):
        specs = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dn)
        for name, spec in zip(("lhs_spec", "rhs_spec", "out_spec"), specs, strict=True):
            if sorted(spec) != list(range(ndim)):
                raise ValueError(
                    f"{fn}: `dimension_numbers.{name}` must be a permutation of the {ndim} axes"
                    f" (batch/feature first, then spatial), got {spec}"
                )
        return specs
    roles = (("lhs", "NC"), ("rhs", "OI"), ("out", "NC"))
    if not isinstance(dn, (tuple, list)) or len(dn) != 3 or not all(isinstance(s, str) for s in dn):
        raise ValueError(
            f"{fn}: `dimension_numbers` must be None, a lax.ConvDimensionNumbers or three"
            f" strings such as ('NHWC', 'HWIO', 'NHWC'), got {dn!r}"
        )
    spatial = None
    for s, (role, pair) in zip(dn, roles, strict=True):
        if len(s) != ndim:
            raise ValueError(
                f"{fn}: `dimension_numbers` {role} string {s!r} has {len(s)} letters but the"
                f" operands have {ndim} axes"
            )
        if len(set(s)) != len(s) or not all(s.count(c) == 1 for c in pair):
            raise ValueError(
                f"{fn}: `dimension_numbers` {role} string {s!r} must name each axis once,"
                f" with '{pair[0]}' and '{pair[1]}' exactly once"
            )
        rest = set(s) - set(pair)
        if spatial is not None and rest != spatial:
            raise ValueError(
                f"{fn}: `dimension_numbers` strings {tuple(dn)} must share the same spatial letters"
            )
        spatial = rest
    return lax.conv_dimension_numbers(lhs_shape, rhs_shape, tuple(dn))


def _check_padding(fn, padding, n):
    if isinstance(padding, str):
        if padding.upper() not in _PADDINGS:
            raise ValueError(
                f"{fn}: `padding` must be one of {_PADDINGS} or {n} (lo, hi) pairs, got {padding!r}"
            )
        return padding.upper()
    try:
        pairs = tuple(tuple(p) for p in padding)
    except TypeError:
        pairs = None
    if (
        pairs is None
        or len(pairs) != n
        or not all(len(p) == 2 and all(map(_is_int, p)) for p in pairs)
    ):
        raise ValueError(
            f"{fn}: `padding` must be one of {_PADDINGS} or {n} (lo, hi) int pairs (one per"
            f" spatial axis), got {padding!r}"
        )
    return tuple((int(lo), int(hi)) for lo, hi in pairs)


def _conv_spec(
    fn,
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation,
    rhs_dilation,
    dimension_numbers,
    feature_group_count,
    batch_group_count,
    compute_dtype=None,
    names=_LAX_NAMES,
) -> ConvSpec:
    """Check every argument of ``conv_general_dilated``; return them canonical (hashable)."""
    x_name, w_name = names["lhs"], names["rhs"]
    x_dtype, w_dtype = _dtype(fn, x_name, lhs), _dtype(fn, w_name, rhs)
    x_shape, w_shape = tuple(lhs.shape), tuple(rhs.shape)
    if len(x_shape) < 2:  # no spatial axis (a "0-D" convolution, a matmul) is allowed
        raise ValueError(
            f"{fn}: `{x_name}` must have a batch and a feature axis (then any spatial axes),"
            f" got shape {x_shape}"
        )
    if len(w_shape) != len(x_shape):
        raise ValueError(
            f"{fn}: `{w_name}` must have rank {len(x_shape)} like `{x_name}` (shape {x_shape}),"
            f" got shape {w_shape}"
        )
    n = len(x_shape) - 2
    lhs_spec, rhs_spec, out_spec = _check_dimension_numbers(fn, dimension_numbers, x_shape, w_shape)
    fgc = _check_count(fn, names["feature_group_count"], feature_group_count)
    bgc = _check_count(fn, "batch_group_count", batch_group_count)
    if fgc > 1 and bgc > 1:
        raise ValueError(
            f"{fn}: at most one of `{names['feature_group_count']}` ({fgc}) and"
            f" `batch_group_count` ({bgc}) may be greater than 1"
        )
    c_in, k_in, k_out = x_shape[lhs_spec[1]], w_shape[rhs_spec[1]], w_shape[rhs_spec[0]]
    if c_in % fgc:
        raise ValueError(
            f"{fn}: `{x_name}` has {c_in} input channels (shape {x_shape}), not divisible by"
            f" `{names['feature_group_count']}`={fgc}"
        )
    if k_in * fgc != c_in:
        raise ValueError(
            f"{fn}: `{w_name}` (shape {w_shape}) takes {k_in} input channels per group × {fgc}"
            f" group(s) = {k_in * fgc}, but `{x_name}` has {c_in} (shape {x_shape})"
        )
    for groups, name in ((fgc, names["feature_group_count"]), (bgc, "batch_group_count")):
        if k_out % groups:
            raise ValueError(
                f"{fn}: `{w_name}` has {k_out} output channels (shape {w_shape}), not divisible"
                f" by `{name}`={groups}"
            )
    if x_shape[lhs_spec[0]] % bgc:
        raise ValueError(
            f"{fn}: `{x_name}` has batch size {x_shape[lhs_spec[0]]} (shape {x_shape}), not"
            f" divisible by `batch_group_count`={bgc}"
        )
    strides = _check_window(fn, names["window_strides"], window_strides, n)
    lhs_dil = _check_window(fn, names["lhs_dilation"], lhs_dilation, n, default=1)
    rhs_dil = _check_window(fn, names["rhs_dilation"], rhs_dilation, n, default=1)
    padding = _check_padding(fn, padding, n)
    if isinstance(padding, str):
        if lhs_dil != (1,) * n:
            raise ValueError(
                f"{fn}: `padding`={padding!r} is not defined with `{names['lhs_dilation']}`="
                f"{lhs_dil}; give explicit (lo, hi) pairs"
            )
        k_eff = [_dilated(w_shape[d], r) for d, r in zip(rhs_spec[2:], rhs_dil, strict=True)]
        padding = tuple(
            (int(lo), int(hi))
            for lo, hi in lax.padtype_to_pads(
                [x_shape[d] for d in lhs_spec[2:]], k_eff, strides, padding
            )
        )
    if jnp.issubdtype(x_dtype, jnp.complexfloating) != jnp.issubdtype(w_dtype, jnp.complexfloating):
        promoted(fn, {x_name: lhs, w_name: rhs})  # refuses complex with real, naming both
    dn = lax.ConvDimensionNumbers(tuple(lhs_spec), tuple(rhs_spec), tuple(out_spec))
    return ConvSpec(strides, padding, lhs_dil, rhs_dil, dn, fgc, bgc)


# --------------------------------------------------------------------------------------
# The lax drop-ins.


def _lax_prepare(fn, lhs, rhs, args, precision, preferred_element_type, out_sharding):
    """Validate the ``lax`` signature's arguments; return ``(lhs, rhs, params, out_dtype)``."""
    no_out_sharding(fn, out_sharding)
    p, lhs = layer_inputs(Params(rhs), lhs)
    spec = _conv_spec(fn, lhs, p.W, *args)
    params = dict(spec=spec, precision=canonical_precision(precision))
    return lhs, p.W, params, out_dtype(fn, preferred_element_type)


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
    out_sharding=None,
    *,
    quant=None,
):
    r"""``lax.conv_general_dilated`` with its two transposes written out (``custom_vjp``).

    Same arguments and result as ``jax.lax.conv_general_dilated``; ``jax.grad`` and
    ``jax.vjp`` run ``transpose_x`` (the flipped-kernel convolution of ``G``) and
    ``transpose_w`` (the correlation of ``x`` with ``G``). Reverse mode only: for
    ``jvp``/``jacfwd``/``linear_transpose`` use ``dual_conv_general_dilated``. A drop-in
    for Flax: ``nnx.Conv(..., conv_general_dilated=jaxlinear.conv_general_dilated)``.

        x̄ = conv(G, flip(w)ᵀ),   w̄ = conv(xᵀ, Gᵀ)

    Args:
      lhs: the input, e.g. ``(N, C, H, W)`` (or as ``dimension_numbers`` says); zero
        spatial axes, ``(N, C)``, make a grouped matmul, as in ``lax``.
      rhs: the kernel, e.g. ``(O, I, kH, kW)``, ``I = C / feature_group_count``.
      window_strides: one positive int per spatial axis.
      padding: ``"SAME"``, ``"VALID"``, ``"SAME_LOWER"`` or ``(lo, hi)`` pairs.
      lhs_dilation: input dilation, one int per spatial axis (``None``: 1).
      rhs_dilation: kernel dilation, one int per spatial axis (``None``: 1).
      dimension_numbers: ``None`` (``NCHW, OIHW, NCHW``), three strings such as
        ``("NHWC", "HWIO", "NHWC")``, or a ``lax.ConvDimensionNumbers``.
      feature_group_count: feature groups, as in ``lax``.
      batch_group_count: batch groups, as in ``lax``; at most one of the two above 1.
      precision: passed to every convolution (forward and both transposes).
      preferred_element_type: dtype of the result (accumulation happens in it).
      out_sharding: accepted for Flax's sake; must be ``None``.
      quant: ``None`` (default), a recipe name (``"fp8_hybrid"``, ``"fp8_rowwise"``,
        ``"int8"``) or a ``jaxlinear.Recipe``: the forward product and both transposes in
        low precision with dynamic scales (see ``docs/guides/quantization.md``).

    Returns:
      The convolution, laid out by ``dimension_numbers``'s output spec.

    Raises:
      ValueError: wrong ranks, malformed dimension numbers, strides, dilations, padding or
        group counts, channel counts that do not match.
      TypeError: non-floating operands, complex and real operands mixed (operands of
        other different dtypes are promoted, as ``jnp.result_type``; ``lax`` refuses them).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> x, w = jnp.array([[[1., 2., 3., 4.]]]), jnp.array([[[1., -1.]]])  # (N, C, W), (O, I, W)
      >>> jaxlinear.conv_general_dilated(x, w, (1,), "VALID").tolist()
      [[[-1.0, -1.0, -1.0]]]
      >>> f = lambda x: jaxlinear.conv_general_dilated(x, w, (1,), "VALID").sum()
      >>> jax.grad(f)(x).tolist()
      [[[1.0, 0.0, 0.0, -1.0]]]
    """
    fn = "conv_general_dilated"
    args = (window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers)
    lhs, rhs, params, y_dtype = _lax_prepare(
        fn,
        lhs,
        rhs,
        (*args, feature_group_count, batch_group_count),
        precision,
        preferred_element_type,
        out_sharding,
    )
    quant = resolve(fn, quant)
    return CONV.custom_vjp(lhs, rhs, out_dtype=y_dtype, quant=quant, **params)


def dual_conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
    out_sharding=None,
    *,
    quant=None,
):
    r"""``conv_general_dilated`` with an explicit JVP *and* explicit transposes (a primitive).

    Same arguments, result and validation as ``conv_general_dilated``. The JVP is
    ``conv(ẋ, w) + conv(x, ẇ)``, transposed by the same ``transpose_x``/``transpose_w``,
    so every transform composes: ``jvp``, ``jacfwd``, ``hessian``, ``linear_transpose``
    in either operand, ``grad``, ``vmap``, ``jit``, ``shard_map``.

    Args:
      lhs: as in ``conv_general_dilated``.
      rhs: as in ``conv_general_dilated``.
      window_strides: as in ``conv_general_dilated``.
      padding: as in ``conv_general_dilated``.
      lhs_dilation: as in ``conv_general_dilated``.
      rhs_dilation: as in ``conv_general_dilated``.
      dimension_numbers: as in ``conv_general_dilated``.
      feature_group_count: as in ``conv_general_dilated``.
      batch_group_count: as in ``conv_general_dilated``.
      precision: as in ``conv_general_dilated``.
      preferred_element_type: as in ``conv_general_dilated``.
      out_sharding: as in ``conv_general_dilated``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> x, w = jnp.array([[[1., 2., 3., 4.]]]), jnp.array([[[1., -1.]]])
      >>> f = lambda w: jaxlinear.dual_conv_general_dilated(x, w, (1,), "VALID")
      >>> jax.jvp(f, (w,), (jnp.array([[[1., 0.]]]),))[1].tolist()
      [[[1.0, 2.0, 3.0]]]
    """
    fn = "dual_conv_general_dilated"
    args = (window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers)
    lhs, rhs, params, y_dtype = _lax_prepare(
        fn,
        lhs,
        rhs,
        (*args, feature_group_count, batch_group_count),
        precision,
        preferred_element_type,
        out_sharding,
    )
    quant = resolve("dual_conv_general_dilated", quant)
    return CONV.dual(lhs, rhs, out_dtype=y_dtype, quant=quant, **params)


# --------------------------------------------------------------------------------------
# The layer, in jaxlinear's functional style: channels last, Params(W, b).

_LAYER_NAMES = {
    "lhs": "x",
    "rhs": "W",
    "window_strides": "strides",
    "lhs_dilation": "lhs_dilation",
    "rhs_dilation": "dilation",
    "feature_group_count": "groups",
}


def _channels_last(n):
    """``(N, *spatial, C)``, ``(*kernel, I, O)``, ``(N, *spatial, C)`` as dimension numbers."""
    lhs = (0, n + 1, *range(1, n + 1))
    return lax.ConvDimensionNumbers(lhs, (n + 1, n, *range(n)), lhs)


def _per_axis(value, n):
    """A positive int repeated once per spatial axis; anything else as given (checked later)."""
    return (value,) * n if _is_int(value) and value >= 1 else value


_LAYOUTS = "x: (N, *spatial, C_in), W: (*kernel, C_in/groups, C_out)"


def _alias(fn, name, value, flax_name, flax_value):
    """``value``, or its Flax-named twin ``flax_value`` (one of the two, not both)."""
    if flax_value is None:
        return value
    if value is not None:
        raise TypeError(
            f"{fn}: pass `{name}` or its Flax name `{flax_name}`, not both (got {name}={value!r},"
            f" {flax_name}={flax_value!r})"
        )
    return flax_value


def _flax_padding(fn, padding, n):
    """Flax's padding forms as ``(lo, hi)`` pairs: an int ``p`` is ``(p, p)`` on every spatial
    axis; a sequence of ``n`` entries, each an int ``p`` (``(p, p)``) or a pair. Strings pass."""
    if isinstance(padding, str):
        return padding
    if _is_int(padding):
        return ((int(padding), int(padding)),) * n
    try:
        entries = tuple(padding)
    except TypeError:
        entries = ()

    def pair(p):
        if _is_int(p):
            return (int(p), int(p))
        try:
            lo, hi = p
        except (TypeError, ValueError):
            return None
        return (int(lo), int(hi)) if _is_int(lo) and _is_int(hi) else None

    pairs = tuple(map(pair, entries))
    if len(pairs) != n or None in pairs:
        raise ValueError(
            f"{fn}: `padding` must be one of {_PADDINGS}, an int p (p on both sides of every"
            f" spatial axis, as in Flax) or {n} entries (one per spatial axis), each an int or a"
            f" (lo, hi) pair; got {padding!r}"
        )
    return pairs


def _check_layout(fn, x, W, groups):
    """``(n, groups)``: the number of spatial axes and the feature groups (inferred from the
    shapes if ``None``), with a message naming the channels-last layouts (and PyTorch's
    conversion) when ``x`` or ``W`` does not fit them."""
    _dtype(fn, "x", x), _dtype(fn, "W", W)
    x_shape, w_shape = tuple(x.shape), tuple(W.shape)
    if not 3 <= len(w_shape) <= 5:
        raise ValueError(
            f"{fn}: `W` must be (*kernel, C_in/groups, C_out) with 1 to 3 kernel axes, got shape"
            f" {w_shape}"
        )
    n = len(w_shape) - 2
    if len(x_shape) == n + 1:
        raise ValueError(
            f"{fn}: `x` (shape {x_shape}) has no batch axis: expected {_LAYOUTS}, with {n} spatial"
            f" axes for `W` of shape {w_shape}; for a single example pass x[None]"
        )
    if len(x_shape) != n + 2:
        raise ValueError(
            f"{fn}: `x` must have rank {n + 2} for `W` of shape {w_shape} ({n} kernel axes):"
            f" expected {_LAYOUTS}, got shape {x_shape}"
        )
    c_in, k_in, c_out = x_shape[-1], w_shape[-2], w_shape[-1]

    def fits(c, k):  # c channels, k per group
        return k > 0 and c % k == 0

    if k_in == 0 or (groups is not None and fits(c_in, k_in)):
        return n, 1 if groups is None else groups  # _conv_spec checks the counts
    if fits(c_in, k_in) and fits(c_out, c_in // k_in):
        return n, c_in // k_in
    if fits(c_in, k_in):
        why = (
            f"C_in={c_in} over `W`'s {k_in} input channels per group gives groups="
            f"{c_in // k_in}, which does not divide `W`'s C_out={c_out}"
        )
    else:
        why = f"C_in={c_in} is not a multiple of `W`'s {k_in} input channels per group"
    hints = []
    if fits(x_shape[1], k_in) or fits(x_shape[1], w_shape[1]):
        perm = ", ".join(map(str, (0, *range(2, n + 2), 1)))
        hints.append(f"if `x` is channels-first (N, C_in, *spatial), use x.transpose({perm})")
    if fits(c_in, w_shape[1]) or fits(x_shape[1], w_shape[1]):
        perm = ", ".join(map(str, (*range(2, n + 2), 1, 0)))
        hints.append(
            "if `W` is PyTorch's (C_out, C_in/groups, *kernel) layout, use"
            f" W = w_torch.transpose({perm})"
        )
    raise ValueError(
        f"{fn}: `x` (shape {x_shape}) and `W` (shape {w_shape}) do not fit the channels-last"
        f" layouts {_LAYOUTS}: {why}" + "".join(f"; {h}" for h in hints)
    )


def _layer_prepare(fn, params, x, options, precision, compute_dtype):
    """Validate the layer's arguments; ``options``: strides, padding and the keywords that
    have Flax twins (dilation / kernel_dilation, groups / feature_group_count)."""
    strides, padding, dilation, kernel_dilation, groups, feature_group_count = options
    compute_dtype = canonical_compute_dtype(fn, compute_dtype)
    layout = layout_of(fn, params)
    params, x = layer_inputs(params, x)
    W, b = layout.unpack(params)
    dilation = _alias(fn, "dilation", dilation, "kernel_dilation", kernel_dilation)
    groups = _alias(fn, "groups", groups, "feature_group_count", feature_group_count)
    n, groups = _check_layout(fn, x, W, groups)
    spec = _conv_spec(
        fn,
        x,
        W,
        _per_axis(strides, n),
        _flax_padding(fn, padding, n),
        None,
        _per_axis(1 if dilation is None else dilation, n),
        _channels_last(n),
        groups,
        1,
        compute_dtype,
        names=_LAYER_NAMES,
    )
    if b is not None:
        c_out = W.shape[-1]
        if tuple(b.shape) != (c_out,):
            raise ValueError(
                f"{fn}: `b` must have shape ({c_out},) for `W` of shape"
                f" {tuple(W.shape)}, got {tuple(b.shape)}"
            )
        promoted(fn, {"x": x, "W": W, "b": b})  # refuses complex with real, naming them
    compute_dtype = promoted_compute_dtype(layout, params, x, compute_dtype)  # as x * W + b
    kw = dict(compute_dtype=compute_dtype, spec=spec, precision=canonical_precision(precision))
    return x, W, b, kw


def conv(
    params,
    x,
    *,
    strides=1,
    padding="SAME",
    dilation=None,
    groups=None,
    precision=None,
    compute_dtype=None,
    kernel_dilation=None,
    feature_group_count=None,
    quant=None,
):
    r"""Convolution layer ``Y = conv(X, W) + b``, channels last, with explicit transposes.

        Y[n, p, o] = Σ_{k, i} X[n, s·p + d·k − pad, g(o)·I + i] · W[k, i, o] + b[o]

    A ``jax.custom_vjp`` (reverse mode: ``grad``, ``vjp``, ``jacrev``, ``vmap``, ``jit``);
    ``dual_conv`` also has forward mode. Mixed precision as in ``linear``. Flax's argument
    forms are accepted: an int ``padding``, ``kernel_dilation`` and ``feature_group_count``.

    Args:
      params: ``Params(W, b)`` or ``{"W", "b"}``; ``W: (*kernel, C_in / groups, C_out)``,
        ``b: (C_out,)`` or ``None``. (PyTorch's ``(C_out, C_in / groups, *kernel)``:
        ``W = w_torch.transpose(2, 3, 1, 0)`` for 2-D.)
      x: ``(N, *spatial, C_in)``, 1 to 3 spatial axes (as many as ``W`` has kernel axes);
        channels last (NCHW input: ``x.transpose(0, 2, 3, 1)`` for 2-D).
      strides: an int or one int per spatial axis.
      padding: ``"SAME"`` (default), ``"VALID"``, ``"SAME_LOWER"``, an int ``p`` (``p`` on
        both sides of every spatial axis, as in Flax), or one entry per spatial axis, each
        an int ``p`` (``(p, p)``) or a ``(lo, hi)`` pair.
      dilation: kernel dilation, an int or one per spatial axis (default 1); Flax's name
        ``kernel_dilation`` works too (one of the two).
      groups: feature groups; default ``C_in / W.shape[-2]``, inferred from the shapes (an
        explicit value is checked against them). Depthwise: ``groups = C_in``. Flax's name
        ``feature_group_count`` works too (one of the two).
      precision: passed to every convolution, backward too.
      compute_dtype: e.g. ``jnp.bfloat16``: convolutions in this dtype, float32 accumulation.
      kernel_dilation: Flax's name for ``dilation`` (give one of the two).
      feature_group_count: Flax's name for ``groups`` (give one of the two).
      quant: ``None`` (default), a recipe name (``"fp8_hybrid"``, ``"fp8_rowwise"``,
        ``"int8"``) or a ``jaxlinear.Recipe``: the forward product and both transposes in
        low precision with dynamic scales (see the quantization guide).

    Returns:
      ``Y: (N, *spatial_out, C_out)`` in ``compute_dtype`` if given, else
      ``jnp.result_type(x, W, b)``.

    Raises:
      ValueError: ``x`` without a batch axis or of a rank other than ``W``'s, channels
        that do not match (the message names the expected layouts and, where the shapes
        fit them, the conversion from channels-first ``x`` or PyTorch's ``W``) or do not
        divide by ``groups``, bad ``strides``/``dilation``/``padding``, ``b`` not
        ``(C_out,)``.
      TypeError: bad params structure (a PyTorch ``OIHW`` state dict is refused with
        ``jaxlinear.from_torch``), non-floating arrays, complex and real arrays mixed, an
        argument given under both its names.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> p = jaxlinear.Params(jnp.ones((2, 1, 1)), jnp.array([0.5]))  # kernel 2, 1 -> 1
      >>> jaxlinear.conv(p, jnp.array([[[1.], [2.], [3.]]]), padding="VALID").tolist()
      [[[3.5], [5.5]]]
      >>> p = jaxlinear.init_conv(jax.random.key(0), 3, 4, 6, groups=2)  # W: (3, 2, 6)
      >>> jaxlinear.conv(p, jnp.ones((1, 5, 4)), padding=1).shape  # groups=2 from the shapes
      (1, 5, 6)
    """
    options = (strides, padding, dilation, kernel_dilation, groups, feature_group_count)
    x, W, b, kw = _layer_prepare("conv", params, x, options, precision, compute_dtype)
    return CONV.custom_vjp(x, W, b, quant=resolve("conv", quant), **kw)


def dual_conv(
    params,
    x,
    *,
    strides=1,
    padding="SAME",
    dilation=None,
    groups=None,
    precision=None,
    compute_dtype=None,
    kernel_dilation=None,
    feature_group_count=None,
    quant=None,
):
    r"""``conv`` with an explicit JVP *and* explicit transposes: every JAX transform works.

    Same arguments, result and validation as ``conv``.

    Args:
      params: as in ``conv``.
      x: as in ``conv``.
      strides: as in ``conv``.
      padding: as in ``conv``.
      dilation: as in ``conv``.
      groups: as in ``conv``.
      precision: as in ``conv``.
      compute_dtype: as in ``conv``.
      kernel_dilation: as in ``conv``.
      feature_group_count: as in ``conv``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> p = jaxlinear.Params(jnp.ones((2, 1, 1)), None)
      >>> x = jnp.array([[[1.], [2.], [3.]]])
      >>> jax.jvp(lambda x: jaxlinear.dual_conv(p, x, padding="VALID"), (x,), (x,))[1].tolist()
      [[[3.0], [5.0]]]
    """
    options = (strides, padding, dilation, kernel_dilation, groups, feature_group_count)
    x, W, b, kw = _layer_prepare("dual_conv", params, x, options, precision, compute_dtype)
    return CONV.dual(x, W, b, quant=resolve("dual_conv", quant), **kw)


def init_conv(
    key, kernel_size, c_in, c_out, *, groups=1, bias=True, scheme="lecun_normal", dtype=jnp.float32
) -> Params:
    """Initialize a conv layer: ``W: (*kernel_size, c_in / groups, c_out)``, ``b`` zeros.

    The schemes are ``init``'s (``jaxlinear.SCHEMES``) with fan-in
    ``prod(kernel_size) · c_in / groups`` and fan-out ``prod(kernel_size) · c_out``
    (``jax.nn.initializers`` read the last two axes of ``W`` as in/out and the others as
    the receptive field).

    Args:
      key: a PRNG key (``jax.random.key(0)``), or an integer seed, used as
        ``jax.random.key(seed)``.
      kernel_size: an int (1-D) or one int per spatial axis.
      c_in: input channels, divisible by ``groups``.
      c_out: output channels, divisible by ``groups``.
      groups: feature groups.
      bias: whether to create ``b: (c_out,)`` (zeros) or set it to ``None``.
      scheme: a name in ``jaxlinear.SCHEMES`` or an initializer ``f(key, shape, dtype)``.
      dtype: dtype of ``W`` and ``b``.

    Returns:
      ``Params(W, b)``.

    Examples:
      >>> import jax, jaxlinear
      >>> p = jaxlinear.init_conv(jax.random.key(0), (3, 3), 4, 8, groups=2)
      >>> p.W.shape, p.b.shape
      ((3, 3, 2, 8), (8,))
    """
    fn = "init_conv"
    key = as_key(fn, key)
    kernel = _check_window(fn, "kernel_size", _per_axis(kernel_size, 1), None)
    for name, v in (("c_in", c_in), ("c_out", c_out), ("groups", groups)):
        _check_count(fn, name, v)
    for name, v in (("c_in", c_in), ("c_out", c_out)):
        if v % groups:
            raise ValueError(f"{fn}: `{name}`={v} is not divisible by `groups`={groups}")
    if callable(scheme):
        initializer = scheme
    elif scheme in _SCHEMES:
        initializer = _SCHEMES[scheme][0]()
    else:
        raise ValueError(f"{fn}: `scheme` must be one of {SCHEMES} or a callable, got {scheme!r}")
    W = initializer(key, (*kernel, c_in // groups, c_out), dtype)
    return Params(W, jnp.zeros((c_out,), dtype) if bias else None)
