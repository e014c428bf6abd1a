r"""Varying manual axes: the type-level record of *replicate* and its adjoint *sum*.

Inside ``jax.shard_map`` (with ``check_vma=True``, the default) every value's type
records the manual mesh axes along which it *varies* from device to device; along
the others it is replicated. A replicated ``W`` that meets a batch-sharded ``x`` is
first cast to varying (``pcast(..., to="varying")``, a no-op on each device: *replicate*),
and the transpose of that cast is ``psum`` (*sum across devices*): the same duality as
bias broadcast over the batch and its adjoint, the sum over the batch.

A hand-written backward rule (``linear``'s ``custom_vjp``, ``dual_linear``'s transpose
rules) must do that sum itself: its cotangent for ``W`` comes out varying along every
axis ``G`` varies along, and must be summed over the axes along which ``W`` is
replicated (``psum_to``). JAX checks this: a cotangent of the wrong type raises.

The helpers read and write the varying axes through what JAX exposes on
``jax.typeof(x)``: ``.manual_axis_type.varying`` (``jax.sharding.ManualAxisType``,
jax >= 0.10) or ``.vma`` (jax 0.6 to 0.9). Where neither exists (no manual-axis
typing) every value counts as invariant and the helpers do nothing.
"""

from __future__ import annotations

import jax
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def _aval(x):
    """The abstract value (type) of ``x``; ``x`` may already be one (``UndefinedPrimal.aval``)."""
    try:
        return jax.typeof(x)
    except TypeError:
        return x


def varying_axes(x) -> frozenset:
    """The manual mesh axes along which ``x`` (an array, tracer or aval) varies; ``{}`` outside."""
    aval = _aval(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(getattr(mat, "varying", ()))
    return frozenset(getattr(aval, "vma", None) or ())


def with_varying(aval, axes):
    """``aval`` re-typed as varying along exactly ``axes`` (for abstract-evaluation rules)."""
    axes = frozenset(axes)
    if axes == varying_axes(aval):
        return aval
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return aval.update(manual_axis_type=mat.update(varying=axes))
    if hasattr(aval, "vma"):
        return aval.update(vma=axes)
    return aval


def _sorted(axes):
    return tuple(sorted(axes, key=str))


def varying_like(a, like):
    """``a`` cast to vary along the manual axes ``like`` varies along (*replicate*; no-op
    outside ``shard_map``): e.g. zeros standing in for a value that varies."""
    axes = varying_axes(like) - varying_axes(a)
    return lax.pcast(a, _sorted(axes), to="varying") if axes else a


def psum_to(ct, primal):
    """Sum the cotangent ``ct`` over the manual axes along which it varies but ``primal`` does not.

    The adjoint of replicating ``primal`` across those devices: the cotangent of a
    replicated value is the sum of its per-device cotangents. ``primal`` may be an array,
    a tracer or an aval; ``ct=None`` passes through.
    """
    if ct is None:
        return None
    axes = varying_axes(ct) - varying_axes(primal)
    return lax.psum(ct, _sorted(axes)) if axes else ct


# --------------------------------------------------------------------------------------
# Sharding in types (meshes with Explicit axes, e.g. the default of jax.make_mesh).
#
# There the sharding of every value is part of its type, and a contraction over a
# sharded axis (dW = Xᵀ G with X sharded over the batch) must be told where its result
# lives. The rules below state it: Y's rows like X's leading axes and its columns like
# W's; dX like X; dW like W. On other meshes they return None and XLA decides.


def _explicit_mesh(a):
    sharding = getattr(_aval(a), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    types = tuple(getattr(mesh, "axis_types", None) or ())
    return mesh if any(t == AxisType.Explicit for t in types) else None


def _entry(a, axis):
    """The spec entry of ``a``'s ``axis``; ``"rows"``: of its leading axes collapsed into one."""
    if _explicit_mesh(a) is None:
        return None
    aval = _aval(a)
    spec = (*aval.sharding.spec, *(None,) * (len(aval.shape) - len(aval.sharding.spec)))
    if axis != "rows":
        return spec[axis]
    lead = spec[:-1]
    return lead[0] if lead and all(e is None for e in lead[1:]) else None


def typed_2d(row_src, row_axis, col_src, col_axis):
    """Sharding of a 2-D result laid out like ``row_src[row_axis]`` × ``col_src[col_axis]``."""
    mesh = _explicit_mesh(row_src) or _explicit_mesh(col_src)
    if mesh is None:
        return None
    return NamedSharding(mesh, PartitionSpec(_entry(row_src, row_axis), _entry(col_src, col_axis)))


def typed_output(x, W):
    """Sharding of ``Y: (..., d_out)``: ``typed_2d(x, "rows", W, 1)``, leading axes restored."""
    mesh = _explicit_mesh(x) or _explicit_mesh(W)
    if mesh is None:
        return None
    lead = (_entry(x, "rows"), *(None,) * (len(_aval(x).shape) - 2))
    return NamedSharding(mesh, PartitionSpec(*lead[: len(_aval(x).shape) - 1], _entry(W, 1)))
